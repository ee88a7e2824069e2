#!/usr/bin/env bash
# The embedded default: set up .venv, build a small real dataset offline (scikit-learn's handwritten
# digits as JPEGs), train a tiny TResNet on it, validate, print top-1 and where the logs are.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.epochs=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo
exec .venv/bin/python train.py --config configs/demo.yaml "$@"
