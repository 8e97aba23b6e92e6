"""`python -m mup.extract` == `mup extract`."""

from mup.extract._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
