"""The BentoML service: ``bentoml serve service:PoxClassifier`` (``make serve``).

Two services run together. ``PoxClassifier`` owns HTTP: it decodes uploads (bad ones get a
4xx JSON reason), formats answers and serves the web page. ``PoxModel`` owns the model,
loaded once, and batches concurrent requests adaptively. The split is how BentoML batches file
uploads: a batchable API takes arrays, and an API cannot call another API of its own service,
so the route decodes the file and calls the model service's batchable API with the array.
Settings come from the ``serve`` section of ``params.yaml`` (or ``$POX_PARAMS``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable
from PIL import Image
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

# A built Bento (and its container) ships the package as source under src/, not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from pox_pipeline import serving  # noqa: E402
from pox_pipeline.common.preprocess import ImageError  # noqa: E402
from pox_pipeline.serving import model_card, monitor, upload_guard  # noqa: E402
from pox_pipeline.serving.policy import DecisionPolicy  # noqa: E402
from pox_pipeline.serving.predictor import Predictor, render_heatmap, split_ood_score
from pox_pipeline.serving.settings import ExplainConfig, ServeConfig
from pox_pipeline.serving.uploads import http_status, load_upload, open_upload_dir

SETTINGS = ServeConfig.load()
CHAMPION = bentoml.models.BentoModel(SETTINGS.model_tag)
STATIC_DIR = Path(serving.__file__).parent / "static"
logger = logging.getLogger("bentoml.service")
# Decodes run in these threads only: a decode may take ~200 MB (serve.max_decode_pixels), so
# their number bounds the API worker's memory; a request waiting for one holds no image.
DECODES = ThreadPoolExecutor(SETTINGS.max_concurrent_decodes, thread_name_prefix="pox-decode")
# What one request body may be (upload_guard.py): /predict_batch takes several files.
ONE_FILE = upload_guard.BodyLimits(
    1, SETTINGS.max_upload_bytes, SETTINGS.request_body_timeout_s, SETTINGS.max_request_bytes
)
# BentoML's access log is off unless serve.access_log; when on, without the client's address.
ACCESS_LOG = {"access": {"enabled": SETTINGS.access_log}}


class NoClientAddress(logging.Filter):
    """Drops the client's ``IP:port`` that BentoML's access log puts first in each line
    (bentoml/_internal/server/http/access.py): uploads are health data."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = ("-", *record.args[1:])
        return True


logging.getLogger("bentoml.access").addFilter(NoClientAddress())


def served_policy(stored: bentoml.Model) -> DecisionPolicy:
    """The champion's decision policy with this site's ``serve.threshold_override`` (if any)
    applied."""
    return DecisionPolicy.from_stored(stored).with_threshold_override(
        SETTINGS.threshold_override
    )


class ModelRef(BaseModel):
    """Which model answered: the BentoML model and the MLflow run that trained it."""

    name: str
    version: str
    mlflow_run_id: str | None = None


class OODCheck(BaseModel):
    """The out-of-distribution guard's reading of the photo."""

    checked: bool = Field(description="false: no guard shipped with the model, or it is off")
    score: float | None = Field(None, description="distance / limit; above 1 is out")


class Answer(BaseModel):
    """One photo's answer (``/predict``, each item of ``/predict_batch``)."""

    label: str | None = Field(
        description="the decided class; null when in_distribution is false (no label is given)"
    )
    probability: float | None = Field(
        description="the calibrated probability of `label`; null when in_distribution is false"
    )
    threshold: float | None = Field(
        description="binary models: the positive class is decided at or above this probability"
    )
    probabilities: dict[str, float] | None = Field(
        description="every class's calibrated probability; null when in_distribution is false "
        "(a rejected image's scores mean nothing: read `ood` and `ood_reason` instead)"
    )
    model: ModelRef
    in_distribution: bool = Field(description="false: the photo is unlike the training photos")
    ood: OODCheck
    ood_reason: str | None = Field(None, description="why the photo got no label")
    explanation: str = Field(description="the decision in plain words")


class ExplainedAnswer(Answer):
    """The ``/predict`` answer plus the Grad-CAM heatmap over the photo."""

    heatmap_png_base64: str | None = Field(
        description="the photo with the heatmap blended in, as PNG; null when in_distribution "
        "is false (a map of what drove a score the service does not give explains nothing)"
    )


# BentoML's client to a dependency replaces its HTTP session after `max_requests` calls (100 by
# default) or `max_age` seconds and closes the old session under the calls still in flight on
# it (_bentoml_impl/client/proxy2.py, SessionManager.get_session): they fail with "Connection
# closed." / "Connector is closed." (issue 11, item 4). The refresh spreads connections over
# remote replicas behind one address; the model service here is a local process, so one
# session lives as long as the API worker.
ONE_SESSION = {"max_requests": 2**31 - 1, "max_age": float(2**31)}
# What a dropped connection to the model service raises: aiohttp's connection errors and its
# RuntimeError "Connection closed." (a body read on a closed connection). Only these are re-sent:
# the call never reached the model, or its answer was lost with the connection. A timeout is
# not among them (aiohttp's ServerTimeoutError is a connection error too, caught first): the
# batcher may still hold the call, and re-sending it would double the load when it is highest.
DROPPED_CONNECTION = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, RuntimeError)
# Grad-CAM runs on a thread of its own in each model process. A sync API would run on the
# service's `threads` (serve.model_threads), the ones the batches run on: each unbatched, eager
# Grad-CAM held every /predict batch behind it (benchmarks/explain_burst.py, docs/serving.md).
GRADCAM_THREAD = ThreadPoolExecutor(1, thread_name_prefix="gradcam")


@bentoml.service(
    name="pox-model",
    workers=SETTINGS.model_workers,
    threads=SETTINGS.model_threads,
    traffic={"timeout": SETTINGS.timeout_s},
    logging=ACCESS_LOG,
    runner_connection=ONE_SESSION,
)
class PoxModel:
    """The champion model; its inputs are preprocessed float32 arrays, never files."""

    model = CHAMPION

    def __init__(self) -> None:
        self.predictor = Predictor.from_stored(
            self.model,
            SETTINGS.backend,
            SETTINGS.tflite_threads,
            SETTINGS.guard_enabled,
            SETTINGS.monitoring.enabled,
            SETTINGS.batch_sizes,
        )

    @bentoml.api(
        batchable=SETTINGS.batching,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Model outputs for a (N, S, S, 3) batch (averaged over the champion's TTA views),
        plus a column: each image's out-of-distribution score (above 1: out; nan: no check), then
        the monitored columns when monitoring is on; concurrent calls are merged into one."""
        return self.predictor.outputs_with_monitoring(images)

    @bentoml.api
    async def gradcam(self, image: np.ndarray) -> np.ndarray:
        """Grad-CAM map (or input-gradient saliency) of the positive class for one (S, S, 3)
        image, in [0, 1]; on :data:`GRADCAM_THREAD`, beside the batches."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(GRADCAM_THREAD, self.predictor.gradcam, image)


class EntryPoints:
    """``/`` opens the web page; ``/docs`` shows BentoML's OpenAPI page (BentoML's own ``/``)."""

    def __init__(self, app: ASGIApp, ui_path: str) -> None:
        self.app = app
        self.ui_path = ui_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            if scope["path"] == "/":
                await RedirectResponse(f"{self.ui_path}/")(scope, receive, send)
                return
            if scope["path"] == "/docs":
                scope = {**scope, "path": "/", "raw_path": b"/"}
        await self.app(scope, receive, send)


def web_page() -> Starlette:
    """The static page in ``pox_pipeline/static`` (plain HTML/JS/CSS, nothing fetched online)."""
    return Starlette(routes=[Mount("/", StaticFiles(directory=STATIC_DIR, html=True))])


class ModelCardPage:
    """``GET /model-card``: the champion's model card as HTML, rendered from its metadata."""

    PATH = "/model-card"

    def __init__(self, app: ASGIApp, ui_path: str) -> None:
        self.app = app
        self.ui_path = ui_path
        self.page: HTMLResponse | None = None  # rendered on the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        wanted = scope["type"] == "http" and scope["method"] in ("GET", "HEAD")
        if not (wanted and scope["path"].rstrip("/") == self.PATH):
            await self.app(scope, receive, send)
            return
        if self.page is None:
            stored = CHAMPION.resolve()
            metadata = model_card.with_site_override(
                stored.info.metadata, SETTINGS.threshold_override, SETTINGS.backend
            )
            html = model_card.render(stored.tag.name, metadata, "html", self.ui_path)
            self.page = HTMLResponse(html)
        await self.page(scope, receive, send)


class ExplainBusy(Exception):
    """Every /explain turn is taken and the queue is full: refused at once."""


class ExplainLimit:
    """``serve.explain``: at most ``max_concurrent`` /explain requests at the model at once and
    ``max_waiting`` more waiting for a turn, per API worker; the rest are refused at once.

    A burst of /explain then queues here, in the API process, instead of in the model process
    ahead of /predict's batches. A request is counted from its arrival, so one that will be
    refused costs no decode; it decodes while it waits, and holds a turn only at the model.
    """

    def __init__(self, settings: ExplainConfig) -> None:
        self.settings = settings
        self._turns = asyncio.Semaphore(settings.max_concurrent)
        self._admitted = 0
        self._turn_s = 1.0  # a turn's duration, smoothed: what Retry-After is made of

    @property
    def retry_after_s(self) -> int:
        """Seconds until the requests admitted now have likely had their turns (at least 1)."""
        rounds = self._admitted / self.settings.max_concurrent
        return max(1, math.ceil(rounds * self._turn_s))

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a request in while it is inside; :class:`ExplainBusy` when full."""
        if self._admitted >= self.settings.max_concurrent + self.settings.max_waiting:
            raise ExplainBusy
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Wait for one of the ``max_concurrent`` turns at the model (inside :meth:`admitted`)."""
        async with self._turns:
            started = time.monotonic()
            try:
                yield
            finally:
                self._turn_s = 0.8 * self._turn_s + 0.2 * (time.monotonic() - started)

    def busy(self) -> JSONResponse:
        """The refusal: 429 with Retry-After and the reason."""
        seconds = self.retry_after_s
        return JSONResponse(
            {"error": f"/explain is busy: {self._admitted} requests are being explained or "
                      f"waiting, the limit is {self.settings.max_concurrent} + "
                      f"{self.settings.max_waiting} waiting (serve.explain); retry in "
                      f"{seconds} s (/predict is not limited by this)"},
            status_code=429, headers={"Retry-After": str(seconds)},
        )  # fmt: skip


def rejection(error: ImageError, which: str = "") -> JSONResponse:
    """A bad upload's answer (413 over the limits, 415 in no accepted format, else 400), with
    the reason as ``error``.

    Returned, not raised as ``bentoml.exceptions.InvalidArgument``: BentoML 1.4.40 wraps a
    raised 4xx's body in a list (``[{"error": ...}]``, _bentoml_impl/server/app.py) and has no
    413 error type."""
    reason = f"{which}: {error}" if which else str(error)
    return JSONResponse({"error": reason}, status_code=http_status(error))


@bentoml.asgi_app(web_page(), path=SETTINGS.ui_path, name="web-page")
@bentoml.service(
    name="pox-classifier",
    workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging=ACCESS_LOG,
    http={"host": SETTINGS.host, "port": SETTINGS.port},
)
class PoxClassifier:
    """Classifies skin-lesion photos as the champion's classes. Not a diagnosis."""

    model_service = bentoml.depends(PoxModel)

    def __init__(self) -> None:
        self.settings = SETTINGS
        if SETTINGS.store_uploads:  # kept photos past their retention go at start
            open_upload_dir(SETTINGS.upload_dir, SETTINGS.upload_retention_days)
        self.policy = served_policy(CHAMPION.resolve())
        self.monitor = monitor.ServiceMonitor(
            SETTINGS.monitoring, Path(CHAMPION.resolve().path), self.policy
        )

    def __metrics__(self, exposition: str) -> str:
        """BentoML's ``/metrics`` plus whether answers are recorded (and why not) and the last
        ``pox monitor`` result, as gauges; never fails because of a report file."""
        return self.monitor.metrics_text(exposition)

    def _rejected(self, response: JSONResponse) -> JSONResponse:
        self.monitor.rejected(response.status_code)
        return response

    async def _load(self, upload: Path) -> tuple[Image.Image, np.ndarray]:
        """Decode in one of :data:`DECODES`' threads; raises ImageError with a reason for the
        client. The upload is read there too, so a request waiting for a thread holds no bytes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            DECODES, load_upload, upload, self.settings, self.policy
        )

    async def _call_model(self, api: str, **inputs: np.ndarray) -> np.ndarray:
        """Call the model service: a call lost with its connection is re-sent (inference has
        no side effects), up to ``serve.model_call_attempts`` attempts; one that outlasts
        ``serve.model_call_timeout_s`` (longer than the batcher may hold it, ServeConfig checks)
        is not. Either way the end is a 503, before the request's own timeout."""
        call = getattr(self.model_service.to_async, api)
        attempts = self.settings.model_call_attempts
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.settings.model_call_timeout_s):
                    return await call(**inputs)
            except TimeoutError:
                raise ServiceUnavailable(
                    f"the model service did not answer {api!r} within "
                    f"{self.settings.model_call_timeout_s:g} s (not re-sent: it may still run)"
                ) from None
            except DROPPED_CONNECTION as error:
                failure = f"{type(error).__name__}: {error}"
                if attempt < attempts:
                    logger.warning("model call %r failed (%s); retrying", api, failure)
        raise ServiceUnavailable(
            f"the model service did not answer {api!r} in {attempts} attempts ({failure})"
        )

    async def _answers(self, batch: np.ndarray, endpoint: str) -> list[dict]:
        """The answers for a batch of model inputs, each recorded by the monitor."""
        # uint8 model inputs (load_upload): exactly the photo's values in a quarter of
        # float32's bytes between the two processes; the model process converts them.
        scored, columns = self.monitor.split(await self._call_model("infer", images=batch))
        answers = self.policy.results(*split_ood_score(scored))
        self.monitor.record(endpoint, answers, columns)
        return answers

    @bentoml.api
    async def predict(self, image: Path) -> Answer:
        """One photo (multipart field ``image``) -> label, probability, threshold,
        probabilities per class and the model's name, version and MLflow run."""
        try:
            _, array = await self._load(image)
        except ImageError as error:
            return self._rejected(rejection(error))
        return Answer(**(await self._answers(array[None], "predict"))[0])

    @bentoml.api
    async def predict_batch(self, images: list[Path]) -> list[Answer]:
        """Several photos (repeated multipart field ``images``) -> one answer each, in order."""
        limit = self.settings.max_images_per_request
        if len(images) > limit:
            return self._rejected(JSONResponse(
                {"error": f"{len(images)} images sent; the limit is {limit} per request"},
                status_code=413,
            ))  # fmt: skip
        arrays = []
        for number, upload in enumerate(images, 1):
            try:
                arrays.append((await self._load(upload))[1])
            except ImageError as error:
                return self._rejected(rejection(error, f"image {number} of {len(images)}"))
        answers = await self._answers(np.stack(arrays), "predict_batch")
        return [Answer(**result) for result in answers]

    @functools.cached_property
    def explain_limit(self) -> ExplainLimit:
        """This worker's /explain limit (made on first use, on the event loop that uses it)."""
        return ExplainLimit(self.settings.explain)

    @bentoml.api
    async def explain(self, image: Path) -> ExplainedAnswer:
        """The ``/predict`` answer plus ``heatmap_png_base64``: the Grad-CAM map of the
        positive class over the photo (input-gradient saliency for a model without Conv2D,
        such as ``colour_texture``), as a base64 PNG. Over ``serve.explain``'s limit: 429
        with Retry-After."""
        limit = self.explain_limit
        try:
            with limit.admitted():
                photo, array = await self._load(image)
                async with limit.turn():
                    answers, cam = await asyncio.gather(
                        self._answers(array[None], "explain"),
                        self._call_model("gradcam", image=array),
                    )
        except ExplainBusy:
            return self._rejected(limit.busy())
        except ImageError as error:
            return self._rejected(rejection(error))
        result = answers[0]
        if not result["in_distribution"]:  # no label, no probabilities: nothing to explain
            return ExplainedAnswer(**result, heatmap_png_base64=None)
        png = await asyncio.to_thread(render_heatmap, photo, cam, self.settings.heatmap)
        return ExplainedAnswer(**result, heatmap_png_base64=base64.b64encode(png).decode("ascii"))


PoxClassifier.add_asgi_middleware(EntryPoints, ui_path=SETTINGS.ui_path)
PoxClassifier.add_asgi_middleware(ModelCardPage, ui_path=SETTINGS.ui_path)
PoxClassifier.add_asgi_middleware(
    upload_guard.UploadGuard,
    default=ONE_FILE,
    routes={"/predict_batch": dataclasses.replace(ONE_FILE, files=SETTINGS.max_images_per_request)},
)
