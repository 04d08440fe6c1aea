"""`python -m tests.integration.slow_targetd`: secondsite-targetd whose long control RPCs
first sleep, to prove the configuration server waits for a slow copy or rollback.

SECONDSITE_TEST_SLOW = "materialize=3,rollback=3" (seconds). Fault injection only: the
sleep comes before the real method, which then runs unmodified.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Any

from appliance.target.daemon import main
from appliance.target.store import ReplicaStore


def slow_down(delays: dict[str, float]) -> None:
    for name, seconds in delays.items():
        real = getattr(ReplicaStore, name)

        @functools.wraps(real)
        def slow(self: Any, *args: Any, _real: Any = real, _s: float = seconds) -> Any:
            time.sleep(_s)
            return _real(self, *args)

        setattr(ReplicaStore, name, slow)


if __name__ == "__main__":
    spec = os.environ.get("SECONDSITE_TEST_SLOW", "")
    slow_down({k: float(v) for k, _, v in (p.partition("=") for p in spec.split(",") if p)})
    sys.exit(main())
