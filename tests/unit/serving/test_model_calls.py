"""The API service's call to the model service (service.py ``_call_model``): a call lost with
its connection is re-sent; a timed-out call and a model error are not; the end is a 503 inside
the request timeout, and no timeout shorter than the batcher's bound is accepted. The soak test
(``-m soak``) shows it under load."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import time
from types import SimpleNamespace

import aiohttp
import numpy as np
import pytest
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from helpers.serve import save_champion
from helpers.suite import PROJECT_ROOT
from pox_pipeline.common.config import compose
from pox_pipeline.common.params import PARAMS_ENV
from pox_pipeline.serving.settings import ServeConfig

STALL_S = 30.0


@pytest.fixture(scope="module")
def service_module():
    """service.py imported as ``bentoml serve`` does."""
    save_champion()  # service.py names the stored champion when it is imported
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PARAMS_ENV, str(PROJECT_ROOT / "params.yaml"))
        patch.syspath_prepend(str(PROJECT_ROOT))
        return importlib.import_module("service")


@pytest.fixture(scope="module")
def call_model(service_module):
    """``PoxClassifier._call_model``, unbound (the class as written, not served)."""
    return service_module.PoxClassifier.inner._call_model, service_module.SETTINGS


def test_the_model_client_keeps_one_session(service_module) -> None:
    """BentoML's dependency client, configured as served, never replaces its HTTP session (the
    replacement closed calls in flight: the 500s and the 504s of issue 11)."""
    from _bentoml_impl.client import RemoteProxy

    module = service_module
    module.PoxClassifier.inject_config()
    proxy = RemoteProxy("http://127.0.0.1:1", service=module.PoxModel)
    manager = proxy.to_async._session_manager
    assert manager.max_requests == module.ONE_SESSION["max_requests"] > 10**9
    assert manager.max_age == module.ONE_SESSION["max_age"] > 10**9


def caller(settings: ServeConfig, *outcomes: object, **changes: object) -> SimpleNamespace:
    """A stand-in API service whose model service answers with ``outcomes`` in turn: an
    exception is raised, "stall" never answers, anything else is returned."""
    calls = []

    async def infer(**inputs: np.ndarray) -> object:
        outcome = outcomes[len(calls)]
        calls.append(inputs)
        if outcome == "stall":
            await asyncio.sleep(STALL_S)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    model_service = SimpleNamespace(to_async=SimpleNamespace(infer=infer))
    return SimpleNamespace(settings=dataclasses.replace(settings, **changes),
                           model_service=model_service, calls=calls)


def test_a_dropped_connection_is_retried(call_model) -> None:
    call, settings = call_model
    answer = np.ones((1, 1))
    for dropped in (RuntimeError("Connection closed."), aiohttp.ServerDisconnectedError(),
                    aiohttp.ClientConnectionError("Connector is closed.")):
        fake = caller(settings, dropped, answer, model_call_attempts=3)
        assert asyncio.run(call(fake, "infer", images=answer)) is answer
        assert len(fake.calls) == 2


def test_a_dropped_connection_is_retried_only_up_to_the_attempts(call_model) -> None:
    call, settings = call_model
    dropped = aiohttp.ServerDisconnectedError()
    fake = caller(settings, dropped, dropped, np.ones(1), model_call_attempts=2)
    with pytest.raises(ServiceUnavailable, match="2 attempts"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 2


def test_a_timed_out_call_is_not_re_sent(call_model) -> None:
    """The batcher may still hold it: a re-send would add load when the service is slowest."""
    call, settings = call_model
    quick = {"model_call_attempts": 3, "model_call_timeout_s": 0.2, "max_latency_ms": 100}
    fake = caller(settings, "stall", np.ones(1), **quick)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="not re-sent"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 1 and time.monotonic() - started < 2.0
    # aiohttp's own read timeout is a connection error too, and is not re-sent either
    fake = caller(settings, aiohttp.ServerTimeoutError("read timeout"), np.ones(1), **quick)
    with pytest.raises(ServiceUnavailable, match="not re-sent"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 1


def test_no_call_timeout_shorter_than_the_batchers_bound_is_accepted() -> None:
    shipped = ServeConfig.from_cfg(compose().serve)
    assert shipped.max_latency_ms < 1000 * shipped.model_call_timeout_s < 1000 * shipped.timeout_s
    for wrong in ({"model_call_timeout_s": shipped.max_latency_ms / 1000},  # the old 10 s < 30 s
                  {"model_call_timeout_s": 10.0},
                  {"model_call_timeout_s": shipped.timeout_s}):  # fmt: skip
        with pytest.raises(ValueError, match="max_latency_ms"):
            dataclasses.replace(shipped, **wrong)


def test_a_model_error_is_not_repeated(call_model) -> None:
    call, settings = call_model
    fake = caller(settings, BentoMLException("the model failed"), np.ones(1), model_call_attempts=3)
    with pytest.raises(BentoMLException, match="the model failed"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 1
