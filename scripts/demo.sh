#!/usr/bin/env bash
# Set up (if needed), then the whole demo: demo set -> teacher cache -> baseline and CUSA -> both tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/demo.py "$@"
