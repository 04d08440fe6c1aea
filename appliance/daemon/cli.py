"""Operator errors versus bugs, for every command.

An operator error (bad flag, missing file, unreachable peer) prints one line with a
hint and exits with its own code; a bug still gets its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # argparse's own code for bad command lines
    CONFIG = 3
    UNAVAILABLE = 4  # a resource (port, state directory, peer) could not be used
    INTERRUPTED = 130


class OperatorError(Exception):
    """A mistake or condition the operator can fix; never shown with a traceback."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(OperatorError):
    exit_code = ExitCode.CONFIG


class Unavailable(OperatorError):
    exit_code = ExitCode.UNAVAILABLE


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Run `main`, turning OperatorError into one line on stderr and its exit code."""
    try:
        return main()
    except OperatorError as exc:
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"{prog}: error: {exc.message}{hint}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
