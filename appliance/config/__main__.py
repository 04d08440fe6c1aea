"""python -m appliance.config: secondsite-configd."""

import sys

from appliance.config.daemon import main

sys.exit(main())
