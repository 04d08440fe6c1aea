"""The console's view of the configuration server: an async `call` over D-Bus.

dbus-python blocks, so `ThreadedClient` runs every `Config1Client` call on one worker
thread of its own (one connection, used from one thread only) and awaits the result;
the UI's event loop never waits on the bus. Screens depend on the `ConsoleClient`
protocol, so tests hand them a fake with the same shape.

Failures keep the shape `DBusCallError` gives them (`.name`, `.message`); `describe`
turns any failure into the one line (and hint) the operator reads, with the same
wording as secondsitectl.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, Protocol

from appliance.ctl.commands import translate

SETUP_ERROR = "org.secondsite.Setup1.Error."
# The setup service is not there, or the bus would not let us call it.
SETUP_UNREACHABLE = frozenset(
    {
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
        "org.freedesktop.DBus.Error.NoReply",
        "org.freedesktop.DBus.Error.AccessDenied",
        "org.secondsite.Client.Error.NoBus",
    }
)


class ConsoleClient(Protocol):
    """What the screens need of a service (Config1, Setup1)."""

    async def call(self, method: str, *args: Any) -> Any: ...

    def close(self) -> None: ...


class BlockingClient(Protocol):
    def call(self, method: str, *args: Any) -> Any: ...

    def close(self) -> None: ...


def _config1(bus_address: str | None) -> BlockingClient:
    from appliance.dbus.client import Config1Client  # pulls in dbus-python

    return Config1Client(bus_address)


def _setup1(bus_address: str | None) -> BlockingClient:
    from appliance.setup.client import Setup1Client

    return Setup1Client(bus_address)


class ThreadedClient:
    """A blocking client (`Config1Client` unless `connect` says otherwise) behind a
    single-thread executor; connects on first use, so the console starts (and says
    what is wrong) even when the bus is not there yet."""

    def __init__(
        self,
        bus_address: str | None = None,
        connect: Callable[[str | None], BlockingClient] = _config1,
    ) -> None:
        self.bus_address = bus_address
        self._connect = connect
        self._client: BlockingClient | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dbus")

    async def call(self, method: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, method, args)

    def _call(self, method: str, args: tuple[Any, ...]) -> Any:
        if self._client is None:
            self._client = self._connect(self.bus_address)
        return self._client.call(method, *args)

    def close(self) -> None:
        # The connection is closed on its own thread, after any call still running
        # (which ends with its own timeout); the UI does not wait for either.
        self._pool.submit(self._close)
        self._pool.shutdown(wait=False)

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def describe(exc: BaseException, bus: str | None = None) -> str | None:
    """The operator's line for a failed call, or None when it is a bug (re-raise it)."""
    error = translate(exc, bus)
    if error is None:
        return None
    return f"{error.message} ({error.hint})" if error.hint else error.message


def setup_client(bus_address: str | None = None) -> ThreadedClient:
    """The setup service (org.secondsite.Setup1), connected on first use."""
    return ThreadedClient(bus_address, _setup1)


def describe_setup(exc: BaseException) -> str | None:
    """The operator's line for a failed Setup1 call, or None when it is a bug."""
    name, message = getattr(exc, "name", None), getattr(exc, "message", None)
    if not isinstance(name, str) or not isinstance(message, str):
        return None
    if name.startswith(SETUP_ERROR):
        return message  # the service's own words: what was refused and why
    if name in SETUP_UNREACHABLE or name.startswith("org.freedesktop.DBus.Error.Spawn"):
        return (
            f"setup service unreachable: {message} (run the console as root or a "
            "secondsite member; systemctl status secondsite-setupd)"
        )
    return f"{name}: {message}"


def records(answer: object) -> list[dict[str, Any]]:
    """A list answer's records; a server ahead of us may add what we do not know."""
    return [r for r in answer if isinstance(r, dict)] if isinstance(answer, list) else []


def record(answer: object) -> dict[str, Any]:
    return answer if isinstance(answer, dict) else {}
