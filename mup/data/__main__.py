"""`python -m mup.data` == `mup data`."""

from mup.data._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
