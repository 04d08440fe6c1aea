"""Durability primitives shared by the storage roles (process-server spool, master target).

- :mod:`appliance.storage.atomic`: the one metadata-write recipe (temp file, fsync,
  ``os.replace``, fsync the directory).
- :mod:`appliance.storage.segments`: segment files of append-only logs (header format,
  atomic creation, chaining, buffered reads, resynchronising after damage).
- :mod:`appliance.storage.fileio`: whole-buffer positional I/O, hole punching and
  sparse-aware copying for large data files.
- :mod:`appliance.storage.compress`: thread-safe zstd for records.
- :mod:`appliance.storage.faults`: named fault points that tests use to inject a crash
  or an I/O error at an exact step of a durability protocol.
"""
