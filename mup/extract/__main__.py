import sys

from mup.extract import main

sys.exit(main())
