"""Whether this appliance has been set up: the console offers its wizard until it is.

Two markers, both root-only in the setup state directory (which is why the console,
not root, asks Setup1 rather than reading them): `secondsite-firstboot`'s (written
when it applied the OVA's deployment properties; owned by firstboot.py, read here),
and the console's own, written through FinishSetup when an operator applied changes
with the setup wizard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.setup.firstboot import DONE as FIRSTBOOT_DONE
from appliance.storage.atomic import atomic_write

WIZARD_DONE = "setup.done"
APPLIED = "applied:"


class SetupState:
    def __init__(self, root: Path, state_dir: Path) -> None:
        self.firstboot_marker = root / FIRSTBOOT_DONE
        self.wizard_marker = state_dir / WIZARD_DONE

    def read(self) -> dict[str, Any]:
        """{firstboot_done (b), applied (as: what first boot applied), wizard_done (b)}."""
        try:
            text = self.firstboot_marker.read_text()
            firstboot = True
        except FileNotFoundError:
            text, firstboot = "", False
        applied: list[str] = []
        for line in text.splitlines():
            if line.startswith(APPLIED):
                applied = [w for w in line[len(APPLIED) :].split() if w != "nothing"]
        return {
            "firstboot_done": firstboot,
            "applied": applied,
            "wizard_done": self.wizard_marker.exists(),
        }

    def finish(self) -> None:
        self.wizard_marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.wizard_marker, b"set up with the console's wizard\n", 0o600)
