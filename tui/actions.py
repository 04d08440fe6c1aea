"""The machine actions: which Config1 method each calls, and what to tell the operator
before it runs. One table, read by the machine screen's bindings and the confirm dialog."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class ActionKind(StrEnum):
    PROTECT = "protect"
    UNPROTECT = "unprotect"
    RESYNC = "resync"
    TEST_FAILOVER = "test-failover"
    CLEANUP = "cleanup"
    FAILOVER = "failover"
    COMMIT = "commit"
    CANCEL = "cancel"


class FailoverMode(StrEnum):
    PLANNED = "planned"
    UNPLANNED = "unplanned"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    key: str  # the machine screen's binding
    method: str  # org.secondsite.Config1 method; returns the job id
    title: str
    effect: str  # what will happen, "{m}" is the machine
    takes_point: bool = False
    takes_mode: bool = False
    danger: bool = False  # cannot be undone, or stops production

    def arguments(self, machine: str, point: str, mode: FailoverMode) -> tuple[Any, ...]:
        """The method's arguments, in the contract's order."""
        if self.kind is ActionKind.PROTECT:
            return (machine, "")  # "" keeps the machine's policy
        if self.kind is ActionKind.TEST_FAILOVER:
            return (machine, point or "latest", {})  # {}: an isolated network
        if self.kind is ActionKind.FAILOVER:
            return (machine, point or "latest", str(mode))
        return (machine,)


ACTIONS: tuple[Action, ...] = (
    Action(ActionKind.PROTECT, "p", "Protect", "Protect",
           "Starts replicating {m}: the agent copies its disks to the master target "
           "(initial sync), then streams every change. The machine keeps its policy."),
    Action(ActionKind.UNPROTECT, "u", "Unprotect", "Unprotect",
           "Stops replicating {m}. Its RPO is no longer watched and no new recovery "
           "points are taken.", danger=True),
    Action(ActionKind.RESYNC, "r", "Resync", "Resync",
           "Compares {m}'s disks with their replicas chunk by chunk and sends only what "
           "differs. Replication goes on; the RPO grows until it is done."),
    Action(ActionKind.TEST_FAILOVER, "t", "TestFailover", "Test failover",
           "Starts a test VM of {m} from the recovery point below on an isolated network "
           "(a copy of the point: the replica is not touched). Replication keeps running. "
           "Remove the test VM with Cleanup.", takes_point=True),
    Action(ActionKind.CLEANUP, "c", "Cleanup", "Clean up test failover",
           "Removes {m}'s test VM, its isolated network and the copy of the point. "
           "Replication is not affected."),
    Action(ActionKind.FAILOVER, "f", "Failover", "Failover",
           "Stops replication of {m}, rolls its replica back to the recovery point below "
           "and starts it as a VM at the secondary site. Planned: the source stops first "
           "so its last changes arrive. Unplanned: the primary site is lost, use what the "
           "master target has. Afterwards: Commit makes it final, Cancel undoes it.",
           takes_point=True, takes_mode=True, danger=True),
    Action(ActionKind.COMMIT, "m", "Commit", "Commit failover",
           "Makes the failover of {m} final: it cannot be cancelled any more, and the "
           "way back is a failback.", danger=True),
    Action(ActionKind.CANCEL, "x", "Cancel", "Cancel failover",
           "Undoes the failover of {m} that is not committed yet: the replica VM is removed, "
           "the replica is resynced with the source (only differing chunks) and {m} is "
           "protected again.", danger=True),
)  # fmt: skip

BY_KIND = {a.kind: a for a in ACTIONS}
