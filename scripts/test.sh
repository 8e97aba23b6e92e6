#!/usr/bin/env bash
# The test suite, run against the installed wheel (not the source tree).
# Usage: bash scripts/test.sh [pytest args...]
MUP_EXTRAS=test source "$(dirname "$0")/_setup.sh"
# -P: the checkout (the current directory) must not shadow the installed wheel here either.
echo "[test] $("$VPY" -P -c 'import mup, mup._native; print("mup", mup.__version__, "from", mup.__file__)')"
# Worker processes (pytest-xdist), one test file per worker so that a file's compiled functions
# and module fixtures are built once: the suite is mostly single-threaded compiles and waits on
# server subprocesses, so two workers on two cores finish it in about half the time. At most 4
# (each holds its own JAX runtime and fixtures); MUP_TEST_WORKERS=0 runs in one process, and a
# -n/--numprocesses of your own wins.
workers=${MUP_TEST_WORKERS:-$("$VPY" -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')}
parallel=(-n "$workers" --dist loadfile)
for arg in "$@"; do
  case "$arg" in -n|-n*|--numprocesses*|--pdb) parallel=() ;; esac
done
[ "$workers" = 0 ] && parallel=()
# The pytest entry script, not `python -m pytest`: the latter puts the checkout on sys.path and
# would test the source tree instead of the wheel.
MUP_WHEEL="$(pwd)/$WHEEL" MUP_REQUIRE_NATIVE=1 MUP_TEST_INSTALLED=1 exec "$VENV/bin/pytest" "${parallel[@]}" "$@"
