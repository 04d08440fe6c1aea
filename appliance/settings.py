"""One table of settings drives a role's TOML file, its validation and its docs.

Each `Setting` names a dotted key ("section.name"), its type (str, int, float, bool,
Path, or list: an array of strings, resolved to a tuple), default and help text,
plus an optional check. `load()` reads a TOML file with tomllib, rejects unknown keys
(a typo must not silently fall back to a default), converts and validates every value,
and returns plain values keyed by the dotted name for a frozen dataclass to take.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.daemon.cli import ConfigError

Check = Callable[[Any], str | None]


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type
    default: Any
    help: str
    check: Check | None = None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than zero"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def in_range(low: int, high: int) -> Check:
    def check(value: int) -> str | None:
        return None if low <= value <= high else f"must be between {low} and {high}"

    return check


def host_port(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT with a port between 1 and 65535"
    return None


def parse_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def load(
    table: Iterable[Setting], path: Path | None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Resolve every setting: defaults, then the file (if any), then overrides."""
    settings = {s.key: s for s in table}
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                document = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(
                f"configuration file {path} does not exist",
                "create it, or pass --config with another file",
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        raw.update(_flatten(document, path))
    for key in raw:
        if key not in settings:
            known = ", ".join(sorted(settings))
            raise ConfigError(f"{path}: unknown setting '{key}'", f"known settings: {known}")
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    values: dict[str, Any] = {}
    for key, setting in settings.items():
        value = raw.get(key, setting.default)
        values[key] = _convert(setting, value, path)
    return values


def _flatten(document: Mapping[str, Any], path: Path, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in document.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _convert(setting: Setting, value: Any, path: Path | None) -> Any:
    where = f"{path}: " if path else ""
    kind = setting.kind
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            converted: Any = value
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError
            converted = value
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError
            converted = float(value)
        elif kind is list:  # a list of strings (TOML array), returned as a tuple
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise TypeError
            converted = tuple(value)
        elif kind is Path:
            if not isinstance(value, str | Path) or not str(value):
                raise TypeError
            converted = Path(value)
        else:
            if not isinstance(value, str):
                raise TypeError
            converted = value
    except TypeError:
        raise ConfigError(
            f"{where}{setting.key} = {value!r} is not a "
            + ("list of strings" if kind is list else kind.__name__),
            setting.help,
        ) from None
    if setting.check is not None:
        problem = setting.check(converted)
        if problem:
            raise ConfigError(f"{where}{setting.key} = {value!r} {problem}", setting.help)
    return converted


def describe(table: Iterable[Setting]) -> str:
    """The settings as help text: key, default, meaning."""
    lines = []
    for s in table:
        lines.append(f"  {s.key} (default {s.default!r})\n      {s.help}")
    return "\n".join(lines)
