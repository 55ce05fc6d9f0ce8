"""The training stage: outputs and MLflow tracking, the embedding cache (same model as
training without it), strategies, and the missing-weights message."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from helpers.suite import tmp_overrides
from pox_pipeline.common.params import project_root
from pox_pipeline.data.prepare import load_split
from pox_pipeline.models import architectures as models
from pox_pipeline.models.architectures import build_model, compile_model, frozen_split
from pox_pipeline.training import train

pytestmark = pytest.mark.long  # minutes in all: `make test` starts this file early

PROJECT_ROOT = project_root()

SMALL_CNN = "model.cnn.padding=same"  # 5 valid conv+pool blocks do not fit in 32 px
RUN_JSON_KEYS = {
    "mlflow_run_id", "experiment_id", "model_name", "architecture", "weights", "epochs_run",
    "best_epoch", "wall_seconds", "cpu_count", "embedding_cache", "phases", "protocol",
    "cross_validation",
}  # fmt: skip
# One fit on train, early-stopped on val: what these tests inspect (test_refit.py beside this
# file covers the default k-fold + refit protocol).
FIXED_SPLIT = "train.refit.folds=0"


QUIET = "train.verbose=0"


def test_class_weights_are_inverse_frequency() -> None:
    weights = train.class_weights(np.array([0, 0, 0, 1]))
    assert weights == pytest.approx({0: 4 / (2 * 3), 1: 4 / (2 * 1)})
    assert train.class_weights(np.array([0, 2, 2])) == pytest.approx({0: 3 / 2, 2: 3 / 4})


def test_cnn_run_writes_stage_outputs_and_tracks_everything(prepared_cfg, tmp_path: Path) -> None:
    cfg = prepared_cfg(SMALL_CNN, "model.cnn.epochs=2", "model.cnn.patience=5", QUIET, FIXED_SPLIT)
    info = train.train(cfg, "cnn")

    model_dir = Path(cfg.paths.models_dir) / "cnn"
    assert json.loads((model_dir / "run.json").read_text()) == info
    assert set(info) == RUN_JSON_KEYS
    assert info["epochs_run"] == 2 and 1 <= info["best_epoch"] <= 2
    assert (info["weights"], info["embedding_cache"]) == ("random", "nothing_frozen")

    report_dir = Path(cfg.paths.reports_dir) / "train" / "cnn"
    history = pd.read_csv(report_dir / "history.csv")
    # every metric the model logs, the AUC a monitor may use included
    assert list(history.columns) == [
        "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "auc", "val_auc"
    ]
    assert history["epoch"].tolist() == [1, 2]
    assert (report_dir / "curves.png").stat().st_size > 0

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(info["mlflow_run_id"])
    assert run.info.run_name == "train-cnn"
    assert run.data.tags["dvc_stage"] == "train@cnn"
    assert run.data.tags["weights"] == "random"
    assert {"model_name", "architecture", "git_commit"} <= set(run.data.tags)
    assert run.data.params["model.cnn.epochs"] == "2"
    assert run.data.params["data.image_size"] == "32"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "auc", "val_auc"):
        steps = client.get_metric_history(run.info.run_id, f"epoch_{metric}")
        assert [m.step for m in steps] == [1, 2]
        assert [m.value for m in steps] == pytest.approx(history[metric].tolist(), rel=1e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "model_summary.txt", "config.yaml"} <= artifacts
    logged_config = OmegaConf.load(client.download_artifacts(run.info.run_id, "config.yaml"))
    assert logged_config.model.cnn.epochs == 2 and logged_config.model_name == "cnn"

    # the saved file and the logged model are the same model
    images, _, _ = load_split(cfg, "val")
    saved = keras.models.load_model(model_dir / "model.keras")
    assert not saved.compiled  # an inference model: no optimizer state in the file
    logged = mlflow.keras.load_model(f"runs:/{info['mlflow_run_id']}/model")
    np.testing.assert_allclose(logged.predict(images, verbose=0), saved.predict(images, verbose=0))


def _predict(path: Path, images: np.ndarray) -> np.ndarray:
    return keras.models.load_model(path).predict(images, verbose=0)


def test_training_on_the_embedding_cache_gives_the_same_model(prepared_cfg, tmp_path: Path) -> None:
    """Fitting the trainable rest on cached frozen outputs = fitting the whole model, through
    the k-fold protocol's fold and refit selections of the cache (3 folds, the fewest that
    leave a fold to train on: 4 fits, not 6)."""
    common = ["model.vgg16.epochs=2", "model.vgg16.learning_rate=0.001", QUIET,
              "train.refit.folds=3"]  # fmt: skip
    cached_cfg = prepared_cfg(*common, f"paths.models_dir={tmp_path}/cached")
    plain_cfg = prepared_cfg(*common, f"paths.models_dir={tmp_path}/plain",
                             "train.embedding_cache.enabled=false")  # fmt: skip
    cached_info = train.train(cached_cfg, "vgg16")
    assert cached_info["embedding_cache"] == "memory"
    assert train.train(plain_cfg, "vgg16")["embedding_cache"] == "disabled"

    images, _, _ = load_split(cached_cfg, "val")
    cached_path = tmp_path / "cached" / "vgg16" / "model.keras"
    with_cache = _predict(cached_path, images)
    without_cache = _predict(tmp_path / "plain" / "vgg16" / "model.keras", images)
    np.testing.assert_allclose(with_cache, without_cache, rtol=1e-3, atol=1e-5)
    assert with_cache.std() > 0  # real, input-dependent predictions

    # the saved whole model is the untouched frozen prefix + the rest as trained on the cache
    keras.utils.set_random_seed(cached_cfg.seed)
    initial = frozen_split(build_model(cached_cfg.model.vgg16, cached_cfg.data))
    saved = frozen_split(keras.models.load_model(cached_path))  # still splittable
    assert saved is not None
    for before, after in zip(initial.frozen.get_weights(), saved.frozen.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    assert any(
        not np.array_equal(before, after)
        for before, after in zip(
            initial.trainable.get_weights(), saved.trainable.get_weights(), strict=True
        )
    )


@pytest.fixture
def split_model(make_cfg):
    cfg = make_cfg("model.vgg16.freeze=all", "model.vgg16.augment.enabled=true")
    keras.utils.set_random_seed(cfg.seed)
    model = build_model(cfg.model.vgg16, cfg.data)
    return cfg, model, frozen_split(model)


def test_disk_cache_holds_float16_augmented_views(split_model, tmp_path: Path) -> None:
    cfg, _, split = split_model
    rng = np.random.default_rng(0)
    train_images = rng.uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    val_images = rng.uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    cache = train.build_embedding_cache(
        split, train_images, val_images, views=3, batch_size=4, max_memory_mb=0,
        directory=tmp_path / "cache",
    )  # fmt: skip
    assert cache.mode == "disk"
    assert isinstance(cache.train, np.memmap) and cache.train.dtype == np.float16
    assert (tmp_path / "cache" / "train.npy").is_file()
    assert cache.train.shape == (3, 6, 1, 1, 512) and cache.val.shape == (1, 3, 1, 1, 512)
    # validation: the un-augmented frozen outputs; training: distinct augmented views
    expected_val = split.frozen.predict(val_images, verbose=0)
    np.testing.assert_allclose(cache.val[0], expected_val, rtol=2e-3, atol=1e-3)
    assert not np.allclose(cache.train[0], cache.train[1])

    labels = np.array([0, 1, 0, 1, 0, 1], np.float32)
    dataset = train.cached_dataset(cache.train, labels, None, batch_size=4, shuffle_seed=1)
    batches = list(dataset)
    assert [len(x) for x, _ in batches] == [4, 2]  # one view per image per epoch
    assert batches[0][0].dtype == "float32"
    compile_model(split.trainable, cfg.model.vgg16, num_classes=2)
    history = split.trainable.fit(dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_memory_cache_equals_the_frozen_prefix(split_model, tmp_path: Path) -> None:
    _, model, split = split_model
    images = np.random.default_rng(1).uniform(0, 255, (5, 32, 32, 3)).astype(np.float32)
    cache = train.build_embedding_cache(
        split, images, images, views=2, batch_size=2, max_memory_mb=64, directory=tmp_path
    )
    assert cache.mode == "memory" and cache.train.dtype == np.float32
    assert not any(tmp_path.iterdir())  # nothing written
    expected = split.frozen.predict(images, verbose=0)
    np.testing.assert_allclose(cache.val[0], expected, rtol=1e-5, atol=1e-7)
    # inference through the whole model never augments: rest(cache) == model(image)
    np.testing.assert_allclose(
        split.trainable.predict(cache.val[0], verbose=0), model.predict(images, verbose=0),
        rtol=1e-5, atol=1e-7,
    )  # fmt: skip


@pytest.fixture
def fit_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every ``keras.Model.fit`` call of the test: the model, its arguments and the strategy
    it runs under, captured when fit starts."""
    import tensorflow as tf

    calls: list[dict] = []
    original = keras.Model.fit

    def spy(self, x=None, *args, **kwargs):
        strategy = tf.distribute.get_strategy()
        calls.append({"model": self, "x": x, "kwargs": kwargs, "strategy": strategy})
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    return calls


def test_mirrored_strategy_trains_on_cpu(prepared_cfg, fit_calls: list[dict]) -> None:
    """train.strategy=mirrored: the model is built, compiled and fitted in a MirroredStrategy,
    so its weights are mirrored variables."""
    import tensorflow as tf

    cfg = prepared_cfg(SMALL_CNN, FIXED_SPLIT, "model.cnn.epochs=1", "train.strategy=mirrored",
                       QUIET)  # fmt: skip
    info = train.train(cfg, "cnn")
    assert info["epochs_run"] == 1
    [call] = fit_calls
    assert isinstance(call["strategy"], tf.distribute.MirroredStrategy)
    weights = call["model"].trainable_weights
    assert weights and all(isinstance(w.value, tf.distribute.DistributedValues) for w in weights)
    saved = keras.models.load_model(Path(cfg.paths.models_dir) / "cnn" / "model.keras")
    assert saved.output_shape == (None, 1)


def test_unreachable_imagenet_weights_end_the_stage_with_a_message(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(models, "VGG16_NOTOP_URL", "http://127.0.0.1:9/unreachable.h5")
    cfg = make_cfg("model_name=vgg16", "model.vgg16.weights=imagenet", QUIET)
    with pytest.raises(SystemExit) as raised:
        train.run(cfg)
    message = str(raised.value.code)
    assert message.startswith("train@vgg16: ImageNet VGG16 weights")
    assert f"Place {models.VGG16_NOTOP_FILE} in {tmp_path / 'keras' / 'models'}/" in message
    assert not (Path(cfg.paths.models_dir) / "vgg16").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_strategy_trains_with_two_local_workers(
    prepared_root: Path, tmp_path: Path
) -> None:
    """Two processes on this machine as a TF_CONFIG cluster; only the chief writes outputs."""
    workers = [f"localhost:{_free_port()}", f"localhost:{_free_port()}"]
    # MLflow exports the URI of earlier in-process runs; the workers must use the config's
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    overrides = [
        *tmp_overrides(tmp_path), f"paths.prepared_dir={prepared_root}/datas/prepared",
        "model_name=cnn", SMALL_CNN, "model.cnn.epochs=2", "train.strategy=multi_worker",
        QUIET,
    ]  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "pox_pipeline.training.train", *overrides,
             f"hydra.run.dir={tmp_path}/hydra-{index}"],
            cwd=PROJECT_ROOT,
            env={**env, "TF_CONFIG": json.dumps(
                {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
            )},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for index in range(len(workers))
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert re.search(r"cnn: \w+, 2 epoch\(s\)", output), output[-3000:]  # cnn: <protocol>, ...
    info = json.loads((tmp_path / "models" / "cnn" / "run.json").read_text())
    assert info["epochs_run"] == 2 and info["mlflow_run_id"]
    runs = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [info["experiment_id"]]
    )
    assert len(runs) == 1  # the chief tracks, the other worker does not


# ---------------------------------------------------------------------------- training recipe


def test_binary_targets_are_one_for_the_positive_class() -> None:
    """The sigmoid unit is P(data.positive_class), whatever its index in data.classes."""
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_array_equal(train.label_array(labels, 2, positive_index=0), [1, 0, 0, 1])
    np.testing.assert_array_equal(train.label_array(labels, 2, positive_index=1), [0, 1, 1, 0])
    assert train.label_array(np.array([2, 0]), 3, positive_index=0).dtype == np.int64


def test_trained_binary_model_scores_the_positive_class(prepared_cfg) -> None:
    """Evaluation reads the sigmoid as P(positive): a trained model must rank positives up."""
    cfg = prepared_cfg(SMALL_CNN, "model.cnn.epochs=8", "model.cnn.learning_rate=0.003", QUIET)
    info = train.train(cfg, "cnn")
    images, labels, _ = load_split(cfg, "train")
    model = keras.models.load_model(Path(cfg.paths.models_dir) / "cnn" / "model.keras")
    scores = model.predict(images, verbose=0)[:, 0]
    positive = labels == list(cfg.data.classes).index(cfg.data.positive_class)
    assert info["epochs_run"] >= 1
    assert scores[positive].mean() > scores[~positive].mean()


def test_mixup_blends_inputs_targets_and_weights_reproducibly() -> None:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 4, 4, 3)).astype(np.float32)
    labels = np.array([0, 1] * 4, np.float32)
    weights = np.array([1, 3] * 4, np.float32)
    dataset = train.image_dataset(images, labels, weights, batch_size=8, shuffle_seed=None)
    first = [t.numpy() for t in next(iter(train.mixup(dataset, 0.4, 2, seed=3)))]
    again = [t.numpy() for t in next(iter(train.mixup(dataset, 0.4, 2, seed=3)))]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    x, y, w = first
    assert not np.allclose(x, images) and 0 <= y.min() and y.max() <= 1
    assert np.any((y > 0.01) & (y < 0.99))  # soft targets
    # weights are 1 + 2 * label, so the same convex mix of two examples keeps w = 1 + 2 * y
    np.testing.assert_allclose(w, 1 + 2 * y, atol=1e-5)
    with pytest.raises(ValueError, match="binary"):
        train.mixup(dataset, 0.4, 3, seed=0)


def test_resnet_recipe_trains_with_every_option_on(
    prepared_cfg, tmp_path: Path, fit_calls: list[dict]
) -> None:
    """Strong augmentation, label smoothing, warm-up + cosine, mixup and a val_auc monitor,
    through the one training loop: each option is in the model that fit trained."""
    cfg = prepared_cfg(
        FIXED_SPLIT, "model.resnet.epochs=2", "model.resnet.patience=1",
        "model.resnet.mixup_alpha=0.2",
        "model.resnet.lr_schedule.warmup_epochs=1", "model.resnet.augment.saturation=0.6",
        "model.resnet.augment.blur=0.3", "model.resnet.stage_filters=[8,16]",
        "model.resnet.blocks_per_stage=[1,1]", "model.resnet.label_smoothing=0.1",
        "model.resnet.input_size=24", QUIET,  # resized inside the model, down from 32 px
    )  # fmt: skip
    recipe = cfg.model.resnet
    assert recipe.monitor == "val_auc" and recipe.lr_schedule.cosine
    info = train.train(cfg, "resnet")
    assert info["architecture"] == "resnet" and 1 <= info["best_epoch"] <= info["epochs_run"]

    [call] = fit_calls
    model = call["model"]
    # augmentation: every configured layer, saturation and blur included
    layer_names = {layer.name for layer in model._flatten_layers()}
    assert {"random_flip", "random_rotation", "random_zoom", "random_translation",
            "random_brightness", "random_contrast", "random_saturation",
            "random_blur"} <= layer_names  # fmt: skip
    assert model.loss.label_smoothing == pytest.approx(0.1)
    # warm-up then cosine: 0 at the first step, the full rate after one epoch, then decaying
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay)
    steps = math.ceil(len(load_split(cfg, "train")[1]) / recipe.batch_size)
    assert schedule.warmup_steps == steps
    assert float(schedule(0)) == 0.0
    assert float(schedule(steps)) == pytest.approx(recipe.learning_rate)
    assert float(schedule(2 * steps - 1)) < recipe.learning_rate
    # mixup: blended images carry blended (fractional) targets
    targets = np.concatenate([np.asarray(batch[1]).ravel() for batch in call["x"]])
    assert ((targets > 0.01) & (targets < 0.99)).any()
    callbacks = call["kwargs"]["callbacks"]
    [stopper] = [c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)]
    assert stopper.monitor == "val_auc"

    history = pd.read_csv(Path(cfg.paths.reports_dir) / "train" / "resnet" / "history.csv")
    # every metric the model logs, the AUC a monitor may use included
    assert list(history.columns) == [
        "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "auc", "val_auc"
    ]
    saved = keras.models.load_model(Path(cfg.paths.models_dir) / "resnet" / "model.keras")
    assert saved.output_shape == (None, 1)


def test_monitor_is_per_model(prepared_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.<name>.monitor drives early stopping and the checkpoint (default: train.monitor)."""
    seen: list[str] = []
    original = keras.callbacks.EarlyStopping.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["monitor"])
        original(self, *args, **kwargs)

    monkeypatch.setattr(keras.callbacks.EarlyStopping, "__init__", spy)
    cfg = prepared_cfg(SMALL_CNN, "model.cnn.epochs=1", "model.cnn.monitor=val_auc", QUIET,
                       FIXED_SPLIT)
    assert prepared_cfg().model.cnn.monitor == "val_loss"
    train.train(cfg, "cnn")
    assert seen == ["val_auc"]


def test_multi_worker_shim_lasts_only_for_the_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keras' step reduction is swapped for multi-worker fits only, and restored after."""
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    class FakeMultiWorker:
        pass

    monkeypatch.setattr(train.tf.distribute, "MultiWorkerMirroredStrategy", FakeMultiWorker)
    original = keras_tf_trainer.reduce_per_replica
    model = keras.Sequential([keras.layers.Dense(1)])
    with train.multi_worker_fit(model, train.tf.distribute.get_strategy()):
        assert keras_tf_trainer.reduce_per_replica is original  # other strategies: untouched
    with pytest.raises(RuntimeError), train.multi_worker_fit(model, FakeMultiWorker()):
        assert keras_tf_trainer.reduce_per_replica is train._multi_worker_mean
        raise RuntimeError("fit failed")
    assert keras_tf_trainer.reduce_per_replica is original
