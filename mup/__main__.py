"""`python -m mup` == the `mup` console script."""

from mup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
