"""`python -m appliance.ctl`, the same as the `secondsitectl` command."""

from __future__ import annotations

import sys

from appliance.ctl.cli import main

sys.exit(main())
