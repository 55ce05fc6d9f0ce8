"""TFLite backends are converted once, at publish, scored like Keras, stored with their figures
and published only within the tolerance; serving loads the stored bytes and never converts."""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
import pytest

from helpers.models import tiny_model
from helpers.serve import CLASSES, image_bytes, save_champion, skin_like_photos
from helpers.suite import TEST_IMAGE_SIZE
from pox_pipeline.common.config import compose
from pox_pipeline.models import forward
from pox_pipeline.ops.backends import compare_backends
from pox_pipeline.release.publish import BackendPhotos, measure_backends
from pox_pipeline.release.settings import PublishConfig
from pox_pipeline.serving import model_card, tflite
from pox_pipeline.serving.predictor import Predictor

ALL = list(tflite.BACKENDS)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return skin_like_photos(24)


@pytest.fixture(scope="module")
def published_tag(photos: np.ndarray) -> str:
    """The tiny champion published with all three backends (the default tolerance)."""
    return save_champion(guard_photos=photos, backends=ALL)


def test_publish_stores_each_backend_with_its_figures(published_tag: str) -> None:
    stored = bentoml.models.get(published_tag)
    backends = stored.info.metadata["backends"]
    assert list(backends) == [tflite.KERAS, *ALL]
    for name in ALL:
        row = backends[name]
        assert row["published"], row  # the tiny model converts within the default tolerance
        stored_bytes = (Path(stored.path) / row["file"]).read_bytes()
        assert len(stored_bytes) == row["size_bytes"] > 0
        assert row["label_agreement"] >= 0.95 and row["max_abs_probability_difference"] <= 0.1
        assert {"balanced_accuracy", "sensitivity", "specificity"} <= set(row["evidence"])
        assert row["ms_per_photo"] > 0 and "balanced_accuracy" in row["test"]
    assert backends["tflite_fp32"]["max_abs_probability_difference"] < 1e-4
    # the Keras row is measured on the same photos, so the rows compare like with like
    assert backends[tflite.KERAS]["evidence"] == pytest.approx(
        backends["tflite_fp32"]["evidence"], abs=1e-6
    )
    check = stored.info.metadata["backend_check"]
    assert check["representative_photos"] == 18 and check["evidence_photos"] == 6
    # the card names the backend that answers and lists every backend's figures
    served = tflite.fastest(backends)
    text = model_card.render("pox-classifier", stored.info.metadata)
    assert "## Serving backends" in text and f"answers with {served}." in text
    assert f"| {served} (served) | yes |" in text
    pinned = model_card.with_site_override(stored.info.metadata, None, "tflite_int8")
    assert "answers with tflite_int8." in model_card.render("pox-classifier", pinned)


def test_the_service_runs_the_stored_bytes_and_never_converts(
    published_tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the service converted a model")

    monkeypatch.setattr(tflite, "convert", no_conversion)
    stored = bentoml.models.get(published_tag)
    batch = skin_like_photos(4, seed=3)
    keras_out = Predictor.from_stored(stored).outputs(batch)
    for backend in ALL:
        predictor = Predictor.from_stored(stored, backend, tflite_threads=1)
        stored_bytes = (Path(stored.path) / tflite.file_name(backend)).read_bytes()
        assert predictor.runner.flatbuffer == stored_bytes
        predictor.model = None  # no Keras pass: answers and head features come from TFLite
        np.testing.assert_allclose(predictor.outputs(batch), keras_out, atol=0.02)
        assert np.isfinite(predictor.outputs_with_ood_score(batch)[:, -1]).all()
    auto = Predictor.from_stored(stored, tflite.AUTO)
    assert auto.backend == tflite.fastest(stored.info.metadata["backends"])


def test_full_integer_bytes_are_integer_and_backends_compare_on_a_folder(
    published_tag: str, tmp_path: Path
) -> None:
    stored = bentoml.models.get(published_tag)
    full = (Path(stored.path) / tflite.file_name("tflite_full_int8")).read_bytes()
    tensors = tflite_tensor_types(full)
    # int8 inside; float32 only at the input and the two named outputs, around their
    # (de)quantize ops
    assert "INT8" in tensors and tensors.count("FLOAT32") <= 3
    for cls in CLASSES:
        (tmp_path / cls).mkdir()
        for seed in range(3):
            (tmp_path / cls / f"{seed}.png").write_bytes(image_bytes(seed=seed + 10 * len(cls)))
    report = compare_backends(stored, tmp_path, [".png"])
    assert report["images"] == 6
    assert report["max_abs_probability_difference"] < 0.05  # int8 weights, tiny drift
    assert report["label_agreement"] >= 5 / 6
    assert {"accuracy_tflite_fp32", "accuracy_tflite_int8"} <= set(report)


def tflite_tensor_types(flatbuffer: bytes) -> list[str]:
    """The element type of every tensor in a TFLite model."""
    [interpreter] = tflite.Runner(flatbuffer)._interpreters.values()
    return [np.dtype(d["dtype"]).name.upper() for d in interpreter.get_tensor_details()]


def test_a_backend_outside_the_tolerance_is_not_published(photos: np.ndarray) -> None:
    """fp32 is exact; full int8 rounds the probability by more than 1e-5: only fp32 ships,
    and asking for full int8 at start-up is a clear error."""
    tag = save_champion(
        guard_photos=photos, backends=["tflite_fp32", "tflite_full_int8"],
        backend_overrides=["publish.backend_check.max_probability_difference=1e-5"],
    )  # fmt: skip
    stored = bentoml.models.get(tag)
    backends = stored.info.metadata["backends"]
    assert backends["tflite_fp32"]["published"] and not backends["tflite_full_int8"]["published"]
    assert backends["tflite_full_int8"]["max_abs_probability_difference"] > 1e-5
    files = {path.name for path in Path(stored.path).iterdir()}
    assert tflite.file_name("tflite_fp32") in files
    assert tflite.file_name("tflite_full_int8") not in files
    with pytest.raises(ValueError, match="'tflite_full_int8' was not published"):
        Predictor.from_stored(stored, "tflite_full_int8")
    assert "| tflite_full_int8 | no |" in model_card.render("pox-classifier", stored.info.metadata)


def loud_head_model():
    """A tiny model whose head features reach the thousands while its probability stays
    between 0.1 and 0.9: one shared int8 scale would round the probability to 0 or ~4."""
    model = tiny_model(seed=1)
    conv, output = model.get_layer("conv"), model.get_layer("output")
    kernel, bias = conv.get_weights()
    conv.set_weights([np.abs(kernel) * 3000, bias])
    output.set_weights([np.full((4, 1), 1 / 8000, np.float32) * [[1], [-1], [1], [-1]],
                        np.zeros(1, np.float32)])  # fmt: skip
    return model


def test_separate_outputs_keep_the_probabilitys_scale(photos: np.ndarray, tmp_path: Path) -> None:
    model = loud_head_model()
    probe = skin_like_photos(6, seed=5)
    keras_outputs = forward.feature_extractor(
        model, TEST_IMAGE_SIZE, [forward.HEAD], TEST_IMAGE_SIZE
    )
    expected, features = keras_outputs(probe)
    assert np.ptp(features[forward.HEAD]) > 1000  # the head's range dwarfs the probability's
    assert 0.1 < expected.min() and expected.max() < 0.9
    runner = tflite.Runner(tflite.converted(model, TEST_IMAGE_SIZE, "tflite_full_int8", photos))
    answer = runner(probe)
    assert set(answer) == {forward.OUTPUTS, forward.HEAD}
    np.testing.assert_allclose(answer[forward.OUTPUTS], expected, atol=0.01)
    np.testing.assert_allclose(answer[forward.HEAD], features[forward.HEAD], rtol=0.05)
    # and publishing measures the same thing: the full-integer backend passes the check
    cfg = compose(["publish.backends=[tflite_full_int8]"])
    metadata = {"classes": ["Monkeypox", "Others"], "positive_class": "Monkeypox",
                "threshold": 0.5, "image_size": TEST_IMAGE_SIZE}  # fmt: skip
    labels = np.arange(len(probe)) % 2
    backends, _, files = measure_backends(
        model, metadata, BackendPhotos(photos, (probe, labels), (probe, labels)),
        PublishConfig.from_cfg(cfg), int(cfg.evaluate.ece_bins), tmp_path,
    )  # fmt: skip
    assert backends["tflite_full_int8"]["published"], backends["tflite_full_int8"]
    assert list(files) == [tflite.file_name("tflite_full_int8")]


def test_a_model_with_random_augmentation_converts_with_its_named_outputs() -> None:
    """The ImageNet champions carry random flip/rotation layers (inactive when serving) whose
    seed state cannot be saved: the conversion must still keep its one named signature."""
    import keras

    inputs = keras.Input((TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3), name="image")
    augmented = keras.Sequential([keras.layers.RandomFlip(), keras.layers.RandomRotation(0.1)],
                                 name="augmentation")(inputs)  # fmt: skip
    model = keras.Model(inputs, tiny_model()(augmented), name="augmented")
    batch = skin_like_photos(3)
    runner = tflite.Runner(tflite.converted(model, TEST_IMAGE_SIZE, "tflite_fp32", None))
    answer = runner(batch)
    expected = forward.outputs_with_head(model, TEST_IMAGE_SIZE, None)(batch)
    assert set(answer) == {forward.OUTPUTS, forward.HEAD}
    for name in answer:
        np.testing.assert_allclose(answer[name], np.asarray(expected[name]), atol=1e-5)


def test_the_card_says_a_refitted_models_evidence_figures_are_in_sample() -> None:
    """After a refit the backends are scored on photos the model trained on: the card must not
    let those figures read as performance."""
    backends = {"keras": {"published": True, "evidence": {"balanced_accuracy": 0.9}}}
    refitted = {"backends": backends, "selection_metrics": {"evidence": "out_of_fold"}}
    fixed = {"backends": backends, "selection_metrics": {"evidence": "validation"}}
    [words] = model_card.backends_section(refitted).paragraphs
    assert "in-sample" in words and "test figures are the ones to read" in words
    assert "in-sample" not in model_card.backends_section(fixed).paragraphs[0]


def test_the_guard_inside_the_converted_pass_gives_the_keras_guards_scores(
    published_tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 and int8-weight conversions carry the image statistics in their one pass (no TF
    function computes them when served) and score like the Keras guard; full int8 cannot
    carry them and gets them from the TF function."""
    stored = bentoml.models.get(published_tag)
    batch = np.concatenate([skin_like_photos(5, seed=4), np.full((1, 32, 32, 3), 255.0)])
    keras_scores = Predictor.from_stored(stored).outputs_with_ood_score(batch)[:, -1]
    assert keras_scores[-1] > max(1.0, keras_scores[:-1].max())  # the flat photo is out
    full = Predictor.from_stored(stored, "tflite_full_int8", tflite_threads=1)
    assert forward.IMAGE_STATISTICS not in full.runner.output_names
    assert full._features.statistics is not None

    def no_tf_statistics(*args: object, **kwargs: object) -> None:
        raise AssertionError("image statistics computed outside the converted pass")

    monkeypatch.setattr(forward, "image_statistics", no_tf_statistics)
    for backend in ("tflite_fp32", "tflite_int8"):
        predictor = Predictor.from_stored(stored, backend, tflite_threads=1)
        assert forward.IMAGE_STATISTICS in predictor.runner.output_names
        scores = predictor.outputs_with_ood_score(batch)[:, -1]
        np.testing.assert_allclose(scores, keras_scores, rtol=0.02)


def test_batch_plan_uses_only_the_fixed_sizes() -> None:
    assert tflite.batch_plan(13, [1, 2, 4, 8]) == [(8, 8), (4, 4), (1, 1)]
    assert tflite.batch_plan(32, [8, 4]) == [(8, 8)] * 4
    assert tflite.batch_plan(5, [4, 8]) == [(4, 4), (4, 1)]  # the last call padded
    assert tflite.batch_plan(0, [1]) == []


@pytest.mark.parametrize(("cpu_max", "expected"), [
    ("200000 100000\n", 2),  # docker run --cpus 2
    ("150000 100000\n", 2),  # 1.5 CPUs: two threads, the second one part-time
    ("50000 100000\n", 1),
    ("max 100000\n", None),  # no quota: every core in the affinity mask
    (None, None),  # no cgroup v2 file
])  # fmt: skip
def test_auto_threads_follow_the_cgroup_cpu_quota(
    cpu_max: str | None, expected: int | None, tmp_path: Path
) -> None:
    cores = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    usable = min(cores, expected or cores)
    assert tflite.thread_count("auto", cpu_max=str(path)) == usable
    assert tflite.thread_count("auto", 2, str(path)) == max(1, usable // 2)  # two model workers
    assert tflite.thread_count(3, 2, str(path)) == 3


def test_the_runner_runs_fixed_sizes_and_never_reallocates(published_tag: str) -> None:
    """Every batch size runs on interpreters of the configured sizes, whose input shapes never
    change after start-up; the answers are those of one photo at a time."""
    stored = bentoml.models.get(published_tag)
    flatbuffer = (Path(stored.path) / tflite.file_name("tflite_fp32")).read_bytes()
    runner = tflite.Runner(flatbuffer, 1, batch_sizes=(2, 4))
    shapes = {size: tuple(i.get_input_details()[0]["shape"])
              for size, i in runner._interpreters.items()}  # fmt: skip
    assert shapes == {size: (size, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE, 3) for size in (2, 4)}
    photos = skin_like_photos(7, seed=6)
    single = tflite.Runner(flatbuffer, 1)
    expected = np.concatenate([single(photo[None])[forward.OUTPUTS] for photo in photos])
    for count in (1, 3, 7):
        answer = runner(photos[:count])
        assert {name: len(t) for name, t in answer.items()} == dict.fromkeys(answer, count)
        np.testing.assert_allclose(answer[forward.OUTPUTS], expected[:count], rtol=1e-5, atol=1e-6)
    after = {size: tuple(i.get_input_details()[0]["shape"])
             for size, i in runner._interpreters.items()}  # fmt: skip
    assert after == shapes


def test_a_backend_that_converts_but_cannot_run_is_recorded_not_published(
    photos: np.ndarray,
) -> None:
    """colour_texture's statistics divide: full-integer TFLite converts them, then its int8
    division fails on the first batch. Publishing must record that, not crash `select` (the
    pipeline's champion on the synthetic data is colour_texture)."""
    from pox_pipeline.models.architectures import build_model

    cfg = compose([f"data.image_size={TEST_IMAGE_SIZE}", "model.colour_texture.input_size=null"])
    model = build_model(cfg.model.colour_texture, cfg.data)
    tag = save_champion(model, guard_photos=photos,
                        backends=["tflite_fp32", "tflite_full_int8"])  # fmt: skip
    backends = bentoml.models.get(tag).info.metadata["backends"]
    assert backends["tflite_fp32"]["published"]
    failed = backends["tflite_full_int8"]
    assert not failed["published"] and failed["error"].startswith("fails when run:")
