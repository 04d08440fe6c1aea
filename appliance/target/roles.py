"""HELLO roles the master target treats specially.

A connection whose HELLO role is `FAILBACK_ROLE` is a failback reader (`agent.failback`):
it opens a failed-over (fenced) replica only to digest and read it. It never owns the
disk's stream, so neither it nor the process server still attached to that stream takes
the other's connection away (see `appliance.target.server`).
"""

from __future__ import annotations

FAILBACK_ROLE = "failback"
