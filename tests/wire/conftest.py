"""Fixtures for the wire suites: both event loops, and TLS contexts from the shared PKI."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

import pytest
import uvloop

from appliance.wire.tls import client_context, server_context
from tests.conftest import TlsMaterial

T = TypeVar("T")

LOOPS = ("asyncio", "uvloop")


class Runner(Protocol):
    def __call__(self, coro: Coroutine[Any, Any, T], /) -> T: ...


def _runner(kind: str) -> Runner:
    def run(coro: Coroutine[Any, Any, T]) -> T:
        if kind == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)

    return run


@pytest.fixture(params=LOOPS)
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a coroutine on a fresh event loop; every test using it runs on both loops."""
    return _runner(str(request.param))


@pytest.fixture
def run_uvloop() -> Runner:
    return _runner("uvloop")


@pytest.fixture
def server_ctx(tls: TlsMaterial) -> ssl.SSLContext:
    return server_context(tls.server.cert, tls.server.key, tls.ca.cert)


@pytest.fixture
def client_ctx(tls: TlsMaterial) -> ssl.SSLContext:
    return client_context(tls.client.cert, tls.client.key, tls.ca.cert)
