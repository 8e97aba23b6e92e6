import sys

from mup.data._cli import main

sys.exit(main())
