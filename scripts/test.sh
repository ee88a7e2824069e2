#!/usr/bin/env bash
# Set up .venv with everything the tests exercise (DALI and InPlace-ABN on CPU included), then run
# the test suite. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k config -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo,dev,dali-cu13,iabn,plot,export
exec .venv/bin/python -m pytest "$@"
