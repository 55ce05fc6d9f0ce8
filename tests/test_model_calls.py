"""The API service's call to the model service (service.py ``_call_model``): a dropped or
stalled call is repeated, each attempt is bounded, a model error is not repeated, and the
end is a 503 well inside the request timeout. The soak test (``-m soak``) shows it under load."""

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

from conftest import PROJECT_ROOT
from pox_pipeline import serve
from serve_helpers import save_champion

STALL_S = 30.0


@pytest.fixture(scope="module")
def service_module():
    """service.py imported as ``bentoml serve`` does."""
    save_champion()  # service.py names the stored champion when it is imported
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(serve.PARAMS_ENV, str(PROJECT_ROOT / "params.yaml"))
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


def caller(settings: serve.ServeConfig, *outcomes: object, **changes: object) -> SimpleNamespace:
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


def test_a_stalled_call_ends_in_a_503_within_the_attempts_bound(call_model) -> None:
    call, settings = call_model
    fake = caller(settings, "stall", "stall", model_call_attempts=2, model_call_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="2 attempts"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 2 and time.monotonic() - started < 2.0


def test_a_model_error_is_not_repeated(call_model) -> None:
    call, settings = call_model
    fake = caller(settings, BentoMLException("the model failed"), np.ones(1), model_call_attempts=3)
    with pytest.raises(BentoMLException, match="the model failed"):
        asyncio.run(call(fake, "infer", images=np.zeros(1)))
    assert len(fake.calls) == 1
