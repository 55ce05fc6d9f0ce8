"""Throughput and latency of the BentoML service against a naive server, same model.

Starts each server on 127.0.0.1 in turn: the BentoML service (service.py) with adaptive
batching on, the same with batching off, and the naive Flask app (benchmarks/naive_server.py,
``model.predict`` per request, as the tutorial's web app). Drives each with 1, 8 and 32
concurrent clients posting photos to /predict for a fixed time, and prints requests/s,
p50/p95/p99 latency, errors and the peak memory of the server's processes, then the
throughput ratios. Servers are stopped by pid whatever happens.

The model is an untrained one built by pox_pipeline.models at 224 px (speed does not depend on
the weights) in a temporary BentoML store, or with --bento-tag a stored champion.
``bentoml-nomonitor`` is the batching server with ``serve.monitoring.enabled=false``: the
"monitoring on / off" ratio is what the per-answer records and /metrics series cost.

examples:
  python benchmarks/serve_bench.py --model cnn
  python benchmarks/serve_bench.py --model vgg16 --clients 1 8 --duration 10
  python benchmarks/serve_bench.py --bento-tag pox-classifier:latest \
      --images ../shared/datasets/msld
  python benchmarks/serve_bench.py --bento-tag pox-classifier:latest --backend tflite_fp32 \
      --clients 8
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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import requests
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from pox_pipeline.config import load_params, project_root
from pox_pipeline.inference import store_keras_model
from pox_pipeline.serve import BACKENDS
from pox_pipeline.tflite import AUTO

PROJECT_ROOT = project_root()

SERVERS = {
    "bentoml": "BentoML service, adaptive batching on",
    "bentoml-nobatch": "BentoML service, adaptive batching off",
    "bentoml-nomonitor": "BentoML service, adaptive batching on, monitoring off",
    "naive": "Flask + model.predict per request",
}
READY_TIMEOUT_S = 300
# Without a bound, uvicorn in BentoML's API worker can wait ~50 s for connections to drain.
GRACEFUL_SHUTDOWN_S = 3
STOP_TIMEOUT_S = 20
REQUEST_TIMEOUT_S = 300
RSS_SAMPLE_S = 0.25
SYNTHETIC_PHOTOS = 8


@dataclass
class Result:
    server: str
    clients: int
    requests: int
    errors: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mib: float


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=["cnn", "vgg16"], default="cnn",
                        help="build an untrained model of this architecture (default: cnn)")
    source.add_argument("--bento-tag", help="benchmark this model of the BentoML store instead")
    parser.add_argument("--image-size", type=int, default=224,
                        help="size of the built model and of synthetic photos (default: 224)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32],
                        help="concurrent clients, one run each (default: 1 8 32)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds of load per run (default: 10)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of unmeasured load before the runs (default: 3)")
    parser.add_argument("--servers", nargs="+", choices=list(SERVERS), default=list(SERVERS),
                        help="which servers to measure (default: all)")
    parser.add_argument("--backend", choices=(AUTO, *BACKENDS),
                        help="serve.backend of the BentoML servers (default: the params' own; "
                             "the naive server always calls the Keras model)")
    parser.add_argument("--images", type=Path,
                        help="folder of photos to send (any depth; default: synthetic JPEGs)")
    parser.add_argument("--params", type=Path, default=PROJECT_ROOT / "params.yaml",
                        help="composed params with the serve settings (default: params.yaml)")
    parser.add_argument("--out", type=Path,
                        help="also write the results as JSON (e.g. benchmarks/results/cnn.json)")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- model and payloads


def store_untrained_model(
    cfg: DictConfig, architecture: str, image_size: int, workdir: Path
) -> str:
    """Save an untrained model as ``pox-classifier`` in the (temporary) BentoML store, with a
    guard and a monitoring reference fitted on the synthetic photos (as publishing stores
    them), so that monitoring on vs off compares what a published champion serves."""
    from pox_pipeline import drift, ood
    from pox_pipeline.inference import load_keras_model
    from pox_pipeline.models import build_model

    data_cfg = OmegaConf.merge(cfg.data, {"image_size": image_size})
    model_cfg = OmegaConf.merge(cfg.model[architecture], {"weights": None})
    model = build_model(model_cfg, data_cfg)
    metadata = {
        "classes": list(cfg.data.classes),
        "positive_class": cfg.data.positive_class,
        "threshold": 0.5,
        "image_size": image_size,
        "resample": cfg.data.resample,
        "architecture": architecture,
        "model_name": architecture,
        "weights": "none",
    }
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
                       for data in photos(None, image_size)])  # fmt: skip
    settings = ood.OODSettings.from_cfg({**cfg.serve.ood, "k": 1})
    half = len(arrays) // 2
    model_file = workdir / "untrained.keras"
    model.save(model_file)
    guard = ood.fit_guard(load_keras_model(model_file), arrays[:half], arrays[half:], settings)
    extra = {ood.OOD_FILE: guard.save(workdir / ood.OOD_FILE)}
    files, _ = drift.write_reference(model_file, metadata, arrays[:half], arrays[half:],
                                     cfg.serve, workdir, extra)  # fmt: skip
    return str(store_keras_model("pox-classifier", model, None, metadata, {**extra, **files}).tag)


def photos(folder: Path | None, size: int) -> list[bytes]:
    """The request bodies: the folder's photos, or synthetic JPEGs of the model's size."""
    if folder is not None:
        suffixes = {".jpg", ".jpeg", ".png"}
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes)
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


def measure(name: str, url: str, root: psutil.Process, args: argparse.Namespace,
            payloads: list[bytes]) -> list[Result]:
    drive(url, payloads, max(args.clients), args.warmup)  # trace, train BentoML's batcher
    results = []
    for clients in args.clients:
        with PeakRss(root) as rss:
            latencies, errors, seconds = drive(url, payloads, clients, args.duration)
        ms = np.percentile(latencies, [50, 95, 99]) * 1000 if latencies else [float("nan")] * 3
        results.append(Result(name, clients, len(latencies), errors, round(seconds, 2),
                              round(len(latencies) / seconds, 2), *(round(float(v), 1) for v in ms),
                              round(rss.peak / 2**20, 1)))
        print(f"  {name:<16} {clients:>3} clients: {results[-1].requests_per_s:8.2f} req/s, "
              f"p50 {results[-1].p50_ms:.1f} ms, errors {errors}", flush=True)
    return results


# ---------------------------------------------------------------------------- report


def report(results: list[Result]) -> str:
    lines = [f"{'server':<17}{'clients':>8}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}"
             f"{'p99 ms':>10}{'errors':>8}{'peak RSS MiB':>14}"]
    for r in results:
        lines.append(f"{r.server:<17}{r.clients:>8}{r.requests_per_s:>10.2f}{r.p50_ms:>10.1f}"
                     f"{r.p95_ms:>10.1f}{r.p99_ms:>10.1f}{r.errors:>8}{r.peak_rss_mib:>14.1f}")
    rate = {(r.server, r.clients): r.requests_per_s for r in results}
    for label, top, bottom in (("BentoML (batching) / naive", "bentoml", "naive"),
                               ("batching on / off", "bentoml", "bentoml-nobatch"),
                               ("monitoring on / off", "bentoml", "bentoml-nomonitor")):
        ratios = [f"{c} clients: {rate[top, c] / rate[bottom, c]:.2f}x"
                  for c in sorted({c for _, c in rate})
                  if (top, c) in rate and (bottom, c) in rate and rate[bottom, c] > 0]
        if ratios:
            lines.append(f"throughput {label}: " + ", ".join(ratios))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pox-serve-bench-"))
    if args.bento_tag is None:
        # An isolated store, set before bentoml is imported anywhere.
        os.environ["BENTOML_HOME"] = str(workdir / "bentoml")
    cfg = load_params(args.params)
    args.backend = args.backend or cfg.serve.backend
    tag = args.bento_tag or store_untrained_model(cfg, args.model, args.image_size, workdir)
    print(f"model {tag} ({args.bento_tag or args.model}), backend {args.backend}; "
          f"{os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} before the run on {platform.node()}",
          flush=True)
    payloads = photos(args.images, args.image_size)
    results: list[Result] = []
    try:
        for name in args.servers:
            params = workdir / f"{name}.params.yaml"
            serve_cfg = {"batching": name != "bentoml-nobatch", "backend": args.backend,
                         "monitoring": {"enabled": name != "bentoml-nomonitor",
                                        "log_path": str(workdir / "monitoring")}}  # fmt: skip
            OmegaConf.save(OmegaConf.merge(cfg, {"serve": serve_cfg}), params)
            print(f"{name}: {SERVERS[name]}", flush=True)
            with running(name, tag, params, workdir) as (url, root):
                results += measure(name, url, root, args, payloads)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": sys.argv, "model": tag,
                                        "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
