"""Change trackers: which chunks of a disk changed since they were last replicated."""

from agent.trackers.base import CHUNK, DirtyMap, Tracker

__all__ = ["CHUNK", "DirtyMap", "Tracker"]
