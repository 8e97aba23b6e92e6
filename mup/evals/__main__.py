"""`python -m mup.evals` == `mup evals`."""

from mup.evals._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
