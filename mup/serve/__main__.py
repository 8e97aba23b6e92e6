"""`python -m mup.serve`."""

import sys

from mup.serve import main

sys.exit(main())
