"""python -m tui: the same as secondsite-console."""

from __future__ import annotations

import sys

from tui.app import main

sys.exit(main())
