"""Shared by the serving tests: a tiny champion in the test BentoML store, and test uploads."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import requests
from PIL import Image

from helpers.models import tiny_model
from helpers.suite import MSLD_DIR, PROJECT_ROOT, TEST_IMAGE_SIZE
from pox_pipeline.common.config import write_params
from pox_pipeline.models.inference import store_keras_model

CLASSES = ("Monkeypox", "Others")
THRESHOLD = 0.5
MODEL_NAME = "pox-classifier"
READY_TIMEOUT_S = 180  # two processes importing TensorFlow on a busy 2-core machine
# Without a bound, uvicorn in BentoML's API worker can wait ~50 s for connections to drain.
GRACEFUL_SHUTDOWN_S = 3
STOP_TIMEOUT_S = 20


def save_champion(
    model=None,
    image_size: int = TEST_IMAGE_SIZE,
    guard_photos: np.ndarray | None = None,
    monitored: bool = False,
    backends: Sequence[str] = (),
    backend_overrides: Sequence[str] = (),
) -> str:
    """Save a model as ``pox-classifier`` with select.py's metadata keys; returns its tag.

    With ``guard_photos`` (N, S, S, 3), an out-of-distribution guard is stored too, as
    publishing fits it: the first three quarters are its reference, the rest set the threshold.
    ``monitored`` also stores the monitoring basis and reference table, from the same photos.
    ``backends`` are converted and measured as publishing does (``backend_overrides``: more
    config overrides, e.g. of ``publish.backend_check``), the full-integer one's activation ranges
    set on the reference photos, scored on the others (labelled alternately), and stored when
    they pass.
    """
    from pox_pipeline.common.config import compose
    from pox_pipeline.guard import ood
    from pox_pipeline.release import publish, reference
    from pox_pipeline.release.settings import PublishConfig

    model = model or tiny_model(image_size)
    metadata = {
        "classes": list(CLASSES),
        "positive_class": CLASSES[0],
        "threshold": THRESHOLD,
        "threshold_rule": "fixed",
        "image_size": image_size,
        "resample": "bilinear",
        "architecture": "cnn",
        "model_name": "cnn",
        "weights": "none",
        "mlflow_run_id": "0123456789abcdef",
        "mlflow_model_version": 1,
        "registered_model_name": MODEL_NAME,
        "git_commit": "unknown",
        "selection_metrics": {"balanced_accuracy": 0.5, "sensitivity": 0.95, "specificity": 0.6},
        "test_metrics": {"balanced_accuracy": 0.5},
    }
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = {}
        if backends:
            photos = guard_photos.astype(np.float32)
            split = len(photos) * 3 // 4
            labels = np.arange(len(photos) - split) % 2
            # the guard's settings, so the conversion's statistics are the guard's
            cfg = compose([f"publish.backends=[{','.join(backends)}]",
                           *tiny_guard_overrides(), *backend_overrides])  # fmt: skip
            metadata["backends"], metadata["backend_check"], extra_files = (
                publish.measure_backends(
                    model, metadata,
                    publish.BackendPhotos(photos[:split], (photos[split:], labels),
                                          (photos[split:], labels)),
                    PublishConfig.from_cfg(cfg), int(cfg.evaluate.ece_bins), Path(tmp),
                )
            )  # fmt: skip
        if guard_photos is not None:
            photos = guard_photos.astype(np.float32)
            split = len(photos) * 3 // 4
            guard = ood.fit_guard(model, photos[:split], photos[split:], tiny_guard_settings(),
                                  "none")
            metadata["ood"] = guard.metadata()
            extra_files[ood.OOD_FILE] = guard.save(Path(tmp) / ood.OOD_FILE)
            if monitored:
                model_file = Path(tmp) / "model.keras"
                model.save(model_file)
                config = PublishConfig.from_cfg(compose(tiny_guard_overrides()))
                files, metadata["monitoring"] = reference.write_reference(
                    model_file, metadata, photos[:split], photos[split:], config, Path(tmp),
                    extra_files,
                )  # fmt: skip
                extra_files.update(files)
        return str(store_keras_model(MODEL_NAME, model, None, metadata, extra_files).tag)


def tiny_guard_overrides() -> list[str]:
    """:func:`tiny_guard_settings` as ``publish.guard`` overrides of the composed config."""
    return [f"publish.guard.{key}={value}" for key, value in
            {"statistics_size": TEST_IMAGE_SIZE, "k": 3, "alpha": 0.01}.items()]  # fmt: skip


def tiny_guard_settings(**changes: object):
    """``publish.guard`` for the tiny test models: both feature spaces, small k, at 32 px."""
    from pox_pipeline.guard import ood
    from pox_pipeline.models import forward

    values = {"spaces": forward.FEATURE_SPACES, "statistics_size": TEST_IMAGE_SIZE, "k": 3,
              "alpha": 0.01, "batch_size": 32, **changes}  # fmt: skip
    return ood.OODSettings(**values)


def skin_like_photos(count: int, size: int = TEST_IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) float32 photos of one skin tone with mottled noise: what the
    test guards take as 'the training photos'."""
    rng = np.random.default_rng(seed)
    tone = np.array([200.0, 150.0, 120.0])
    return np.clip(tone + rng.normal(0, 25, (count, size, size, 3)), 0, 255).astype(np.float32)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.asarray(pixels).round().astype(np.uint8)).save(path)
    return path


def write_serve_params(path: Path, *overrides: str) -> Path:
    """A composed params file (what ``POX_PARAMS`` points at) with ``serve.*`` overrides."""
    write_params(path, overrides=list(overrides))
    return path


def encoded(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W, 3) pixels in [0, 255] as an image file's bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels).astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def image_bytes(size: tuple[int, int] = (48, 40), fmt: str = "PNG", seed: int = 0) -> bytes:
    """A small deterministic noise photo, encoded."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encoded(pixels, fmt)


def grey_photo_with_spot(size: tuple[int, int] = (120, 90), grain: float = 0.0) -> bytes:
    """A grey PNG with a black disc: achromatic, so any coloured pixel of its overlay was
    drawn by the heatmap. ``grain``: the std of a seeded grey noise over it (texture that no
    flip or shift leaves unchanged)."""
    width, height = size
    rows, cols = np.mgrid[:height, :width]
    noise = np.random.default_rng(0).normal(0, grain, (height, width, 1))
    pixels = np.repeat(np.clip(150 + noise, 0, 255), 3, axis=2).astype(np.uint8)
    pixels[(rows - height / 2) ** 2 + (cols - width / 3) ** 2 < (min(size) / 5) ** 2] = 20
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def coloured_pixels(png: bytes) -> int:
    """Pixels whose channels differ by more than a PNG/resampling rounding: heatmap colour."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    return int(((pixels.max(axis=-1) - pixels.min(axis=-1)) > 12).sum())


def animated(fmt: str = "PNG") -> bytes:
    """Two frames: an animated PNG (APNG) by default."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


def bad_uploads(max_bytes: int, max_pixels: int) -> dict[str, tuple[bytes, int, str]]:
    """name -> (bytes, expected status, a word the reason must contain)."""
    side = int(max_pixels**0.5) + 8
    big_pixels = Image.new("RGB", (side, side), "white")
    buffer = io.BytesIO()
    big_pixels.save(buffer, format="PNG")
    return {
        "text": (b"this is not a photo\n", 415, "accepted: JPEG, PNG, WEBP"),
        "truncated_jpeg": (image_bytes(fmt="JPEG")[:300], 400, "could not be decoded"),
        "zero_bytes": (b"", 400, "empty"),
        "over_max_bytes": (os.urandom(max_bytes + 1), 413, "limit"),
        "over_max_pixels": (buffer.getvalue(), 413, "pixels"),
        "animated_png": (animated(), 400, "animated"),
        "gif": (animated("GIF"), 415, "accepted"),  # not a format the service lists
        "unsupported_pdf": (
            b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", 415, "accepted"
        ),
    }


def msld_samples(count: int = 2) -> list[Path]:
    """The first ``count`` MSLD photos of each class, when the real data set is beside us."""
    return [p for cls in CLASSES for p in sorted((MSLD_DIR / cls).glob("*.jpg"))[:count]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_service(
    params: Path, log_file: Path, extra_env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """``bentoml serve service:PoxClassifier`` on a free loopback port; yields its base URL.

    Uses the test BentoML store (conftest's BENTOML_HOME), runs in its own process group and
    is always stopped on the way out, whatever happened.
    """
    port = free_port()
    env = {**os.environ, "POX_PARAMS": str(params), **(extra_env or {})}
    command = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "service:PoxClassifier",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--timeout-graceful-shutdown",
        str(GRACEFUL_SHUTDOWN_S),
    ]
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log_file)
        yield url
    finally:
        stop_server(process)


def wait_ready(url: str, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}):\n{log_file.read_text()}")
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready in {READY_TIMEOUT_S}s:\n{log_file.read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    """Stop ``bentoml serve`` by pid: SIGTERM to its process group (the supervisor stops its
    workers in order), then SIGKILL for anything still running after STOP_TIMEOUT_S.

    The workers are looked up first: BentoML starts each in a process group of its own, so a
    signal to the server's group does not reach them.
    """
    try:
        procs = [psutil.Process(process.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
    process.wait()
