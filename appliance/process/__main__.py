"""`python -m appliance.process` runs secondsite-processd."""

import sys

from appliance.process.daemon import main

sys.exit(main())
