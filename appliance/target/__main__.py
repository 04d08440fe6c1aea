"""`python -m appliance.target` runs secondsite-targetd."""

import sys

from appliance.target.daemon import main

sys.exit(main())
