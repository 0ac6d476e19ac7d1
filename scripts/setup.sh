#!/usr/bin/env bash
# Create .venv and install cusa with its test dependencies; a no-op when nothing changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.cusa-install-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# torchvision must come with its matching torch; installed first so nothing pulls another torch build
pip install "torch==2.14.1" "torchvision==0.29.1"
pip install -e ".[test]"
echo "$want" > "$stamp"
