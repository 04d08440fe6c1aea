"""Answering the small control RPC (REQUEST / RESPONSE) that role daemons serve."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.wire.connection import Connection
from appliance.wire.errors import InvalidRequest, WireError
from appliance.wire.messages import Request, Response

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def answer(
    conn: Connection, req: Request, call: Handler, failures: tuple[type[BaseException], ...]
) -> None:
    """Run `call(method, params)` and send its JSON result; an exception of `failures`
    (the operator's or the peer's mistake) becomes ok=false with {"error", "message"}
    (and its "hint" and "fingerprint" if it has them),
    anything else is a bug and propagates. A peer that went away gets no answer."""
    caught: tuple[type[BaseException], ...] = (InvalidRequest, ValueError, *failures)
    try:
        params = json.loads(req.params or b"{}")
        if not isinstance(params, dict):
            raise InvalidRequest("params must be a JSON object")
        response = Response.make(req.request_id, await call(req.method, params))
    except caught as exc:
        error = {"error": type(exc).__name__, "message": str(exc)}
        for extra in ("hint", "fingerprint"):  # an operator error's advice, if it has one
            if isinstance(value := getattr(exc, extra, None), str) and value:
                error[extra] = value
        response = Response.make(req.request_id, error, ok=False)
    with contextlib.suppress(WireError):
        await conn.send(response)
