#!/usr/bin/env bash
# Set up (if needed) and run the test suite; extra arguments go to pytest (e.g. --slow, -k store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
