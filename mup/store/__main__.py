"""`python -m mup.store` == `mup store`."""

from mup.store._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
