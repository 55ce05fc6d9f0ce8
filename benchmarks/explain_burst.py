"""/predict latency alone and under a burst of /explain, with and without /explain's own limit.

/explain runs Grad-CAM unbatched (eager Keras, a gradient pass). One run starts two BentoML
services of the same champion, both running, measured in alternating rounds so that their
ratios compare like with like on a shared machine:

- ``limit``: ``serve.explain`` as in the params (by default 1 at the model, 4 waiting, the rest
  429 with Retry-After);
- ``nolimit``: ``serve.explain.max_concurrent`` = the burst's clients (every /explain goes on
  to the model at once, as before the limit).

In each round, each service gets ``--predict-clients`` clients posting 224-px JPEGs to /predict
back to back, first alone, then beside ``--explain-clients`` clients posting the same photos to
/explain back to back (a refused one is re-sent at once, the worst case for /predict, or with
``--retry-after`` after the seconds its Retry-After header says, as a polite client would). It
prints /predict's requests/s, p50 and p99, /explain's answers/s, refusals and p50, then the
ratios: p99 under the burst / alone for each service, and limit / nolimit under the burst.
Monitoring is off (it is not what is measured); servers are stopped by pid.

The champion is, by default, EfficientNet-Lite0 with its ImageNet backbone and an untrained
head, published as serve_bench.py publishes it (TFLite fp32 for /predict; Grad-CAM always
runs on Keras) in a temporary BentoML store; ``--bento-tag`` measures a stored champion.

examples:
  python benchmarks/explain_burst.py
  python benchmarks/explain_burst.py --model cnn --duration 20 --rounds 2
  python benchmarks/explain_burst.py --bento-tag pox-classifier:latest
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_bench import PROJECT_ROOT, running, small_photos, store_untrained_model  # noqa: E402

from pox_pipeline.common.params import load_params  # noqa: E402

SERVERS = ("limit", "nolimit")
PHASES = ("alone", "burst")
REQUEST_TIMEOUT_S = 120


@dataclass
class Tally:
    """What one server's clients saw in one phase, summed over the rounds."""

    predict_ms: list[float] = field(default_factory=list)
    predict_errors: int = 0
    explain_ms: list[float] = field(default_factory=list)
    explain_refused: int = 0
    explain_errors: int = 0
    error_statuses: Counter = field(default_factory=Counter)  # 0: no answer (connection, timeout)
    seconds: float = 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", choices=["efficientnet_lite0", "efficientnet_lite", "cnn",
                                            "vgg16"], default="efficientnet_lite0",
                        help="build and publish this model entry (default: efficientnet_lite0, "
                             "the MSLD champion's family)")  # fmt: skip
    source.add_argument("--bento-tag", help="benchmark this model of the BentoML store instead")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--predict-clients", type=int, default=2,
                        help="concurrent /predict clients (default: 2)")
    parser.add_argument("--explain-clients", type=int, default=8,
                        help="concurrent /explain clients of the burst (default: 8)")
    parser.add_argument("--duration", type=float, default=20.0,
                        help="seconds of each phase per server and round (default: 20)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating rounds of the two servers (default: 2)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of unmeasured /predict + /explain before (default: 5)")
    parser.add_argument("--retry-after", action="store_true",
                        help="a refused /explain waits its Retry-After before it is re-sent "
                             "(default: re-sent at once)")
    parser.add_argument("--backend", default="tflite_fp32",
                        help="serve.backend of /predict (default: tflite_fp32)")
    parser.add_argument("--params", type=Path, default=PROJECT_ROOT / "params.yaml")
    return parser.parse_args(argv)


def server_params(cfg: DictConfig, name: str, args: argparse.Namespace, workdir: Path) -> Path:
    explain = dict(cfg.serve.explain)
    if name == "nolimit":
        explain = {"max_concurrent": args.explain_clients, "max_waiting": 0}
    params = workdir / f"{name}.params.yaml"
    serve_cfg = {"backend": args.backend, "explain": explain,
                 "monitoring": {"enabled": False}}  # fmt: skip
    OmegaConf.save(OmegaConf.merge(cfg, {"serve": serve_cfg}), params)
    return params


def post_loop(url: str, route: str, photos: list[bytes], deadline: float, offset: int,
              tally: Tally, lock: threading.Lock, polite: bool) -> None:  # fmt: skip
    """Post photos to ``route`` back to back until ``deadline``; a 429 is re-sent at once, or
    (``polite``) after its Retry-After."""
    with requests.Session() as session:
        sent = offset
        while time.monotonic() < deadline:
            files = {"image": ("photo.jpg", photos[sent % len(photos)], "image/jpeg")}
            began = time.perf_counter()
            retry_after = 0.0
            try:
                response = session.post(f"{url}{route}", files=files, timeout=REQUEST_TIMEOUT_S)
                status = response.status_code
                retry_after = float(response.headers.get("Retry-After", 0)) if polite else 0.0
            except requests.RequestException:
                status = 0
            ms = (time.perf_counter() - began) * 1000
            sent += 1
            with lock:
                if status not in (200, 429) or route == "/predict" and status != 200:
                    tally.error_statuses[f"{route} {status}"] += 1
                if route == "/predict":
                    if status == 200:
                        tally.predict_ms.append(ms)
                    else:
                        tally.predict_errors += 1
                elif status == 200:
                    tally.explain_ms.append(ms)
                elif status == 429:
                    tally.explain_refused += 1
                else:
                    tally.explain_errors += 1
            time.sleep(max(0.0, min(retry_after, deadline - time.monotonic())))


def drive(url: str, photos: list[bytes], predict_clients: int, explain_clients: int,
          seconds: float, tally: Tally, polite: bool = False) -> None:  # fmt: skip
    """``predict_clients`` on /predict beside ``explain_clients`` on /explain for ``seconds``."""
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    routes = ["/predict"] * predict_clients + ["/explain"] * explain_clients
    with ThreadPoolExecutor(len(routes)) as pool:
        clients = [pool.submit(post_loop, url, route, photos, deadline, index, tally, lock,
                               polite) for index, route in enumerate(routes)]  # fmt: skip
        for client in clients:
            client.result()  # a client's own failure surfaces here
    tally.seconds += time.monotonic() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def report(tallies: dict[tuple[str, str], Tally], args: argparse.Namespace) -> str:
    lines = [f"{'server':<9}{'phase':<7}{'predict/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
             f"{'errors':>8}{'explain/s':>11}{'refused/s':>11}{'p50 ms':>9}{'errors':>8}"]
    for (server, phase), t in tallies.items():
        lines.append(
            f"{server:<9}{phase:<7}{len(t.predict_ms) / t.seconds:>10.2f}"
            f"{percentile(t.predict_ms, 50):>9.0f}{percentile(t.predict_ms, 99):>9.0f}"
            f"{t.predict_errors:>8}{len(t.explain_ms) / t.seconds:>11.2f}"
            f"{t.explain_refused / t.seconds:>11.2f}{percentile(t.explain_ms, 50):>9.0f}"
            f"{t.explain_errors:>8}"
        )
    errors = sum((t.error_statuses for t in tallies.values()), Counter())
    if errors:
        lines.append("errors by route and status: " + ", ".join(f"{key} x{count}"
                                                               for key, count in errors.items()))
    p99 = {key: percentile(t.predict_ms, 99) for key, t in tallies.items()}
    p50 = {key: percentile(t.predict_ms, 50) for key, t in tallies.items()}
    lines.append("")
    resend = "after Retry-After" if args.retry_after else "at once"
    lines.append(f"/predict ({args.predict_clients} clients) beside {args.explain_clients} "
                 f"/explain clients (a 429 re-sent {resend}), ratios:")  # fmt: skip
    for server in SERVERS:
        burst, alone = (server, "burst"), (server, "alone")
        lines.append(f"  {server:<8} burst / alone: p50 {p50[burst] / p50[alone]:.2f}x, "
                     f"p99 {p99[burst] / p99[alone]:.2f}x")  # fmt: skip
    lines.append(f"  under the burst, limit / nolimit: p50 "
                 f"{p50['limit', 'burst'] / p50['nolimit', 'burst']:.2f}x, p99 "
                 f"{p99['limit', 'burst'] / p99['nolimit', 'burst']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pox-explain-burst-"))
    if args.bento_tag is None:
        os.environ["BENTOML_HOME"] = str(workdir / "bentoml")  # before bentoml is imported
    cfg = load_params(args.params)
    try:
        tag = args.bento_tag or store_untrained_model(cfg, args.model, args.image_size, workdir)
        photos = small_photos(None, args.image_size)
        print(f"model {tag} ({args.bento_tag or args.model}); {os.cpu_count()} CPUs, load "
              f"average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; serve.explain of "
              f"limit: {dict(cfg.serve.explain)}", flush=True)  # fmt: skip
        tallies = {(server, phase): Tally() for server in SERVERS for phase in PHASES}
        with ExitStack() as stack:
            urls = {}
            for name in SERVERS:
                params = server_params(cfg, name, args, workdir)
                urls[name] = stack.enter_context(running(name, tag, params, workdir))[0]
            for url in urls.values():  # trace, train the batcher
                drive(url, photos, args.predict_clients, args.explain_clients, args.warmup,
                      Tally())  # fmt: skip
            for round_ in range(args.rounds):
                for name in SERVERS[:: 1 if round_ % 2 == 0 else -1]:
                    for phase in PHASES:
                        burst = args.explain_clients if phase == "burst" else 0
                        drive(urls[name], photos, args.predict_clients, burst, args.duration,
                              tallies[name, phase], args.retry_after)  # fmt: skip
                        t = tallies[name, phase]
                        print(f"  round {round_ + 1} {name:<8} {phase:<6} predict p99 so far "
                              f"{percentile(t.predict_ms, 99):.0f} ms", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(report(tallies, args))


if __name__ == "__main__":
    main()
