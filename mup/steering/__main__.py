"""`python -m mup.steering` == `mup steering`."""

from mup.steering._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
