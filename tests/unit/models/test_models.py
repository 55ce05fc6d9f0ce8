"""Model factories: the specified layer stacks, heads, freezing, scaling and weight loading."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

from pox_pipeline.models import architectures as models
from pox_pipeline.models.architectures import (
    VGG16_NOTOP_FILE,
    WeightsUnavailableError,
    build_model,
    compile_model,
    frozen_split,
)

SMALL_CNN = "model.cnn.padding=same"  # 5 valid conv+pool blocks do not fit in 32 px


def _layers_of(model: keras.Model, kind: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, kind)]


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


def test_cnn_is_the_tutorial_stack(make_cfg) -> None:
    cfg = make_cfg("data.image_size=224")  # the tutorial's size and padding
    model = build_model(cfg.model.cnn, cfg.data)
    assert model.input_shape == (None, 224, 224, 3)
    assert isinstance(model.layers[1], keras.layers.Rescaling)
    assert model.layers[1].scale == pytest.approx(1 / 255)
    convs = _layers_of(model, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [16, 32, 64, 128, 32]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (2, 2), (2, 2), (2, 2)]
    assert {c.padding for c in convs} == {"valid"}
    assert {c.activation.__name__ for c in convs} == {"relu"}
    pools = _layers_of(model, keras.layers.MaxPooling2D)
    assert len(pools) == 5 and {(p.pool_size, p.strides) for p in pools} == {((2, 2), (2, 2))}
    # layers alternate conv, pool after the scaling layer
    kinds = [type(layer).__name__ for layer in model.layers[2:12]]
    assert kinds == ["Conv2D", "MaxPooling2D"] * 5
    assert model.get_layer("flatten").output.shape == (None, 5 * 5 * 32)
    dense, output = _layers_of(model, keras.layers.Dense)
    assert (dense.units, dense.activation.__name__) == (32, "relu")
    assert (output.units, output.activation.__name__) == (1, "sigmoid")
    assert model.output_shape == (None, 1)
    assert not _layers_of(model, keras.layers.Dropout)


def test_cnn_too_small_for_valid_padding_says_what_to_change(make_cfg) -> None:
    cfg = make_cfg()
    with pytest.raises(ValueError, match="padding=same"):
        build_model(cfg.model.cnn, cfg.data)


def test_cnn_augmentation_and_dropout_from_config(make_cfg) -> None:
    cfg = make_cfg(SMALL_CNN, "model.cnn.augment.enabled=true", "model.cnn.dropout=0.25")
    model = build_model(cfg.model.cnn, cfg.data)
    augmentation = model.get_layer(models.AUGMENTATION)
    assert [type(layer).__name__ for layer in augmentation.layers] == [
        "RandomFlip", "RandomRotation", "RandomZoom",
    ]  # fmt: skip
    assert model.layers[1] is augmentation  # before the scaling: it sees [0, 255] pixels
    assert model.get_layer("dropout").rate == 0.25
    images = _images(4, 32)
    inference = model(images, training=False).numpy()
    np.testing.assert_array_equal(inference, model(images, training=False).numpy())
    assert not np.allclose(augmentation(images, training=True).numpy(), images)


@pytest.mark.parametrize("name", ["cnn", "vgg16"])
def test_more_than_two_classes_get_a_softmax_head(make_cfg, name: str) -> None:
    cfg = make_cfg(SMALL_CNN, "data.classes=[Monkeypox,Chickenpox,Measles,Others]")
    model = build_model(cfg.model[name], cfg.data)
    output = model.layers[-1] if name == "cnn" else frozen_split(model).trainable.layers[-1]
    assert (output.units, output.activation.__name__) == (4, "softmax")
    assert model.output_shape == (None, 4)
    compile_model(model, cfg.model[name], num_classes=4)
    assert model.loss == "sparse_categorical_crossentropy"
    probabilities = model.predict(_images(2, 32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_binary_head_compiles_with_binary_crossentropy(make_cfg) -> None:
    cfg = make_cfg(SMALL_CNN, "model.cnn.learning_rate=0.01")
    model = compile_model(build_model(cfg.model.cnn, cfg.data), cfg.model.cnn, num_classes=2)
    assert model.loss == "binary_crossentropy"
    assert type(model.optimizer).__name__ == "Adam"
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01)


def test_unknown_architecture_lists_the_known_ones(make_cfg) -> None:
    cfg = make_cfg("model.cnn.architecture=inception")
    known = r"\['cnn', 'colour_texture', 'efficientnet_lite', 'resnet', 'vgg16'\]"
    with pytest.raises(ValueError, match=known):
        build_model(cfg.model.cnn, cfg.data)


VGG16_CONVS = [
    "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2",
    "block4_conv3", "block5_conv1", "block5_conv2", "block5_conv3",
]  # fmt: skip


@pytest.mark.parametrize(
    ("freeze", "last_frozen_conv"),
    [(13, "block4_conv2"), ("all", "block5_conv3"), ("block3_pool", "block3_conv3")],
)
def test_vgg16_freezes_the_configured_prefix(make_cfg, freeze, last_frozen_conv: str) -> None:
    cfg = make_cfg(f"model.vgg16.freeze={freeze}")
    model = build_model(cfg.model.vgg16, cfg.data)
    split = frozen_split(model)
    assert split is not None and split.augmentation is None
    assert not split.frozen.trainable and split.trainable.trainable
    frozen_convs = [c.name for c in _layers_of(split.frozen, keras.layers.Conv2D)]
    trainable_convs = [c.name for c in _layers_of(split.trainable, keras.layers.Conv2D)]
    cut = VGG16_CONVS.index(last_frozen_conv) + 1
    assert frozen_convs == VGG16_CONVS[:cut]
    assert trainable_convs == VGG16_CONVS[cut:]
    # what the optimizer sees is exactly the trainable rest
    trainable_ids = {id(w) for w in model.trainable_weights}
    assert trainable_ids == {id(w) for w in split.trainable.weights}
    assert not trainable_ids & {id(w) for w in split.frozen.weights}


def test_vgg16_head_and_scaling(make_cfg) -> None:
    cfg = make_cfg("model.vgg16.freeze=all")
    model = build_model(cfg.model.vgg16, cfg.data)
    split = frozen_split(model)
    assert isinstance(split.frozen.layers[0], keras.layers.Rescaling)  # random weights: 1/255
    assert split.frozen.layers[0].scale == pytest.approx(1 / 255)
    head = [type(layer).__name__ for layer in split.trainable.layers]
    assert head == ["Flatten", "Dense", "Dense", "Dense"]
    dense = _layers_of(split.trainable, keras.layers.Dense)
    units = [(d.units, d.activation.__name__) for d in dense]
    assert units == [(64, "relu"), (32, "relu"), (1, "sigmoid")]
    assert model.output_shape == (None, 1)
    # the whole model is the composition of its parts
    images = _images(3, 32)
    np.testing.assert_allclose(
        model.predict(images, verbose=0),
        split.trainable.predict(split.frozen.predict(images, verbose=0), verbose=0),
        rtol=1e-5,
    )


def test_vgg16_without_frozen_weights_has_nothing_to_cache(make_cfg) -> None:
    cfg = make_cfg("model.vgg16.freeze=0")
    model = build_model(cfg.model.vgg16, cfg.data)
    assert frozen_split(model) is None
    assert len(_layers_of(model.get_layer(models.TRAINABLE), keras.layers.Conv2D)) == 13


def test_freeze_rejects_unknown_layer_names(make_cfg) -> None:
    cfg = make_cfg("model.vgg16.freeze=block9_conv1")
    with pytest.raises(ValueError, match="block5_pool"):
        build_model(cfg.model.vgg16, cfg.data)


def test_imagenet_preprocessing_layer_equals_keras_preprocess_input() -> None:
    images = _images(2, 8)
    expected = keras.applications.vgg16.preprocess_input(images.copy())
    np.testing.assert_allclose(
        models.imagenet_caffe_preprocessing()(images).numpy(), expected, atol=1e-4
    )


# ---------------------------------------------------------------------------- weights


@pytest.fixture
def notop_weights(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """A VGG16 notop weights file in the legacy .h5 layout Keras' own download uses."""
    keras.utils.set_random_seed(7)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "weights" / VGG16_NOTOP_FILE
    path.parent.mkdir()
    with h5py.File(path, "w") as handle:
        save_weights_to_hdf5_group(handle, base)
    return path, base.get_weights()


def _vgg16_base_weights(model: keras.Model) -> list[np.ndarray]:
    split = frozen_split(model)
    convs = _layers_of(split.frozen, keras.layers.Conv2D)
    convs += _layers_of(split.trainable, keras.layers.Conv2D)
    return [w for conv in convs if conv.name.startswith("block") for w in conv.get_weights()]


def _assert_same_weights(actual: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(actual) == len(expected) == 26
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_vgg16_loads_a_local_weights_file(make_cfg, notop_weights) -> None:
    path, expected = notop_weights
    cfg = make_cfg(f"model.vgg16.weights={path}")
    model = build_model(cfg.model.vgg16, cfg.data)
    _assert_same_weights(_vgg16_base_weights(model), expected)
    # pretrained weights get ImageNet preprocessing, not 1/255
    assert frozen_split(model).frozen.layers[0].name == "imagenet_caffe_preprocessing"
    assert models.weights_source(cfg.model.vgg16) == f"local:{path}"


def test_vgg16_imagenet_uses_the_keras_cache_offline(
    make_cfg, notop_weights, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path, expected = notop_weights
    keras_home = tmp_path / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    path.rename(keras_home / "models" / VGG16_NOTOP_FILE)  # the exact name Keras caches
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setattr(models, "VGG16_NOTOP_URL", "http://127.0.0.1:9/unreachable.h5")
    cfg = make_cfg("model.vgg16.weights=imagenet")
    _assert_same_weights(_vgg16_base_weights(build_model(cfg.model.vgg16, cfg.data)), expected)


def test_vgg16_unreachable_imagenet_names_the_file_and_directory(
    make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    keras_home = tmp_path / "empty_keras_home"
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    # a refused local port stands in for "no network" (tests never download)
    monkeypatch.setattr(models, "VGG16_NOTOP_URL", "http://127.0.0.1:9/unreachable.h5")
    cfg = make_cfg("model.vgg16.weights=imagenet", "model.vgg16.download_timeout_s=5")
    started = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as raised:
        build_model(cfg.model.vgg16, cfg.data)
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert VGG16_NOTOP_FILE in message and str(keras_home / "models") in message
    assert not (keras_home / "models" / VGG16_NOTOP_FILE).exists()


def test_vgg16_missing_local_weights_file_is_a_clear_error(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(f"model.vgg16.weights={tmp_path}/nothing.h5")
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        build_model(cfg.model.vgg16, cfg.data)


# ---------------------------------------------------------------------------- resnet and recipe


def test_resnet_builds_residual_stages_and_trains_a_step(make_cfg) -> None:
    cfg = make_cfg("model.resnet.input_size=null")  # the network at data.image_size
    model = build_model(cfg.model.resnet, cfg.data)
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 1)
    assert model.layers[1] is model.get_layer(models.AUGMENTATION)  # sees [0, 255] pixels
    assert model.get_layer("rescale").scale == pytest.approx(1 / 255)
    stages = cfg.model.resnet.stage_filters
    adds = _layers_of(model, keras.layers.Add)
    assert len(adds) == sum(cfg.model.resnet.blocks_per_stage)
    assert [a.output.shape[-1] for a in adds] == list(stages)  # one block per stage
    # the grid halves at every stage after the first (stem stride 2: 32 -> 16 -> ... -> 2)
    assert [a.output.shape[1] for a in adds] == [16, 8, 4, 2]
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("dropout").rate == cfg.model.resnet.dropout
    assert len(_layers_of(model, keras.layers.BatchNormalization)) == 2 * len(adds) + 1
    compile_model(model, cfg.model.resnet, num_classes=2, steps_per_epoch=1)
    images, labels = _images(4, 32), np.array([0, 1, 0, 1], np.float32)
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert set(history.history) == {"loss", "accuracy", "auc"}


def test_resnet_resizes_to_its_own_input_size_inside_the_model(make_cfg) -> None:
    """The saved model takes data.image_size photos like the others and resizes itself."""
    cfg = make_cfg("data.image_size=64", "model.resnet.input_size=40")
    model = build_model(cfg.model.resnet, cfg.data)
    assert model.input_shape == (None, 64, 64, 3)
    names = [layer.name for layer in model.layers]
    assert names.index(models.AUGMENTATION) < names.index("resize") < names.index("rescale")
    assert model.get_layer("resize").output.shape[1:3] == (40, 40)
    same = build_model(make_cfg("data.image_size=40", "model.resnet.input_size=40").model.resnet,
                       make_cfg("data.image_size=40").data)  # fmt: skip
    assert "resize" not in [layer.name for layer in same.layers]


def test_resnet_softmax_head_and_config_errors(make_cfg) -> None:
    cfg = make_cfg("data.classes=[A,B,C]", "model.resnet.label_smoothing=0")
    assert build_model(cfg.model.resnet, cfg.data).output_shape == (None, 3)
    cfg = make_cfg("model.resnet.blocks_per_stage=[1]")
    with pytest.raises(ValueError, match="equal length"):
        build_model(cfg.model.resnet, cfg.data)


def test_strong_augmentation_layers_from_config(make_cfg) -> None:
    cfg = make_cfg(
        SMALL_CNN, "model.cnn.augment.enabled=true", "model.cnn.augment.translation=0.1",
        "model.cnn.augment.brightness=0.2", "model.cnn.augment.contrast=0.3",
        "model.cnn.augment.saturation=0.4", "model.cnn.augment.blur=0.5",
    )  # fmt: skip
    augmentation = build_model(cfg.model.cnn, cfg.data).get_layer(models.AUGMENTATION)
    kinds = [type(layer).__name__ for layer in augmentation.layers]
    assert kinds == [
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation",
        "RandomBrightness", "RandomContrast", "RandomSaturation", "RandomGaussianBlur",
    ]  # fmt: skip
    assert tuple(augmentation.get_layer("random_brightness").value_range) == models.PIXEL_RANGE
    images = _images(4, 32)
    augmented = augmentation(images, training=True).numpy()
    assert not np.allclose(augmented, images)
    assert augmented.min() >= 0.0 and augmented.max() <= 255.0
    np.testing.assert_array_equal(augmentation(images, training=False).numpy(), images)


def test_recipe_options_are_off_for_the_baselines(make_cfg) -> None:
    cfg = make_cfg()
    for name in ("cnn", "vgg16"):
        model_cfg = cfg.model[name]
        assert model_cfg.label_smoothing == 0 and model_cfg.mixup_alpha == 0
        assert not model_cfg.lr_schedule.cosine and model_cfg.monitor == cfg.train.monitor
        augment = model_cfg.augment
        assert not (augment.translation or augment.brightness or augment.contrast)
        assert augment.saturation is None and augment.blur is None


def test_label_smoothing_softens_the_binary_loss(make_cfg) -> None:
    cfg = make_cfg(SMALL_CNN, "model.cnn.label_smoothing=0.2")
    model = compile_model(build_model(cfg.model.cnn, cfg.data), cfg.model.cnn, num_classes=2)
    assert isinstance(model.loss, keras.losses.BinaryCrossentropy)
    # a perfect, confident prediction still costs something against targets 0.1 / 0.9
    y, p = np.array([[1.0], [0.0]]), np.array([[0.999], [0.001]])
    assert float(model.loss(y, p)) > float(keras.losses.BinaryCrossentropy()(y, p)) + 0.1
    with pytest.raises(ValueError, match="binary"):
        models.loss_for(3, label_smoothing=0.1)


def test_warmup_then_cosine_learning_rate(make_cfg) -> None:
    cfg = make_cfg(
        "model.resnet.learning_rate=0.01", "model.resnet.epochs=10",
        "model.resnet.lr_schedule.warmup_epochs=2", "model.resnet.lr_schedule.min_ratio=0.1",
    )  # fmt: skip
    schedule = models.learning_rate(cfg.model.resnet, steps_per_epoch=5)
    rate = lambda step: float(schedule(step))  # noqa: E731
    assert rate(0) == pytest.approx(0.0)
    assert rate(5) == pytest.approx(0.005)  # halfway through the 10 warm-up steps
    assert rate(10) == pytest.approx(0.01)  # peak at the end of warm-up
    assert rate(30) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5), rel=1e-4)  # cosine halfway
    assert rate(50) == pytest.approx(0.001, rel=1e-4)  # min_ratio at the last step
    with pytest.raises(ValueError, match="steps per epoch"):
        models.learning_rate(cfg.model.resnet, steps_per_epoch=None)
    constant = make_cfg("model.resnet.lr_schedule.cosine=false").model.resnet
    assert models.learning_rate(constant, steps_per_epoch=5) == constant.learning_rate
