"""Push installation of the agent onto source hosts over SSH (OpenSSH; a key, or a
password through askpass.py; root, or sudo).

`push_install` / `push_uninstall` (install.py) are blocking and meant to run in a
thread from a job step; `bundle_for` (bundle.py) finds or builds what they copy."""

from __future__ import annotations
