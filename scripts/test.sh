#!/usr/bin/env bash
# The test suite, run against the installed wheel (not the source tree).
# Usage: bash scripts/test.sh [pytest args...]
MUP_EXTRAS=test source "$(dirname "$0")/_setup.sh"
# -P: the checkout (the current directory) must not shadow the installed wheel here either.
echo "[test] $("$VPY" -P -c 'import mup, mup._native; print("mup", mup.__version__, "from", mup.__file__)')"
# The pytest entry script, not `python -m pytest`: the latter puts the checkout on sys.path and
# would test the source tree instead of the wheel.
MUP_WHEEL="$(pwd)/$WHEEL" MUP_REQUIRE_NATIVE=1 MUP_TEST_INSTALLED=1 exec "$VENV/bin/pytest" "$@"
