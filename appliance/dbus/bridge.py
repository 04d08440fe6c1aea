"""From a D-Bus method call on the GLib thread to a coroutine on the asyncio loop, and back.

A method declared with `async_callbacks=("reply", "error")` hands its work to
`CallBridge.submit`: the coroutine runs on the asyncio loop
(`run_coroutine_threadsafe`), and its outcome is delivered on the GLib thread, so
dbus-python objects are only ever touched there. Neither thread ever waits for the
other while serving a call.

Records cross as a{sv}: see `to_dbus_record` for the value types, `from_dbus` for the
way back (also used by clients).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import dbus
import dbus.lowlevel
import dbus.service

from appliance.dbus.glib import GLibThread

_log = logging.getLogger(__name__)

T = TypeVar("T")
Reply = Callable[..., None]
ErrorReply = Callable[[BaseException], None]
ErrorMapper = Callable[[BaseException], dbus.DBusException]

INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"


class BridgeClosed(Exception):
    """The service is shutting down: the call was not (or no longer) run."""


# -- conversion --------------------------------------------------------------------


def to_dbus_value(value: Any) -> Any:
    """One record value as a typed dbus-python value (the variant's content).

    str -> s, bool -> b, int -> x, float -> d, dict -> a{sv}, list of dicts -> aa{sv},
    list of str -> as; an empty list is sent as aa{sv} (lists in records are nearly
    always nested records). Anything else is a bug in the caller: TypeError.
    """
    # bool first: it is an int subclass.
    if isinstance(value, bool):
        return dbus.Boolean(value)
    if isinstance(value, str):
        return dbus.String(value)
    if isinstance(value, int):
        return dbus.Int64(value)  # OverflowError beyond int64: a bug, reported as such
    if isinstance(value, float):
        return dbus.Double(value)
    if isinstance(value, Mapping):
        return to_dbus_record(value)
    if isinstance(value, list | tuple):
        if all(isinstance(item, str) for item in value) and value:
            return dbus.Array([dbus.String(item) for item in value], signature="s")
        if all(isinstance(item, Mapping) for item in value):
            return to_dbus_records(value)
        raise TypeError(f"a list in a record must hold only str or only records: {value!r}")
    raise TypeError(f"cannot send a {type(value).__name__} in a record: {value!r}")


def to_dbus_record(record: Mapping[str, Any]) -> dbus.Dictionary:
    """A record as a{sv}; keys whose value is None are left out (D-Bus has no null)."""
    out = {}
    for key, value in record.items():
        if not isinstance(key, str):
            raise TypeError(f"record keys must be str, not {key!r}")
        if value is not None:
            out[dbus.String(key)] = to_dbus_value(value)
    return dbus.Dictionary(out, signature="sv")


def to_dbus_records(records: Sequence[Mapping[str, Any]]) -> dbus.Array:
    """A list of records as aa{sv}."""
    return dbus.Array([to_dbus_record(r) for r in records], signature="a{sv}")


def from_dbus(value: Any) -> Any:
    """A received dbus-python value as plain Python (variants are already unwrapped).

    Boolean -> bool, integer types -> int, Double -> float, String/ObjectPath/
    Signature -> str, Dictionary -> dict, Array -> list, Struct -> tuple,
    ByteArray -> bytes.
    """
    # Boolean first: it subclasses int.
    if isinstance(value, dbus.Boolean):
        return bool(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {from_dbus(k): from_dbus(v) for k, v in value.items()}
    if isinstance(value, dbus.Struct | tuple):
        return tuple(from_dbus(v) for v in value)
    if isinstance(value, list):
        return [from_dbus(v) for v in value]
    raise TypeError(f"unexpected D-Bus value {value!r}")


# -- calls -------------------------------------------------------------------------


class CallBridge:
    """Runs D-Bus method work on the asyncio loop and replies on the GLib thread.

    `map_error` turns any exception of the work (or `BridgeClosed`) into the
    DBusException sent to the caller; it is where unexpected errors get logged.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, glib: GLibThread, map_error: ErrorMapper
    ) -> None:
        self._loop = loop
        self._glib = glib
        self._map_error = map_error
        self._lock = threading.Lock()
        self._inflight: set[concurrent.futures.Future[tuple[Any, ...]]] = set()
        self._closed = False

    def submit(
        self,
        reply: Reply,
        error: ErrorReply,
        work: Callable[[], Awaitable[T]],
        out: Callable[[T], tuple[Any, ...]],
    ) -> None:
        """Call `work()` on the loop, convert its result with `out` there, reply here.

        Called on the GLib thread by a method with async callbacks. `work` is only
        called on the loop, so validation inside it is reported like the core's errors.
        """

        async def run() -> tuple[Any, ...]:
            return out(await work())

        coro = run()
        with self._lock:
            if self._closed:
                coro.close()
                self._fail(error, BridgeClosed("the service is shutting down"))
                return
            try:
                future = asyncio.run_coroutine_threadsafe(coro, self._loop)
            except RuntimeError as exc:  # the loop is closed
                coro.close()
                self._fail(error, BridgeClosed(str(exc)))
                return
            self._inflight.add(future)
        future.add_done_callback(partial(self._done, reply, error))

    def _done(
        self, reply: Reply, error: ErrorReply, future: concurrent.futures.Future[tuple[Any, ...]]
    ) -> None:
        # On the loop's thread (or the canceller's): only hop to the GLib thread.
        with self._lock:
            self._inflight.discard(future)
        self._glib.call_soon(partial(self._deliver, reply, error, future))

    def _deliver(
        self, reply: Reply, error: ErrorReply, future: concurrent.futures.Future[tuple[Any, ...]]
    ) -> None:
        if future.cancelled():
            self._fail(error, BridgeClosed("the service is shutting down"))
            return
        exc = future.exception()
        if exc is not None:
            self._fail(error, exc)
            return
        try:
            reply(*future.result())
        except Exception as bug:  # noqa: BLE001 - answered as Failed, logged by map_error
            # The result did not fit the out signature.
            self._fail(error, bug)

    def _fail(self, error: ErrorReply, exc: BaseException) -> None:
        try:
            error(self._map_error(exc))
        except Exception:  # noqa: BLE001 - logged; the caller's connection is gone
            # Sending the error itself failed (connection closed): nobody to tell.
            _log.warning("could not send a D-Bus error reply", exc_info=True)

    def close(self) -> None:
        """Refuse new calls and cancel those in flight (their callers get an error)."""
        with self._lock:
            self._closed = True
            inflight = list(self._inflight)
        for future in inflight:
            future.cancel()


class SignatureCheckedObject(dbus.service.Object):
    """A dbus-python object that refuses calls whose arguments do not match the method.

    dbus-python does not check incoming signatures: a wrong type reaches the method
    as-is, and a wrong count raises TypeError whose traceback would be sent to the
    caller. Here such calls get `org.freedesktop.DBus.Error.InvalidArgs`, as from
    sd-bus or GDBus. The expected signatures are the `in_signature`s of the
    `@dbus.service.method` declarations (read from dbus-python's per-class method
    table, the same one its Introspect uses).
    """

    def _message_cb(self, connection: Any, message: Any) -> None:
        if isinstance(message, dbus.lowlevel.MethodCallMessage):
            expected = self._in_signature(message.get_interface(), message.get_member())
            got = message.get_signature() or ""
            if expected is not None and got != expected:
                error = dbus.lowlevel.ErrorMessage(
                    message,
                    INVALID_ARGS,
                    f"{message.get_member()} takes arguments ({expected}), not ({got})",
                )
                if not message.get_no_reply():
                    connection.send_message(error)
                return
        super()._message_cb(connection, message)

    def _in_signature(self, interface: str | None, member: str) -> str | None:
        cls = type(self)
        table = self._dbus_class_table[f"{cls.__module__}.{cls.__name__}"]
        for name, methods in table.items():
            if interface not in (None, name):
                continue
            func = methods.get(member)
            if func is not None and getattr(func, "_dbus_is_method", False):
                signature = getattr(func, "_dbus_in_signature", None)
                return None if signature is None else str(signature)
        return None  # unknown: dbus-python answers UnknownMethod itself
