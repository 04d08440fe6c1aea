import sys

from appliance.lab.cli import main

sys.exit(main())
