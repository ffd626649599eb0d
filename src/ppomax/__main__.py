"""`python -m ppomax` (and `accelerate launch -m ppomax`) run the `ppomax` command line."""

import sys

from ppomax.cli import main

sys.exit(main())
