"""Fixtures for the tests that run the driver over loopback sockets; import them by name.

    from tests.loopback import anyio_backend, collect_garbage, no_proxy_env  # noqa: F401

A fixture imported into a test module is that module's own, so each module says what it
wants; `collect_garbage` and `no_proxy_env` are autouse where imported.
"""

from __future__ import annotations

import gc

import pytest

PROXY_VARIABLES = ("HTTPS_PROXY", "ALL_PROXY", "HTTP_PROXY", "NO_PROXY")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every test of the module once on asyncio and once on trio."""
    return str(request.param)


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collect after each test: an unclosed stream or socket warns when it is collected (an
    error in this project), so the warning fails the test that leaked it."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx and the client follow HTTPS_PROXY/ALL_PROXY by default; the tests choose."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
