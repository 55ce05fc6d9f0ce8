"""Serving core (serve.py) and the BentoML service in-process (Starlette TestClient on the
service's ASGI app, BentoML's recommended HTTP test), with a tiny 32 px champion."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import importlib
import io
import logging
import os
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from helpers.serve import (
    CLASSES,
    THRESHOLD,
    bad_uploads,
    coloured_pixels,
    grey_photo_with_spot,
    image_bytes,
    save_champion,
    skin_like_photos,
    write_serve_params,
)
from helpers.suite import TEST_IMAGE_SIZE
from pox_pipeline import serving
from pox_pipeline.common import preprocess
from pox_pipeline.common.config import compose
from pox_pipeline.common.params import PARAMS_ENV, project_root
from pox_pipeline.common.preprocess import ImageError, ImageTooLarge, UnsupportedFormat
from pox_pipeline.models import inference
from pox_pipeline.serving import uploads
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.serving.predictor import (
    COLORMAP_RGB,
    Predictor,
    colorize,
    gradcam,
    last_conv2d,
    render_heatmap,
)
from pox_pipeline.serving.settings import ExplainConfig, HeatmapConfig, ServeConfig
from pox_pipeline.serving.uploads import (
    decode_upload,
    http_status,
    open_upload_dir,
    read_upload,
    store_upload,
)

LIMITS = {"max_upload_bytes": 200_000, "max_pixels": 250_000, "max_images_per_request": 4}
HEATMAP = HeatmapConfig(alpha=0.5, max_side=64, grid=4)
BAD_UPLOADS = bad_uploads(LIMITS["max_upload_bytes"], LIMITS["max_pixels"])


@pytest.fixture(scope="module")
def champion_tag() -> str:
    return save_champion(guard_photos=skin_like_photos(24))


@pytest.fixture(scope="module")
def predictor(champion_tag: str) -> Predictor:
    return Predictor.from_stored(bentoml.models.get(champion_tag))


@pytest.fixture(scope="module")
def unchecked(champion_tag: str) -> Predictor:
    """The champion without its guard: every answer carries a label, whatever the image (the
    tests' noise images are far outside the guard's skin-like photos)."""
    return Predictor.from_stored(bentoml.models.get(champion_tag), ood_enabled=False)


def card(
    classes: tuple[str, ...] = CLASSES, threshold: float | None = THRESHOLD, **extra: object
) -> DecisionPolicy:
    metadata = {
        "classes": list(classes),
        "positive_class": classes[0],
        "threshold": threshold,
        "image_size": TEST_IMAGE_SIZE,
        "resample": "bilinear",
        "mlflow_run_id": "run",
        **extra,
    }
    return DecisionPolicy.from_metadata("pox-classifier", "v1", metadata)


# ---------------------------------------------------------------------------- settings, card


def serve_values(*overrides: str) -> dict:
    """The composed ``serve:`` as plain dicts (its deprecated keys are ``???``, which a
    DictConfig refuses to unpack)."""
    return OmegaConf.to_container(compose(list(overrides)).serve, resolve=True)


def test_serve_config_reads_every_key_of_the_composed_conf() -> None:
    cfg = compose()
    settings = ServeConfig.from_cfg(cfg.serve)
    assert settings.model_tag == cfg.serve.model_tag
    assert settings.max_upload_bytes == cfg.serve.max_upload_bytes
    assert settings.heatmap.alpha == cfg.serve.heatmap.alpha
    assert settings.guard_enabled is True
    # a relative folder starts at the project root (the params file's), never the CWD
    assert settings.upload_dir == project_root() / cfg.serve.upload_dir
    serve = serve_values()
    with pytest.raises(ValueError, match="backend"):
        ServeConfig.from_cfg({**serve, "backend": "onnx"})
    with pytest.raises(TypeError):
        ServeConfig.from_cfg({**serve, "unknown_knob": 1})
    assert settings.explain == ExplainConfig(**cfg.serve.explain)
    with pytest.raises(ValueError, match="upload_retention_days"):
        ServeConfig.from_cfg({**serve, "upload_retention_days": 0})
    with pytest.raises(ValueError, match="max_concurrent"):
        ServeConfig.from_cfg({**serve, "explain": {"max_concurrent": 0, "max_waiting": 4}})


def test_the_old_guard_switch_still_works_for_one_release() -> None:
    """serve.ood.enabled (the service's switch and publish's, before issue 28) is
    serve.guard_enabled for the service: from a composed override, or from a params file
    written before the rename, with a FutureWarning naming the new key; set both, differently:
    an error. The publish-only keys an old params file holds are ignored here."""
    with pytest.warns(FutureWarning, match="serve.ood.enabled -> serve.guard_enabled"):
        overridden = ServeConfig.from_cfg(compose(["serve.ood.enabled=false"]).serve)
    assert overridden.guard_enabled is False
    new = serve_values()
    old = {key: value for key, value in new.items() if key != "guard_enabled"}
    old |= {"publish_backends": ["tflite_fp32"], "ood": {"enabled": False, "k": 5},
            "monitoring": {**new["monitoring"], "components": 8}}  # fmt: skip
    with pytest.warns(FutureWarning, match="serve.guard_enabled"):
        assert ServeConfig.from_cfg(old).guard_enabled is False
    with pytest.raises(ValueError, match="set only serve.guard_enabled"):
        ServeConfig.from_cfg(compose(["serve.ood.enabled=false", "serve.guard_enabled=true"]).serve)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new key alone: no warning
        off = ServeConfig.from_cfg(compose(["serve.guard_enabled=false"]).serve)
    assert off.guard_enabled is False


def test_serve_config_load_follows_pox_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = write_serve_params(tmp_path / "params.yaml", "serve.max_pixels=1234")
    monkeypatch.setenv(PARAMS_ENV, str(params))
    assert ServeConfig.load().max_pixels == 1234
    monkeypatch.setenv(PARAMS_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match="POX_PARAMS"):
        ServeConfig.load()


def test_binary_label_is_positive_from_the_threshold_up() -> None:
    binary = card(threshold=0.3)
    above, at, below = binary.results(np.array([[0.9], [0.3], [0.2999]]))
    assert above["label"] == at["label"] == "Monkeypox"
    assert below["label"] == "Others"
    assert below["probability"] == pytest.approx(1 - 0.2999)
    assert below["probabilities"] == pytest.approx({"Monkeypox": 0.2999, "Others": 0.7001})
    assert at["threshold"] == 0.3
    assert at["model"] == {"name": "pox-classifier", "version": "v1", "mlflow_run_id": "run"}


def test_multiclass_label_is_the_argmax() -> None:
    three = card(classes=("Monkeypox", "Chickenpox", "Measles"), threshold=None)
    (result,) = three.results(np.array([[0.2, 0.5, 0.3]]))
    assert result["label"] == "Chickenpox"
    assert result["probability"] == pytest.approx(0.5)
    assert three.positive_index == 0


@pytest.mark.parametrize(
    ("classes", "row"), [(CLASSES, [0.9]), (("Monkeypox", "Chickenpox", "Measles"), [0.9, 0.1, 0])]
)
def test_an_image_the_guard_rejects_gets_no_label_and_no_probabilities(
    classes: tuple, row: list
) -> None:
    scored = card(classes=classes, threshold=THRESHOLD if len(classes) == 2 else None)
    inside, outside = scored.results(np.array([row, row]), np.array([0.8, 3.5]))
    assert inside["label"] == "Monkeypox" and inside["probability"] == pytest.approx(0.9)
    assert outside["in_distribution"] is False and outside["ood"] == {"checked": True, "score": 3.5}
    assert outside["label"] is None and outside["probability"] is None
    assert outside["probabilities"] is None
    assert outside["threshold"] == inside["threshold"] and outside["model"] == inside["model"]
    assert outside["explanation"].startswith("No label and no probabilities: ")
    assert outside["ood_reason"] in outside["explanation"] and "3.5 times" in outside["explanation"]


def test_card_rejects_inconsistent_metadata() -> None:
    with pytest.raises(ValueError, match="positive_class"):
        DecisionPolicy.from_metadata(
            "m",
            "v",
            {
                "classes": ["a", "b"],
                "positive_class": "c",
                "threshold": 0.5,
                "image_size": 8,
                "resample": "bilinear",
            },
        )
    with pytest.raises(ValueError, match="threshold"):
        card(threshold=None)


def test_card_applies_the_temperature_before_the_threshold() -> None:
    assert card().temperature == 1.0 and card().tta == "none"  # metadata from before calibration
    # sigmoid(logit(0.9) / 2) = 3 / 4; sigmoid(logit(0.6) / 2) = sqrt(1.5) / (1 + sqrt(1.5))
    hot = card(threshold=0.58, temperature=2.0)
    high, mid = hot.results(np.array([[0.9], [0.6]]))
    assert high["probabilities"] == pytest.approx({"Monkeypox": 0.75, "Others": 0.25})
    assert high["probability"] == pytest.approx(0.75) and high["label"] == "Monkeypox"
    # 0.6 is above the threshold, but the threshold was set on calibrated probabilities
    assert mid["probabilities"]["Monkeypox"] == pytest.approx(1.5**0.5 / (1 + 1.5**0.5))
    assert mid["label"] == "Others"
    three = card(classes=("Monkeypox", "Chickenpox", "Measles"), threshold=None, temperature=0.5)
    (result,) = three.results(np.array([[0.2, 0.5, 0.3]]))
    # softmax(log p / 0.5) = p^2 / sum(p^2)
    assert result["probabilities"]["Chickenpox"] == pytest.approx(0.25 / 0.38)
    assert result["label"] == "Chickenpox"
    with pytest.raises(ValueError, match="temperature"):
        card(temperature=0.0)
    with pytest.raises(ValueError, match="tta"):
        card(tta="rotations")


def test_tta_views_are_the_four_flips() -> None:
    batch = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)
    assert [v is batch for v in inference.tta_views(batch, "none")] == [True]
    identity, horizontal, vertical, both = inference.tta_views(batch, "flips")
    np.testing.assert_array_equal(identity, batch)
    np.testing.assert_array_equal(horizontal[:, :, 0], batch[:, :, -1])  # columns mirrored
    np.testing.assert_array_equal(vertical[:, 0], batch[:, -1])  # rows mirrored
    np.testing.assert_array_equal(both, batch[:, ::-1, ::-1])
    with pytest.raises(ValueError, match="tta"):
        inference.tta_views(batch, "rotations")
    stacked = np.concatenate([np.full((2, 1), k, np.float32) for k in range(4)])
    np.testing.assert_array_equal(inference.mean_over_views(stacked, 4), [[1.5], [1.5]])


# ---------------------------------------------------------------------------- predictor


def test_predictor_matches_keras_and_keeps_order(unchecked: Predictor) -> None:
    images = [preprocess.preprocess_bytes(image_bytes(seed=s), TEST_IMAGE_SIZE) for s in range(5)]
    expected = unchecked.model.predict(np.stack(images), verbose=0)[:, 0]
    results = unchecked.predict(images)
    got = [r["probabilities"]["Monkeypox"] for r in results]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) > 1, "the test images should score differently"
    assert unchecked.predict([]) == []


def test_the_guard_leaves_images_that_are_not_skin_without_a_label(
    predictor: Predictor,
) -> None:
    """Through the Python API (what the CLI and the service call): flat colours, noise and
    text screenshots get no label, no probability, and the guard's numeric score."""
    from pox_pipeline.guard import non_skin

    named = [*non_skin.flat_colours(), *non_skin.noise(), *non_skin.text_screenshots()]
    images = [preprocess.to_model_input(image, TEST_IMAGE_SIZE) for _, image in named]
    for (name, _), answer in zip(named, predictor.predict(images), strict=True):
        assert answer["in_distribution"] is False, name
        assert answer["label"] is None and answer["probability"] is None, name
        assert answer["probabilities"] is None, name
        assert answer["ood"]["checked"] is True and answer["ood"]["score"] > 1, name
        assert answer["ood_reason"] in answer["explanation"], name


def test_predictor_tta_is_the_mean_of_the_flips_in_one_call(
    predictor: Predictor, champion_tag: str
) -> None:

    stored = bentoml.models.get(champion_tag)
    flips = Predictor(
        Path(stored.path), dataclasses.replace(predictor.policy, tta="flips", temperature=1.5),
        ood_enabled=False,
    )
    batch = np.stack(
        [preprocess.preprocess_bytes(image_bytes(seed=s), TEST_IMAGE_SIZE) for s in range(3)]
    )
    manual = np.mean(
        [
            predictor.model.predict(view, verbose=0)
            for view in (batch, batch[:, :, ::-1], batch[:, ::-1], batch[:, ::-1, ::-1])
        ],
        axis=0,
    )
    calls = []
    run = flips._run
    flips._run = lambda images: calls.append(images.shape) or run(images)
    outputs = flips.outputs(batch)
    assert calls == [(4 * 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3)]  # one batched call
    np.testing.assert_allclose(outputs, manual, rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs, predictor.outputs(batch), rtol=1e-4, atol=1e-6)
    # predict = the card's calibrated reading of the averaged outputs
    expected = flips.policy.results(manual)
    got = flips.predict(list(batch))
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    for g, e in zip(got, expected, strict=False):
        assert g["probabilities"] == pytest.approx(e["probabilities"], rel=1e-5)


# ---------------------------------------------------------------------------- Grad-CAM


def red_evidence_model(wrap: str):
    """Scores only the red channel of the left half: Grad-CAM must light up exactly there.

    ``wrap`` nests the Conv2D like real models do: "plain", "submodel" (a VGG16-style base
    inside a functional model) or "chain" (Sequential sub-models chained, as models.vgg16).
    """
    import keras

    size = 8
    conv = keras.layers.Conv2D(2, 1, use_bias=False, activation="relu", name="rgb_to_rg")
    conv.build((None, size, size, 3))
    conv.set_weights([np.array([[[[1, 0], [0, 1], [0, 0]]]], dtype=np.float32)])
    dense = keras.layers.Dense(1, activation="sigmoid")
    dense.build((None, size * size * 2))
    weights = np.zeros((size, size, 2), np.float32)
    weights[:, : size // 2, 0] = 1.0  # red, left half
    dense.set_weights([weights.reshape(-1, 1), np.zeros(1, np.float32)])
    head = [keras.layers.Flatten(), dense]
    scale = keras.layers.Rescaling(1 / 255)
    if wrap == "plain":
        return keras.Sequential([keras.Input((size, size, 3)), scale, conv, *head])
    if wrap == "submodel":
        base_in = keras.Input((size, size, 3))
        base = keras.Model(base_in, conv(base_in), name="base")
        inputs = keras.Input((size, size, 3))
        return keras.Model(inputs, keras.Sequential(head)(base(scale(inputs))))
    frozen = keras.Sequential([keras.Input((size, size, 3)), scale], name="frozen")
    trainable = keras.Sequential([keras.Input((size, size, 3)), conv, *head], name="trainable")
    inputs = keras.Input((size, size, 3))
    return keras.Model(inputs, trainable(frozen(inputs)))


@pytest.mark.parametrize("wrap", ["plain", "submodel", "chain"])
def test_gradcam_points_at_the_evidence_wherever_the_conv_sits(wrap: str) -> None:
    model = red_evidence_model(wrap)
    layer = last_conv2d(model)
    assert layer.name == "rgb_to_rg"
    image = np.zeros((8, 8, 3), np.float32)
    image[:, :, 1] = 200  # green everywhere: present but not evidence
    image[2:5, 1:3, 0] = 255  # a red patch on the left: the evidence
    cam = gradcam(model, layer, image, output_index=0)
    assert cam.shape == (8, 8)
    assert cam.max() == pytest.approx(1.0)
    assert np.all(cam[2:5, 1:3] > 0.99)
    cam[2:5, 1:3] = 0
    assert np.all(cam == 0), "nothing outside the red patch counts"
    assert "call" not in vars(layer), "the recording hook is gone again"


def test_gradcam_finds_the_vgg16_base_conv_of_the_project_model() -> None:
    from pox_pipeline.models.architectures import build_model

    cfg = compose([f"data.image_size={TEST_IMAGE_SIZE}"])
    model = build_model(cfg.model.vgg16, cfg.data)
    layer = last_conv2d(model)
    assert layer.name == "block5_conv3"
    image = np.random.default_rng(0).uniform(0, 255, (TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3))
    cam = gradcam(model, layer, image.astype(np.float32), output_index=0)
    assert cam.shape == (2, 2) and cam.min() >= 0.0
    assert cam.max() == pytest.approx(1.0)  # scaled to its peak: a map was found


def test_explain_returns_the_prediction_and_an_overlay_png(unchecked: Predictor) -> None:
    data = grey_photo_with_spot(size=(120, 90), grain=30)
    assert coloured_pixels(data) == 0
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    result, png = unchecked.explain(photo, HEATMAP)
    # not predict's answer (explain calls predict): the Keras model itself, read at the threshold
    image = preprocess.to_model_input(photo, TEST_IMAGE_SIZE)
    positive = float(unchecked.model(image[None], training=False).numpy()[0, 0])
    assert result["probabilities"] == pytest.approx(
        {CLASSES[0]: positive, CLASSES[1]: 1 - positive}, abs=1e-6
    )
    assert result["label"] == (CLASSES[0] if positive >= THRESHOLD else CLASSES[1])
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (64, 48)  # longest side = max_side
    assert coloured_pixels(png) > 0, "no heatmap drawn over the grey photo"


def test_a_per_pixel_map_is_averaged_into_the_grid_before_it_is_shown() -> None:
    """Two hot pixels of a 64 x 64 saliency colour their whole 16 x 16 cell (grid 4)."""
    photo = Image.new("RGB", (64, 64), (128, 128, 128))
    saliency = np.zeros((64, 64), np.float32)
    saliency[2, 3] = saliency[5, 9] = 1.0
    overlay = np.asarray(Image.open(io.BytesIO(render_heatmap(photo, saliency, HEATMAP))))
    grey = np.array([128, 128, 128])
    assert not np.array_equal(overlay[12, 12], grey)  # far from both pixels, inside the cell
    assert np.array_equal(overlay[60, 60], grey)  # a cell without influence keeps the photo
    coarse = HeatmapConfig(alpha=0.5, max_side=64, grid=64)  # as fine as the map: as is
    unpooled = np.asarray(Image.open(io.BytesIO(render_heatmap(photo, saliency, coarse))))
    assert np.array_equal(unpooled[12, 12], grey)


def test_colorize_runs_from_dark_blue_to_red() -> None:
    ends = colorize(np.array([[0.0, 1.0, 2.0]]))
    assert tuple(ends[0, 0]) == tuple(COLORMAP_RGB[0].astype(int))
    assert tuple(ends[0, 1]) == tuple(ends[0, 2]) == tuple(COLORMAP_RGB[-1].astype(int))


# ---------------------------------------------------------------------------- uploads


def settings(tmp_path: Path, **changes: object) -> ServeConfig:
    base = ServeConfig.from_cfg(compose().serve)
    return dataclasses.replace(base, upload_dir=tmp_path / "uploads", **{**LIMITS, **changes})


def test_read_upload_refuses_by_size_and_deletes_the_temporary_file(tmp_path: Path) -> None:
    upload = tmp_path / "big.png"
    upload.write_bytes(b"x" * 101)
    with pytest.raises(ImageTooLarge, match="101 bytes; the limit is 100"):
        read_upload(upload, max_bytes=100)
    assert not upload.exists()
    upload.write_bytes(b"x" * 101)
    assert read_upload(upload, max_bytes=101) == b"x" * 101
    assert not upload.exists()


def test_uploads_are_not_stored_unless_asked(tmp_path: Path) -> None:
    data = image_bytes(fmt="JPEG")
    decode_upload(data, settings(tmp_path), TEST_IMAGE_SIZE)
    assert not (tmp_path / "uploads").exists()
    photo = decode_upload(data, settings(tmp_path, store_uploads=True), TEST_IMAGE_SIZE)
    (stored,) = (tmp_path / "uploads").iterdir()
    assert np.array_equal(np.asarray(Image.open(stored)), np.asarray(photo))  # the decoded pixels
    assert stored.suffix == ".png" and stored.name[:8].isdigit()  # UTC timestamp first


def jpeg_with_gps() -> bytes:
    """A phone-like JPEG: EXIF with the camera, an orientation and a GPS position."""
    exif = Image.Exif()
    exif[0x010F] = "PatientCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPSInfo
    buffer = io.BytesIO()
    Image.open(io.BytesIO(image_bytes((48, 40), seed=4))).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def test_a_stored_upload_keeps_no_exif_and_no_gps(tmp_path: Path) -> None:
    data = jpeg_with_gps()
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825)[1] == "N", "GPS went in"
    photo = decode_upload(data, settings(tmp_path, store_uploads=True), TEST_IMAGE_SIZE)
    (stored,) = (tmp_path / "uploads").iterdir()
    kept = Image.open(stored)
    assert kept.format == "PNG" and not kept.getexif() and not kept.info
    assert b"Exif" not in stored.read_bytes() and b"PatientCam" not in stored.read_bytes()
    assert kept.size == photo.size == (40, 48)  # stored upright: the orientation was applied


def test_the_default_upload_folder_is_git_ignored() -> None:
    """The team workflow runs `git add -A`: kept photos must never reach git."""
    folder = Path(compose().serve.upload_dir)
    assert not folder.is_absolute()
    probe = f"{folder.as_posix()}/20240101T000000.000000Z-0123abcd.png"
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", probe],
                             cwd=project_root(), check=False)  # fmt: skip
    assert ignored.returncode == 0, f"{probe} is not git-ignored"


def test_stored_uploads_are_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)  # made before, with a wider mode
    open_upload_dir(folder, retention_days=30)
    decode_upload(image_bytes(), settings(tmp_path, store_uploads=True), TEST_IMAGE_SIZE)
    (stored,) = folder.iterdir()
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_uploads_past_their_retention_are_deleted_at_start_and_as_photos_are_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    day = 86400

    def kept(name: str, age_days: float) -> Path:
        path = folder / name
        path.write_bytes(b"photo")
        os.utime(path, (time.time() - age_days * day,) * 2)
        return path

    old = kept("20240101T000000.000000Z-0123abcd.jpeg", 31)  # an earlier version's original
    young = kept("20240301T000000.000000Z-4567cdef.png", 29)
    other = kept("notes.txt", 400)  # not a kept upload: never touched
    assert open_upload_dir(folder, retention_days=30) == 1
    assert not old.exists() and young.exists() and other.exists()
    # then at most every UPLOAD_PURGE_EVERY_S, as photos are stored
    os.utime(young, (time.time() - 31 * day,) * 2)
    store_upload(Image.new("RGB", (8, 8)), folder, retention_days=30)
    assert young.exists(), "purged again within UPLOAD_PURGE_EVERY_S"
    monkeypatch.setattr(uploads, "UPLOAD_PURGE_EVERY_S", 0.0)
    store_upload(Image.new("RGB", (8, 8)), folder, retention_days=30)
    assert not young.exists() and other.exists() and len(list(folder.iterdir())) == 3


def test_http_status_separates_too_large_from_bad() -> None:
    assert http_status(ImageTooLarge("x")) == 413
    assert http_status(UnsupportedFormat("x")) == 415
    assert http_status(ImageError("x")) == 400


def encoded_as(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_16_bit_samples_become_8_bit_exactly_without_a_float_copy() -> None:
    samples = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = preprocess.to_rgb(Image.fromarray(samples))
    want = np.clip(samples / 65535 * 255, 0, 255).round().astype(np.uint8)  # the old float64 way
    assert np.array_equal(np.asarray(got)[..., 0], want)


@pytest.mark.parametrize(
    ("mode", "colour", "options"),
    [("I;16", 40000, {}), ("RGBA", (200, 150, 120, 128), {}), ("LA", (90, 200), {}),
     ("1", 1, {}), ("RGB", (10, 20, 30), {}), ("P", 7, {}), ("P", 7, {"transparency": 7})],
)  # fmt: skip
def test_a_large_png_is_shrunk_before_its_colours_are_converted(
    mode: str, colour: object, options: dict
) -> None:
    """1000 x 800 at draft 224: reduced by 3 (800 // 224) in its own mode (widened first where
    pixels cannot be averaged), then converted: the colour of the full-size conversion."""
    image = Image.new(mode, (1000, 800), colour)
    if mode == "P":
        image.putpalette([value % 251 for value in range(768)])
    data = encoded_as(image, **options)
    shrunk = preprocess.decode_image(data, draft=224)
    whole = preprocess.decode_image(data)
    assert shrunk.size == (334, 267) and whole.size == (1000, 800)
    assert shrunk.mode == whole.mode == "RGB"
    difference = np.abs(np.asarray(shrunk, int) - np.asarray(whole, int)[0, 0]).max()
    assert difference <= 1  # alpha is averaged premultiplied: at most a rounding apart


def test_a_shrunk_png_is_still_turned_upright() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    data = encoded_as(Image.new("RGB", (1000, 500), "red"), exif=exif.tobytes())
    assert preprocess.decode_image(data, draft=224).size == (250, 500)  # 1/2, then upright


def test_over_the_decode_limit_is_refused_before_decoding_a_jpeg_counts_its_draft() -> None:
    big = Image.new("RGB", (2000, 2000), "white")
    limits = {"max_decode_pixels": 1_000_000, "draft": 224}
    with pytest.raises(ImageTooLarge, match=r"4,000,000 pixels; the limit is 1,000,000"):
        preprocess.decode_image(encoded_as(big), **limits)
    jpeg = preprocess.decode_image(encoded_as(big, "JPEG"), **limits)  # decoded at 1/8
    assert jpeg.size == (250, 250)


def test_only_the_listed_formats_are_decoded_prepare_reads_any() -> None:
    tiff = encoded_as(Image.new("RGB", (40, 30), "white"), "TIFF")
    listed = ServeConfig.from_cfg(compose().serve).formats
    assert listed == ("JPEG", "PNG", "WEBP")
    with pytest.raises(UnsupportedFormat, match="accepted: JPEG, PNG, WEBP"):
        preprocess.decode_image(tiff, formats=listed)
    assert preprocess.decode_image(tiff).size == (40, 30)  # prepare's own, broader acceptance
    with pytest.raises(ValueError, match="EPSS"):
        ServeConfig.from_cfg({**serve_values(), "formats": ["JPEG", "EPSS"]})


def test_a_phones_mpo_is_its_first_picture_drafted_as_a_jpeg() -> None:
    first, second = Image.new("RGB", (900, 900), "red"), Image.new("RGB", (900, 900), "blue")
    mpo = encoded_as(first, "MPO", save_all=True, append_images=[second])
    photo = preprocess.decode_image(mpo, formats=("JPEG",), draft=224)
    assert photo.size == (225, 225) and photo.getpixel((100, 100))[0] > 200  # red, 1/4


def test_upload_settings_are_checked() -> None:
    base = serve_values()
    with pytest.raises(ValueError, match="request_body_timeout_s"):
        ServeConfig.from_cfg({**base, "request_body_timeout_s": base["timeout_s"]})
    with pytest.raises(ValueError, match="max_images_per_request"):
        ServeConfig.from_cfg({**base, "max_images_per_request": 1001})
    with pytest.raises(ValueError, match="max_concurrent_decodes"):
        ServeConfig.from_cfg({**base, "max_concurrent_decodes": 0})


# ---------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def service_app(champion_tag: str) -> Iterator[tuple[object, object]]:
    """service.py imported as ``bentoml serve`` does, and its ASGI app (built once: BentoML
    registers process-wide metrics per app); each TestClient runs start-up and shutdown."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PARAMS_ENV, str(project_root() / "params.yaml"))
        patch.syspath_prepend(str(project_root()))
        module = importlib.import_module("service")
        original = module.SETTINGS
        yield module, module.PoxClassifier.to_asgi()
        module.SETTINGS = original


def client_for(service_app, tmp_path: Path, **changes: object):
    """A TestClient whose service instances read these settings (small limits by default)."""
    from starlette.testclient import TestClient

    module, app = service_app
    module.SETTINGS = settings(tmp_path, **changes)
    return TestClient(app, follow_redirects=False)


@pytest.fixture(scope="module")
def api(service_app, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The service with its guard off: the noise test photos get labels (the guard's own
    tests below turn it on)."""
    root = tmp_path_factory.mktemp("api")
    with client_for(service_app, root, guard_enabled=False) as client:
        yield client


def upload(data: bytes, name: str = "photo.png", field: str = "image") -> dict:
    return {field: (name, data, "application/octet-stream")}


def test_predict_answers_as_the_predictor_does(api, unchecked: Predictor) -> None:
    data = image_bytes(seed=3)
    response = api.post("/predict", files=upload(data))
    assert response.status_code == 200, response.text
    expected = unchecked.predict([preprocess.preprocess_bytes(data, TEST_IMAGE_SIZE)])[0]
    body = response.json()
    assert body["label"] == expected["label"]
    assert body["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-6)
    assert body["threshold"] == THRESHOLD
    assert body["model"]["name"] == "pox-classifier" and body["model"]["version"]


def test_predict_batch_answers_in_order(api) -> None:
    photos = [image_bytes(seed=s) for s in (7, 8, 9)]
    singles = [api.post("/predict", files=upload(p)).json() for p in photos]
    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(photos)]
    batch = api.post("/predict_batch", files=files)
    assert batch.status_code == 200, batch.text
    got = [r["probabilities"]["Monkeypox"] for r in batch.json()]
    assert got == pytest.approx([r["probabilities"]["Monkeypox"] for r in singles], abs=1e-6)


def test_predict_batch_limits_and_names_the_bad_image(api) -> None:
    too_many = [("images", (f"{i}.png", image_bytes(), "image/png")) for i in range(5)]
    response = api.post("/predict_batch", files=too_many)
    assert response.status_code == 413 and "limit is 4" in response.json()["error"]
    mixed = [
        ("images", ("a.png", image_bytes(), "image/png")),
        ("images", ("b.txt", b"hello", "text/plain")),
    ]
    response = api.post("/predict_batch", files=mixed)
    assert response.status_code == 415
    assert response.json()["error"].startswith("image 2 of 2: ")


def test_explain_adds_a_heatmap_png(api) -> None:
    response = api.post("/explain", files=upload(grey_photo_with_spot(size=(80, 60))))
    assert response.status_code == 200, response.text
    body = response.json()
    png = base64.b64decode(body["heatmap_png_base64"])
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (80, 60)
    assert coloured_pixels(png) > 0, "no heatmap drawn over the grey photo"
    assert body["label"] in CLASSES


def test_the_explain_limit_queues_up_to_max_waiting_then_refuses(service_app) -> None:
    module, _ = service_app

    async def burst() -> tuple[list[str], object]:
        limit = module.ExplainLimit(ExplainConfig(max_concurrent=1, max_waiting=1))
        gate, turns = asyncio.Event(), []

        async def request(name: str) -> None:
            with limit.admitted():
                async with limit.turn():
                    turns.append(name)
                    await gate.wait()

        waiting = [asyncio.create_task(request(name)) for name in ("first", "second")]
        await asyncio.sleep(0.01)
        assert turns == ["first"], "one turn at a time"
        with pytest.raises(module.ExplainBusy), limit.admitted():
            pass
        refusal = limit.busy()
        gate.set()
        await asyncio.gather(*waiting)
        with limit.admitted():  # room again
            pass
        return turns, refusal

    turns, refusal = asyncio.run(burst())
    assert turns == ["first", "second"]
    # two admitted, one turn at a time, a turn taken as 1 s until one is measured
    assert refusal.status_code == 429 and refusal.headers["retry-after"] == "2"


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
@pytest.mark.parametrize("route", ["/predict", "/explain"])
def test_bad_uploads_get_a_reason_and_the_service_keeps_serving(api, route: str, kind: str) -> None:
    data, status, word = BAD_UPLOADS[kind]
    response = api.post(route, files=upload(data, name="upload.bin"))
    assert response.status_code == status, response.text
    assert word in response.json()["error"]
    assert api.post(route, files=upload(image_bytes())).status_code == 200


def test_requests_without_the_image_field_are_client_errors(api) -> None:
    response = api.post("/predict", files={"other": ("a.txt", b"text", "text/plain")})
    assert response.status_code == 400 and "image" in response.text
    response = api.post("/predict", json={"image": "https://example.com/photo.jpg"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["error"]


def test_health_docs_and_web_page_routes(api) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert api.get(probe).status_code == 200
    assert api.get("/").headers["location"] == "/ui/"
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = api.get("/docs.json").json()
    assert {"/predict", "/predict_batch", "/explain"} <= set(spec["paths"])
    # the docs show the real answer schema, not a bare object
    schemas = spec["components"]["schemas"]
    answer = {"label", "probability", "threshold", "probabilities", "model", "in_distribution",
              "ood", "ood_reason", "explanation"}  # fmt: skip
    assert set(schemas["Answer"]["properties"]) == answer
    for field in ("label", "probability", "probabilities"):  # a rejected image has none
        described = schemas["Answer"]["properties"][field]
        assert {"type": "null"} in described["anyOf"], field
        assert "null when in_distribution is false" in described["description"], field
    explained = spec["paths"]["/explain"]["post"]["responses"]["200"]["content"]
    assert set(explained["application/json"]["schema"]["properties"]) == answer | {
        "heatmap_png_base64"
    }
    page = api.get("/ui/")
    assert page.status_code == 200 and "not a diagnosis" in page.text
    assert api.get("/ui/app.js").status_code == 200 and api.get("/ui/style.css").status_code == 200


def test_web_page_needs_nothing_from_the_internet() -> None:
    for asset in (Path(serving.__file__).parent / "static").iterdir():
        text = asset.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, asset.name


def test_uploads_are_neither_stored_nor_logged(
    service_app, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker_name = "jane-doe-clinic-4711.png"
    data = image_bytes(seed=11) + b"TRAILING-MARKER-BYTES"  # PNG readers ignore trailing data
    caplog.set_level(logging.DEBUG)
    with client_for(service_app, tmp_path) as client:
        assert client.post("/predict", files=upload(data, name=marker_name)).status_code == 200
        assert (
            client.post(
                "/predict", files=upload(b"not an image " * 4, name=marker_name)
            ).status_code
            == 415
        )
    assert not (tmp_path / "uploads").exists()
    assert "Service pox-classifier initialized" in caplog.text, "BentoML's logs were captured"
    assert "jane-doe" not in caplog.text and "TRAILING-MARKER" not in caplog.text


def test_store_uploads_keeps_accepted_photos_under_a_timestamp(service_app, tmp_path: Path) -> None:
    data = image_bytes(seed=12)
    with client_for(service_app, tmp_path, store_uploads=True) as client:
        assert client.post("/predict", files=upload(data, name="jane-doe.png")).status_code == 200
        assert client.post("/predict", files=upload(b"", name="empty.png")).status_code == 400
    (stored,) = (tmp_path / "uploads").iterdir()
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(stored)), pixels)
    assert "jane" not in stored.name and stored.suffix == ".png"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


def test_explain_over_its_limit_gets_429_with_retry_after_while_predict_answers(
    service_app, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Grad-CAM held in the model service: the next /explain is refused at once with the
    reason, /predict still answers, and the held one completes."""
    entered, release = threading.Event(), threading.Event()
    gradcam = Predictor.gradcam

    def held(predictor: Predictor, image: np.ndarray) -> np.ndarray:
        entered.set()
        release.wait(60)
        return gradcam(predictor, image)

    monkeypatch.setattr(Predictor, "gradcam", held)
    limit = ExplainConfig(max_concurrent=1, max_waiting=0)
    with client_for(service_app, tmp_path, guard_enabled=False, explain=limit) as client:
        with ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(client.post, "/explain", files=upload(image_bytes(seed=5)))
                assert entered.wait(60), "the first /explain never reached Grad-CAM"
                refused = client.post("/explain", files=upload(image_bytes(seed=6)))
                predicted = client.post("/predict", files=upload(image_bytes(seed=7)))
            finally:
                release.set()
            assert first.result(60).status_code == 200
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) >= 1 and "serve.explain" in refused.json()["error"]
    assert predicted.status_code == 200, predicted.text


def png_of(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_answer_says_whether_the_photo_looks_like_the_training_photos(
    service_app, tmp_path: Path
) -> None:
    skin, blue = png_of(skin_like_photos(24)[0]), png_of(np.full((32, 32, 3), [30, 60, 220]))
    with client_for(service_app, tmp_path) as api:
        answers = {route: [api.post(route, files=upload(p)).json() for p in (skin, blue)]
                   for route in ("/predict", "/explain")}  # fmt: skip
        files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate([blue, skin, blue])]
        batch = api.post("/predict_batch", files=files).json()
    for inside, outside in answers.values():
        assert inside["in_distribution"] is True and inside["ood_reason"] is None
        assert outside["in_distribution"] is False
        assert outside["label"] is outside["probability"] is outside["probabilities"] is None
        assert "does not look like a skin photo" in outside["ood_reason"]
        assert outside["ood"]["score"] > 1 >= inside["ood"]["score"]
        assert inside["explanation"].startswith(("Flagged", "Not flagged"))
    assert [answer["in_distribution"] for answer in batch] == [False, True, False]


def test_the_guard_has_an_off_switch(service_app, tmp_path: Path) -> None:
    with client_for(service_app, tmp_path, guard_enabled=False) as client:
        blue = png_of(np.full((32, 32, 3), [30, 60, 220]))
        body = client.post("/predict", files=upload(blue)).json()
    assert body["in_distribution"] is True and body["ood"] == {"checked": False, "score": None}


def test_model_card_page(service_app, tmp_path: Path) -> None:
    with client_for(service_app, tmp_path) as api:
        response, page = api.get("/model-card"), api.get("/ui/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    for words in ("Model card", "Intended use", "Not a diagnosis", "Out-of-distribution rule"):
        assert words in response.text
    assert 'href="../model-card"' in page.text
