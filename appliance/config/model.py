"""Closed choices of the inventory (stored as their string values)."""

from __future__ import annotations

from enum import StrEnum


class ServerRole(StrEnum):
    PROCESS = "process"
    TARGET = "target"


class ComponentKind(StrEnum):
    """What an enrolled certificate belongs to."""

    AGENT = "agent"
    PROCESS = "process"
    TARGET = "target"
    ADMIN = "admin"  # tools such as the lab that call the role daemons' control RPCs
    CONFIG = "config"  # the configuration server's own leaf (server and client)


class MachineState(StrEnum):
    REGISTERED = "registered"  # enrolled, protection not enabled
    INITIAL_SYNC = "initial-sync"
    PROTECTED = "protected"
    RPO_EXCEEDED = "rpo-exceeded"
    RESYNC_REQUIRED = "resync-required"
    PAUSED = "paused"  # protection disabled by the operator, or failed over
    DISCONNECTED = "disconnected"  # the agent has not reported for too long
    FAILED_OVER = "failed-over"  # running as a VM at the secondary site, not committed
    FAILOVER_COMMITTED = "failover-committed"  # the failover is final; failback next


class JobKind(StrEnum):
    PROTECT = "protect"
    UNPROTECT = "unprotect"
    RESYNC = "resync"
    TEST_FAILOVER = "test-failover"
    CLEANUP = "cleanup"  # of a test failover
    FAILOVER = "failover"
    COMMIT = "commit"
    CANCEL = "cancel"  # a failover not yet committed
    FAILBACK = "failback"  # of a committed failover: the original machine is the target
    PUSH_INSTALL = "push-install"  # of the agent, by a process server over SSH
    PUSH_UNINSTALL = "push-uninstall"
    PLAN_TEST_FAILOVER = "plan-test-failover"  # of a recovery plan's machines, in groups
    PLAN_CLEANUP = "plan-cleanup"
    PLAN_FAILOVER = "plan-failover"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AlertKind(StrEnum):
    RPO_EXCEEDED = "rpo-exceeded"
    AGENT_DISCONNECTED = "agent-disconnected"
    SERVER_DISCONNECTED = "server-disconnected"
    RESYNC_REQUIRED = "resync-required"
    CAPACITY_LOW = "capacity-low"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"
