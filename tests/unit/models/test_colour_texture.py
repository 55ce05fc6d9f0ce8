"""The colour_texture family: its statistics against plain numpy, the factory's layer stack,
training through the one loop, saving/loading in a fresh process, and its explanation."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from pox_pipeline.models import forward
from pox_pipeline.models.architectures import build_model, compile_model, frozen_split
from pox_pipeline.models.colour_texture import (
    LBP_BINS,
    ColourTextureFeatures,
    lbp_histogram,
    rgb_to_hsv,
)
from pox_pipeline.serving import tflite
from pox_pipeline.serving.predictor import input_saliency, last_conv2d
from pox_pipeline.training import train

SMALL = "model.colour_texture.input_size=null"  # the statistics at the test's 32 px


def numpy_lbp_histogram(grey: np.ndarray, radius: int) -> np.ndarray:
    """Reference LBP riu2, written independently: codes as 8-bit integers, then mapped."""
    r, (h, w) = radius, grey.shape
    centre = grey[r : h - r, r : w - r]
    offsets = [(-r, -r), (-r, 0), (-r, r), (0, r), (r, r), (r, 0), (r, -r), (0, -r)]
    code = np.zeros(centre.shape, np.int64)
    for bit, (dy, dx) in enumerate(offsets):
        code |= (grey[r + dy : h - r + dy, r + dx : w - r + dx] >= centre).astype(np.int64) << bit
    mapped = np.empty_like(code)
    for value in range(256):
        bits = [(value >> i) & 1 for i in range(8)]
        changes = sum(bits[i] != bits[(i + 1) % 8] for i in range(8))
        mapped[code == value] = sum(bits) if changes <= 2 else 9
    return np.bincount(mapped.ravel(), minlength=10) / mapped.size


@pytest.mark.parametrize("radius", [1, 2])
def test_lbp_histogram_equals_a_numpy_reference(radius: int) -> None:
    grey = np.random.default_rng(radius).integers(0, 256, (2, 20, 24)).astype(np.float32)
    ours = np.asarray(lbp_histogram(keras.ops.convert_to_tensor(grey), radius))
    assert ours.shape == (2, LBP_BINS)
    for image, row in zip(grey, ours, strict=True):
        np.testing.assert_allclose(row, numpy_lbp_histogram(image, radius), atol=1e-6)


def test_hsv_equals_tensorflows_conversion() -> None:
    rgb = np.random.default_rng(0).uniform(0, 1, (2, 9, 7, 3)).astype(np.float32)
    rgb[0, 0] = [0.5, 0.5, 0.5]  # grey: hue and saturation 0
    rgb[0, 1] = [0.0, 0.0, 0.0]  # black
    rgb[0, 2] = [0.8, 0.8, 0.2]  # red and green tie for the maximum
    expected = np.asarray(keras.ops.image.rgb_to_hsv(rgb))
    np.testing.assert_allclose(np.asarray(rgb_to_hsv(rgb)), expected, atol=1e-6)


def test_statistics_of_a_flat_and_a_split_image() -> None:
    layer = ColourTextureFeatures(quantiles=[0.0, 0.5, 1.0], histogram_bins=4, lbp_radii=[1],
                                  gradient_bins=3, gradient_range=30.0)  # fmt: skip
    flat = np.full((1, 16, 16, 3), 255.0, np.float32)  # white: R = G = B = V = Y = 1
    split = flat.copy()
    split[:, :, :8] = 0.0  # left half black
    features = np.asarray(layer(np.concatenate([flat, split])))
    assert features.shape == (2, layer.feature_count()) == (2, 9 * (2 + 3 + 4) + 10 + 3)
    # [moments (9 x 2)][quantiles (9 x 3)][histograms (9 x 4)], channel 0 = red
    moments = features[:, :18].reshape(2, 9, 2)
    quantiles = features[:, 18:45].reshape(2, 9, 3)
    histograms = features[:, 45:81].reshape(2, 9, 4)
    np.testing.assert_allclose(moments[0, 0], [1, 0], atol=1e-6)
    np.testing.assert_allclose(quantiles[0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(histograms[0, 0], [0, 0, 0, 1], atol=1e-6)  # 1.0: top bin
    np.testing.assert_allclose(moments[1, 0], [0.5, 0.5], atol=1e-6)  # half 0, half 1
    np.testing.assert_allclose(quantiles[1, 0], [0, 1, 1], atol=1e-6)  # nearest rank
    np.testing.assert_allclose(histograms[1, 0], [0.5, 0, 0, 0.5], atol=1e-6)
    np.testing.assert_allclose(histograms.sum(-1), 1.0, atol=1e-6)
    lbp, gradient = features[:, 81:91], features[:, 91:]
    assert lbp[0, 8] == pytest.approx(1.0)  # flat: every neighbour >= the centre
    np.testing.assert_allclose(gradient[0], [1, 0, 0])
    assert gradient[1, -1] > 0 and gradient.sum(-1) == pytest.approx([1, 1])  # the edge


def test_colour_texture_is_a_regularised_linear_model_on_the_statistics(make_cfg) -> None:
    cfg = make_cfg("data.image_size=64", "model.colour_texture.input_size=48")
    model_cfg = cfg.model.colour_texture
    model = build_model(model_cfg, cfg.data)
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 1)
    split = frozen_split(model)  # the statistics are computed once per image in training
    assert split is not None and split.augmentation is None
    assert [layer.name for layer in split.frozen.layers] == ["resize", "features"]
    assert split.frozen.get_layer("resize").output.shape[1:3] == (48, 48)
    features = split.frozen.get_layer("features")
    assert isinstance(features, ColourTextureFeatures) and not features.weights
    standardize = split.trainable.get_layer("standardize")
    assert isinstance(standardize, keras.layers.BatchNormalization)
    assert not standardize.center and not standardize.scale  # standardisation, nothing learnt
    assert split.trainable.get_layer("dropout").rate == model_cfg.dropout
    output = split.trainable.get_layer("output")
    assert output.kernel.shape == (features.feature_count(), 1)
    assert output.kernel_regularizer.l2 == pytest.approx(model_cfg.l2)
    assert not [layer for layer in split.frozen.layers if isinstance(layer, keras.layers.Conv2D)]
    assert last_conv2d(model) is None
    three = make_cfg("data.classes=[A,B,C]", SMALL)
    assert build_model(three.model.colour_texture, three.data).output_shape == (None, 3)


def test_colour_texture_trains_through_the_one_loop(prepared_cfg) -> None:
    cfg = prepared_cfg(SMALL, "model.colour_texture.epochs=3", "train.verbose=0")
    info = train.train(cfg, "colour_texture")
    assert info["architecture"] == "colour_texture" and info["epochs_run"] == 3
    assert info["embedding_cache"] == "memory"
    assert (Path(cfg.paths.models_dir) / "colour_texture" / "model.keras").is_file()


def test_saved_model_loads_in_a_fresh_process(make_cfg, tmp_path: Path) -> None:
    """The evaluate stage and the service load it without the factory ever being imported."""
    cfg = make_cfg(SMALL)
    model = build_model(cfg.model.colour_texture, cfg.data)
    compile_model(model, cfg.model.colour_texture, num_classes=2)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    model.fit(images, np.array([0, 1, 0], np.float32), epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "expected.npy", model.predict(images, verbose=0))
    script = (
        "import sys, numpy as np; from pathlib import Path; "
        "from pox_pipeline.models import inference; "
        "root = Path(sys.argv[1]); model = inference.load_keras_model(root / 'model.keras'); "
        "np.testing.assert_allclose(model.predict(np.load(root / 'images.npy'), verbose=0), "
        "np.load(root / 'expected.npy'), rtol=1e-5, atol=1e-6); "
        "assert 'pox_pipeline.models.architectures' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_model_saved_when_the_layer_lived_in_features_py_still_loads(tmp_path: Path) -> None:
    """Saved ``.keras`` files name the layer's module, ``pox_pipeline.features`` before it
    became ``colour_texture``; they load through the registered name, which did not change."""
    from pox_pipeline.models import inference

    inputs = keras.Input((32, 32, 3))
    statistics = ColourTextureFeatures()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(1, name="output")(statistics))
    model.save(tmp_path / "new.keras")
    with (
        zipfile.ZipFile(tmp_path / "new.keras") as new,
        zipfile.ZipFile(tmp_path / "old.keras", "w") as old,
    ):
        for item in new.infolist():
            data = new.read(item)
            if item.filename == "config.json":
                assert b'"registered_name": "pox_pipeline>ColourTextureFeatures"' in data
                module = b'"pox_pipeline.models.colour_texture"'
                data = data.replace(module, b'"pox_pipeline.features"')
                assert b'"pox_pipeline.features"' in data
            old.writestr(item, data)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    loaded = inference.load_keras_model(tmp_path / "old.keras")
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(model(images)), rtol=1e-5)


def tflite_outputs(model: keras.Model, image_size: int, backend: str, images: np.ndarray):
    """``model``'s outputs through its conversion to ``backend``, as publishing converts it."""
    runner = tflite.Runner(tflite.converted(model, image_size, backend, None))
    return runner(images)[forward.OUTPUTS]


@pytest.mark.parametrize("backend", ["tflite_fp32", "tflite_int8"])
def test_colour_texture_converts_to_tflite(make_cfg, backend: str) -> None:
    """Every op of the statistics is a TFLite builtin (at input_size null: no resize)."""
    cfg = make_cfg(SMALL)
    model = build_model(cfg.model.colour_texture, cfg.data)
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(
        tflite_outputs(model, 32, backend, images), np.asarray(model(images)),
        atol=0.02 if backend == "tflite_int8" else 1e-5,
    )  # fmt: skip


def test_an_antialiased_resize_is_a_clear_tflite_error(make_cfg) -> None:
    """Keras' antialiased resize (ScaleAndTranslate) has no TFLite op: say so, name the fix."""
    cfg = make_cfg("model.colour_texture.input_size=24")
    model = build_model(cfg.model.colour_texture, cfg.data)
    with pytest.raises(ValueError, match="no ScaleAndTranslate op.*serve.backend=keras"):
        tflite.converted(model, cfg.data.image_size, "tflite_fp32", None)


def test_a_model_without_conv_layers_is_explained_by_input_gradients() -> None:
    """Only the red channel of the top-left patch moves the score: only there is saliency."""
    size = 6
    weights = np.zeros((size, size, 3), np.float32)
    weights[:2, :3, 0] = 0.01
    inputs = keras.Input((size, size, 3))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([weights.reshape(-1, 1), np.zeros(1, np.float32)])
    assert last_conv2d(model) is None
    image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
    saliency = input_saliency(model, image, output_index=0)
    assert saliency.shape == (size, size) and saliency.max() == pytest.approx(1.0)
    assert np.all(saliency[:2, :3] > 0.99)
    saliency[:2, :3] = 0
    assert np.all(saliency == 0)
