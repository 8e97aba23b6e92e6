"""`python -m mup.datagen` == `mup data`."""

from mup.datagen._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
