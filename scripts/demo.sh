#!/usr/bin/env bash
# The demo on the embedded default model (SmolLM2-135M-Instruct). Usage: bash scripts/demo.sh [args]
source "$(dirname "$0")/_setup.sh"
exec "$VENV/bin/mup" demo "$@"
