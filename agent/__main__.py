"""`python -m agent` runs secondsite-agent."""

import sys

from agent.cli import main

sys.exit(main())
