"""Push installation of the agent onto source hosts over SSH (OpenSSH, keys only).

`push_install` / `push_uninstall` (install.py) are blocking and meant to run in a
thread from a job step; `build_bundle` (bundle.py) makes what they copy."""

from __future__ import annotations
