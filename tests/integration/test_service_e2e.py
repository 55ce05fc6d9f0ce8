"""The real server: ``bentoml serve service:PoxClassifier`` as a subprocess on loopback, with
a tiny champion in the test BentoML store; real images in, JSON out, bad uploads survived."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import bentoml
import psutil
import pytest
import requests
from PIL import Image

from helpers.serve import (
    CLASSES,
    coloured_pixels,
    encoded,
    grey_photo_with_spot,
    image_bytes,
    msld_samples,
    running_service,
    save_champion,
    skin_like_photos,
    write_serve_params,
)
from helpers.suite import MSLD_DIR, TEST_IMAGE_SIZE
from pox_pipeline.common import preprocess
from pox_pipeline.guard import non_skin
from pox_pipeline.serving.predictor import Predictor

MAX_UPLOAD_BYTES = 300_000
TIMEOUT_S = 60
PRIVATE_NAME = "jane-doe-clinic-4711.png"


@dataclass(frozen=True)
class Server:
    url: str
    root: Path
    tag: str

    def post(self, route: str, data: bytes, name: str = "photo.png", field: str = "image"):
        files = {field: (name, data, "application/octet-stream")}
        return requests.post(f"{self.url}{route}", files=files, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tag = save_champion()
    root = tmp_path_factory.mktemp("e2e")
    params = write_serve_params(
        root / "params.yaml",
        f"serve.upload_dir={root / 'uploads'}",
        f"serve.max_upload_bytes={MAX_UPLOAD_BYTES}",
    )
    (root / "tmp").mkdir()
    with running_service(params, root / "server.log", {"TMPDIR": str(root / "tmp")}) as url:
        yield Server(url, root, tag)


@pytest.fixture(scope="module")
def predictor(server: Server) -> Predictor:
    return Predictor.from_stored(bentoml.models.get(server.tag))


def photos() -> dict[str, bytes]:
    """Synthetic PNG/JPEG photos, plus two MSLD JPEGs per class when the data set is here."""
    found = {f"synthetic-{s}.png": image_bytes(size=(64 + s, 48), seed=s) for s in range(3)}
    found["synthetic.jpg"] = image_bytes(size=(50, 70), fmt="JPEG", seed=9)
    if MSLD_DIR.is_dir():
        found.update({p.name: p.read_bytes() for p in msld_samples(2)})
    return found


def expected(predictor: Predictor, data: bytes) -> dict:
    return predictor.predict([preprocess.preprocess_bytes(data, TEST_IMAGE_SIZE)])[0]


def assert_same_answer(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    assert got["threshold"] == want["threshold"] and got["model"] == want["model"]


def test_probes_answer(server: Server) -> None:
    for probe in ("/healthz", "/livez", "/readyz"):
        assert requests.get(f"{server.url}{probe}", timeout=TIMEOUT_S).status_code == 200


def test_photos_get_the_models_answer(server: Server, predictor: Predictor) -> None:
    for name, data in photos().items():
        response = server.post("/predict", data, name=name)
        assert response.status_code == 200, f"{name}: {response.text}"
        assert_same_answer(response.json(), expected(predictor, data))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
    server: Server, predictor: Predictor
) -> None:
    images = [image_bytes(seed=100 + i) for i in range(6)]
    jobs = [images[i % len(images)] for i in range(96)]
    before = batch_sizes(server)
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda data: server.post("/predict", data), jobs))
    for data, response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), expected(predictor, data))
    after = batch_sizes(server)
    images_in, batches = after[0] - before[0], after[1] - before[1]
    assert images_in == len(jobs), "every request went through the model API's batcher"
    assert images_in / batches > 1, f"{batches} batches for {images_in} images: none merged"


def batch_sizes(server: Server) -> tuple[float, float]:
    """(images, batches) that the model API's adaptive batcher has run so far."""
    metrics = requests.get(f"{server.url}/metrics", timeout=TIMEOUT_S).text
    found = {}
    for kind in ("sum", "count"):
        pattern = rf'adaptive_batch_size_{kind}\{{[^}}]*method_name="infer"[^}}]*\}} (\S+)'
        match = re.search(pattern, metrics)
        found[kind] = float(match.group(1)) if match else 0.0
    return found["sum"], found["count"]


def test_predict_batch_keeps_order(server: Server, predictor: Predictor) -> None:
    sent = list(photos().items())
    files = [("images", (name, data, "application/octet-stream")) for name, data in sent]
    response = requests.post(f"{server.url}/predict_batch", files=files, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    for (_, data), got in zip(sent, response.json(), strict=True):
        assert_same_answer(got, expected(predictor, data))


def test_bad_uploads_are_refused_and_the_next_photo_works(server: Server) -> None:
    for data, status in ((b"plain text, no photo", 415), (b"\0" * (MAX_UPLOAD_BYTES + 1), 413)):
        response = server.post("/predict", data, name="bad.jpg")
        assert response.status_code == status, response.text
        assert response.json()["error"]
        good = server.post("/predict", image_bytes(seed=5))
        assert good.status_code == 200 and good.json()["label"] in CLASSES


def test_explain_and_the_web_page(server: Server) -> None:
    response = server.post("/explain", grey_photo_with_spot(size=(90, 60)))
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["heatmap_png_base64"])
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (90, 60)
    assert coloured_pixels(png) > 0, "no heatmap drawn over the grey photo"
    root = requests.get(f"{server.url}/", timeout=TIMEOUT_S)
    assert root.url.endswith("/ui/") and "not a diagnosis" in root.text
    assert "swagger" in requests.get(f"{server.url}/docs", timeout=TIMEOUT_S).text.lower()


def test_uploads_leave_no_trace_on_disk_or_in_the_log(server: Server) -> None:
    marker = b"TRAILING-MARKER-BYTES"
    accepted = server.post("/predict", image_bytes(seed=6) + marker, name=PRIVATE_NAME)
    assert accepted.status_code == 200
    assert server.post("/predict", b"not an image" + marker, name=PRIVATE_NAME).status_code == 415
    assert not (server.root / "uploads").exists()
    log = (server.root / "server.log").read_text(errors="replace")
    assert "Service pox-classifier initialized" in log, "the service's log is in this file"
    assert "path=/predict" not in log, "the access log is off by default (serve.access_log)"
    assert "jane-doe" not in log and marker.decode() not in log
    # BentoML parks a multipart file in a per-request temp dir while the request runs.
    leftovers = [p for p in (server.root / "tmp").rglob("*") if p.is_file()]
    assert not [p for p in leftovers if "jane-doe" in p.name or marker in p.read_bytes()]


# ---------------------------------------------------------------------------- with a guard


GUARDED_MODEL_WORKERS = 2


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second server whose champion carries an out-of-distribution guard fitted on
    skin-like photos (the module's first server serves one without), run by two model
    processes (``serve.model_workers``), its access log on (``serve.access_log``)."""
    tag = save_champion(guard_photos=skin_like_photos(24))
    root = tmp_path_factory.mktemp("e2e-guarded")
    params = write_serve_params(root / "params.yaml", f"serve.model_tag={tag}",
                                f"serve.upload_dir={root / 'uploads'}",
                                f"serve.model_workers={GUARDED_MODEL_WORKERS}",
                                "serve.access_log=true")  # fmt: skip
    with running_service(params, root / "server.log") as url:
        yield Server(url, root, tag)


def not_skin() -> dict[str, bytes]:
    """A flat colour, a noise image and a text screenshot, as PNG uploads."""
    chosen = {"flat-blue", "noise-uniform-0", "text-0-1"}
    found = {}
    for name, image in [*non_skin.flat_colours(), *non_skin.noise(), *non_skin.text_screenshots()]:
        if name in chosen:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            found[name] = buffer.getvalue()
    return found


def test_images_that_are_not_skin_get_no_label_through_both_processes(guarded: Server) -> None:
    """The guard's score travels from the model process to the answer: each non-skin image is
    answered with its numeric score (the in-process one), and no label, probability or
    probabilities; /predict_batch and /explain answer the same."""
    predictor = Predictor.from_stored(bentoml.models.get(guarded.tag))
    uploads = not_skin()
    for name, data in uploads.items():
        response = guarded.post("/predict", data, name=f"{name}.png")
        assert response.status_code == 200, f"{name}: {response.text}"
        got, want = response.json(), expected(predictor, data)
        assert got["in_distribution"] is False and got["ood"]["checked"] is True, name
        assert isinstance(got["ood"]["score"], float) and got["ood"]["score"] > 1, name
        assert got["ood"]["score"] == pytest.approx(want["ood"]["score"], rel=1e-4), name
        assert got["label"] is None and got["probability"] is None, name
        assert got["probabilities"] is None, name
        assert got["ood_reason"] and got["ood_reason"] in got["explanation"], name
    sent = [*uploads.values(), encoded(skin_like_photos(1, seed=5)[0])]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(sent)]
    batch = requests.post(f"{guarded.url}/predict_batch", files=files, timeout=TIMEOUT_S)
    assert batch.status_code == 200, batch.text
    for data, got in zip(sent, batch.json(), strict=True):
        want = expected(predictor, data)
        assert got["ood"]["checked"] is True
        assert got["ood"]["score"] == pytest.approx(want["ood"]["score"], rel=1e-4)
        assert got["in_distribution"] is want["in_distribution"]
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    explained = guarded.post("/explain", uploads["flat-blue"]).json()
    assert explained["label"] is None and explained["ood"]["score"] > 1
    assert explained["heatmap_png_base64"] is None  # nothing to explain


def service_processes(params: Path, service: str) -> list[psutil.Process]:
    """The workers of BentoML service ``service`` (``pox-model``, ``pox-classifier``) of the
    server started with ``POX_PARAMS=params``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if service in cmdline and proc.environ().get("POX_PARAMS") == str(params):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_services_run_on_uvloop_and_httptools(guarded: Server) -> None:
    """Both services' uvicorn runs on uvloop with the httptools parser (uvicorn's "auto" picks
    them when installed): 5-8% more answers a second than on asyncio + h11 (README, Benchmarks)."""
    for service in ("pox-classifier", "pox-model"):
        workers = service_processes(guarded.root / "params.yaml", service)
        assert workers, service
        for worker in workers:
            loaded = " ".join(region.path for region in worker.memory_maps())
            assert "/uvloop/loop." in loaded, service
            assert "/httptools/parser/parser." in loaded, service


def test_model_workers_run_side_by_side_and_answer_alike(guarded: Server) -> None:
    """``serve.model_workers`` starts that many model processes; concurrent requests spread
    over them get the in-process answers and guard scores."""
    workers = service_processes(guarded.root / "params.yaml", "pox-model")
    assert len(workers) == GUARDED_MODEL_WORKERS, [w.cmdline() for w in workers]
    predictor = Predictor.from_stored(bentoml.models.get(guarded.tag))
    images = [encoded(photo) for photo in skin_like_photos(8, seed=11)]
    jobs = [images[i % len(images)] for i in range(48)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda data: guarded.post("/predict", data), jobs))
    for data, response in zip(jobs, responses, strict=True):
        assert response.status_code == 200, response.text
        got, want = response.json(), expected(predictor, data)
        assert got["in_distribution"] is want["in_distribution"]
        assert got["ood"]["score"] == pytest.approx(want["ood"]["score"], rel=1e-4)
        assert_same_answer(got, want)


def test_the_access_log_when_on_carries_no_client_address(guarded: Server) -> None:
    """``serve.access_log: true`` logs method, path, status and sizes; BentoML's first field,
    the client's IP:port, is replaced by "-"."""
    assert guarded.post("/predict", encoded(skin_like_photos(1, seed=3)[0])).status_code == 200
    log = (guarded.root / "server.log").read_text(errors="replace")
    lines = [line for line in log.splitlines() if "path=/predict" in line]
    assert lines and all(" - (scheme=http,method=POST,path=/predict" in line for line in lines)
    assert not re.search(r"\d+\.\d+\.\d+\.\d+:\d+ \(scheme=", log), "a client address"
