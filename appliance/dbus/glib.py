"""GLib's main loop on one dedicated thread, driven through ctypes (no PyGObject).

dbus-python's GLib glue always attaches connections to GLib's *default* main context,
so a process can have only one thread running it: `GLibThread.start` refuses a
second. ctypes releases the GIL while `g_main_loop_run` sleeps in poll(), and
re-acquires it for callbacks, so Python threads keep running beside it.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import dbus.mainloop.glib

_log = logging.getLogger(__name__)

T = TypeVar("T")

_glib = ctypes.CDLL("libglib-2.0.so.0")
_glib.g_main_loop_new.restype = ctypes.c_void_p
_glib.g_main_loop_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
_glib.g_main_loop_run.restype = None
_glib.g_main_loop_run.argtypes = [ctypes.c_void_p]
_glib.g_main_loop_quit.restype = None
_glib.g_main_loop_quit.argtypes = [ctypes.c_void_p]
_glib.g_main_loop_unref.restype = None
_glib.g_main_loop_unref.argtypes = [ctypes.c_void_p]
_glib.g_main_context_pending.restype = ctypes.c_int
_glib.g_main_context_pending.argtypes = [ctypes.c_void_p]
_glib.g_main_context_iteration.restype = ctypes.c_int
_glib.g_main_context_iteration.argtypes = [ctypes.c_void_p, ctypes.c_int]
_GSourceFunc = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_glib.g_idle_add.restype = ctypes.c_uint
_glib.g_idle_add.argtypes = [_GSourceFunc, ctypes.c_void_p]
_G_SOURCE_REMOVE = 0
_MAX_DRAIN = 1000  # iterations after quit; a bound, not an expected count

# Callables waiting for the GLib thread. Module-level, like the C callback below: an
# idle source still queued in the default context when a GLibThread stops must find
# a live function pointer if a later GLibThread runs that context again.
_pending: collections.deque[Callable[[], object]] = collections.deque()


def _run_pending(_data: int | None) -> int:
    while _pending:
        try:
            fn = _pending.popleft()
        except IndexError:  # drained by another idle source meanwhile
            break
        try:
            fn()
        except Exception:  # noqa: BLE001 - logged with its traceback
            # A dispatch boundary: an exception escaping a ctypes callback would only be
            # printed to stderr, so it is logged here with its traceback instead.
            _log.exception("callable %r failed on the GLib thread", fn)
    return _G_SOURCE_REMOVE


_RUN_PENDING = _GSourceFunc(_run_pending)  # kept alive for the life of the process


class GLibThread:
    """Runs GLib's default main loop on a thread; `call_soon`/`call` run code on it.

    dbus-python objects (connections, exported objects, reply callbacks) are touched
    only from this thread, so there is one dispatcher and no locking in the glue.
    """

    _claim = threading.Lock()  # held while an instance runs: one per process

    def __init__(self, name: str = "glib-dbus") -> None:
        self._name = name
        self._loop: int | None = None
        self._thread: threading.Thread | None = None
        self._mainloop: Any = None
        self._holds_claim = False

    @property
    def mainloop(self) -> Any:
        """The dbus-python main loop object to pass as `mainloop=` to a connection."""
        if self._mainloop is None:
            raise RuntimeError("GLibThread is not running")
        return self._mainloop

    @property
    def running(self) -> bool:
        return self._thread is not None

    def in_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("GLibThread already started")
        if not GLibThread._claim.acquire(blocking=False):
            raise RuntimeError(
                "another GLibThread is running; dbus-python uses GLib's default main "
                "context, so a process has only one"
            )
        self._holds_claim = True
        try:
            dbus.mainloop.glib.threads_init()  # before any connection is made
            self._mainloop = dbus.mainloop.glib.DBusGMainLoop()
            self._loop = _glib.g_main_loop_new(None, 0)
            _pending.clear()  # leftovers of a previous instance are stale
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            self.call(lambda: None, timeout=10.0)  # returns once the loop dispatches
        except BaseException:
            self._teardown()
            raise

    def _run(self) -> None:
        _glib.g_main_loop_run(self._loop)
        # Dispatch what closing connections left pending (their Disconnected message)
        # while their Python objects still exist. Left in the default context, a later
        # GLibThread would dispatch it into a freed dbus-python connection, which leaves
        # a stray exception set on that thread (seen as SystemError in unrelated code).
        for _ in range(_MAX_DRAIN):
            if not _glib.g_main_context_pending(None):
                break
            _glib.g_main_context_iteration(None, 0)

    def call_soon(self, fn: Callable[[], object]) -> bool:
        """Queue `fn` for the GLib thread; False (and `fn` dropped) if not running."""
        if self._thread is None:
            _log.debug("GLib thread not running; dropped %r", fn)
            return False
        _pending.append(fn)
        _glib.g_idle_add(_RUN_PENDING, None)  # thread-safe; wakes the loop
        return True

    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run `fn` on the GLib thread and return its result (or raise its exception)."""
        if self.in_thread():
            return fn()
        done = threading.Event()
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the waiting thread
                outcome.append((False, exc))
            finally:
                done.set()

        if not self.call_soon(run):
            raise RuntimeError("GLibThread is not running")
        if not done.wait(timeout):
            raise TimeoutError(f"GLib thread did not run {fn!r} within {timeout} s")
        ok, value = outcome[0]
        if not ok:
            raise value
        result: T = value
        return result

    def stop(self, timeout: float = 10.0) -> None:
        """Quit the loop and join the thread. Callables still queued are dropped."""
        if self._thread is None:
            return
        if self.in_thread():
            raise RuntimeError("GLibThread.stop called from the GLib thread itself")
        _glib.g_main_loop_quit(self._loop)  # thread-safe; wakes the context
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"GLib thread did not stop within {timeout} s")
        self._teardown()

    def _teardown(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return  # start failed after the thread began: leave the claim held
        self._thread = None
        _pending.clear()
        if self._loop is not None:
            _glib.g_main_loop_unref(self._loop)
            self._loop = None
        self._mainloop = None
        if self._holds_claim:
            self._holds_claim = False
            GLibThread._claim.release()
