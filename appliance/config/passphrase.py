"""The enrolment passphrase: what an operator gives a component so that it may enrol.

The passphrase is 20 symbols of Crockford's base32 (100 bits from `secrets`), shown
in groups of four (``K7QF-2MZP-0R4X-9TNB-W3HD``). What a user types is compared after
`normalise_passphrase` (case, dashes and spaces ignored; O, I and L read as 0, 1, 1).
100 bits is enough that an eavesdropper holding one enrolment proof (an HMAC keyed
with the passphrase) cannot search for it offline.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.config.errors import EnrolmentRefused, InvalidArgument
from appliance.storage.atomic import atomic_write
from appliance.wire.enrol import PASSPHRASE_ALPHABET, normalise_passphrase

SYMBOLS = 20  # x 5 bits
GROUP = 4
FORMAT_VERSION = 1


class CorruptPassphraseFile(Exception):
    """The passphrase file exists but cannot be read back (a bug or a damaged disk)."""


def generate_passphrase() -> str:
    """A fresh passphrase in its display form."""
    raw = "".join(secrets.choice(PASSPHRASE_ALPHABET) for _ in range(SYMBOLS))
    return "-".join(raw[i : i + GROUP] for i in range(0, SYMBOLS, GROUP))


@dataclass(frozen=True)
class Passphrase:
    value: str  # display form, as shown to the operator
    created_at: float
    expires_at: float | None  # None: valid until rotated

    @property
    def normalised(self) -> str:
        """The HMAC key of the enrolment proofs."""
        return normalise_passphrase(self.value)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def require_valid(self, now: float) -> None:
        """EnrolmentRefused if it has expired."""
        if self.expired(now):
            raise EnrolmentRefused(
                "the enrolment passphrase expired; show a new one on the configuration "
                "server (secondsitectl or the console) and enrol again with it"
            )

    def matches(self, typed: str) -> bool:
        """Whether `typed` is this passphrase as a person may have typed it."""
        try:
            candidate = normalise_passphrase(typed)
        except ValueError:
            return False
        return secrets.compare_digest(candidate.encode(), self.normalised.encode())

    def record(self) -> dict[str, Any]:
        """For D-Bus, which has no null: "expires_at" is left out when there is no expiry."""
        out: dict[str, Any] = {"passphrase": self.value, "created_at": self.created_at}
        if self.expires_at is not None:
            out["expires_at"] = self.expires_at
        return out


class PassphraseStore:
    """The current passphrase, kept in one root-only file.

    File format (JSON object, mode 0600, replaced atomically on every change)::

        {"version": 1, "passphrase": "K7QF-...", "created_at": <unix time>,
         "expires_at": <unix time> | null}

    The first `current` call creates a passphrase (expiring after `default_ttl`
    seconds, or never); `rotate` replaces it, which makes the old one useless at once.
    """

    def __init__(self, path: Path, *, default_ttl: float | None = None) -> None:
        self.path = path
        self._default_ttl = default_ttl
        self._cached: Passphrase | None = None

    def current(self, now: float) -> Passphrase:
        """The passphrase in force (possibly expired: `Passphrase.require_valid`)."""
        if self._cached is None:
            self._cached = self._load()
        if self._cached is None:
            return self.rotate(now, self._default_ttl)
        return self._cached

    def rotate(self, now: float, ttl: float | None = None) -> Passphrase:
        """A new passphrase, valid for `ttl` seconds (None: until the next rotation)."""
        if ttl is not None and ttl <= 0:
            raise InvalidArgument(f"a passphrase lifetime must be positive, not {ttl}")
        phrase = Passphrase(
            value=generate_passphrase(),
            created_at=now,
            expires_at=None if ttl is None else now + ttl,
        )
        body = {
            "version": FORMAT_VERSION,
            "passphrase": phrase.value,
            "created_at": phrase.created_at,
            "expires_at": phrase.expires_at,
        }
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(body).encode(), 0o600)
        self._cached = phrase
        return phrase

    def _load(self) -> Passphrase | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            body = json.loads(raw)
            value = body["passphrase"]
            normalise_passphrase(value)
            created = float(body["created_at"])
            expires = body["expires_at"]
            phrase = Passphrase(value, created, None if expires is None else float(expires))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptPassphraseFile(
                f"{self.path} is damaged ({exc}); remove it to make a new passphrase"
            ) from exc
        return phrase
