"""`python -m mup.serve` == `mup serve`."""

from mup.serve._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
