"""`make bench`: run every tests/bench/bench_*.py script, collect their final JSON lines.

Each script measures its subject against a baseline in the same run and prints a
single JSON object as its last line. This runner prints each script's output as it
comes, then one final JSON line holding all results (or the failures).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if len(sys.argv) > 1:
        scripts = [s for s in scripts if any(name in s.name for name in sys.argv[1:])]
    results: dict[str, object] = {}
    failed: list[str] = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=HERE.parent.parent
        )
        assert proc.stdout is not None
        last = ""
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.strip():
                last = line.strip()
        code = proc.wait()
        name = script.stem.removeprefix("bench_")
        try:
            result = json.loads(last)
        except json.JSONDecodeError:
            result = None
        if code != 0 or not isinstance(result, dict):
            failed.append(name)
            results[name] = {"error": f"exit {code}", "last_line": last[-200:]}
        else:
            result["seconds"] = round(time.monotonic() - started, 1)
            results[name] = result
    print(json.dumps({"bench": "all", "failed": failed, "results": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
