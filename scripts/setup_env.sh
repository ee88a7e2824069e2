#!/usr/bin/env bash
# Create or update the project's virtual environment: torch, this package and the extras asked for.
#
#   bash scripts/setup_env.sh [EXTRAS]      EXTRAS: comma list of demo,dev,dali,dali-cu13,iabn,plot,export
#
# Idempotent: a stamp records what was installed, so a second call with the same pyproject.toml and
# extras returns in a second. Environment: VENV (default .venv), PYTHON (default python3),
# TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1"; set your CUDA build's pins on a cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
EXTRAS=${1:-demo}

stamp="$VENV/.tresnet-setup-$( (cat pyproject.toml; echo "$EXTRAS $TORCH_SPEC") | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "setting up $VENV (extras: $EXTRAS) ..."
"${pip[@]}" install -q --upgrade pip setuptools wheel
# shellcheck disable=SC2086
"${pip[@]}" install -q $TORCH_SPEC
pip_extras=$(echo "$EXTRAS" | tr ',' '\n' | grep -v '^iabn$' | paste -sd, -)
"${pip[@]}" install -q -e ".[${pip_extras}]"

if [[ ",$EXTRAS," == *",iabn,"* ]] && ! "$VENV/bin/python" -c "import inplace_abn" 2>/dev/null; then
  # inplace-abn ships as an sdist whose build imports torch (so no build isolation). With nvcc
  # present it also builds its CUDA kernels, which need an arch list and CUDA_HOME.
  "${pip[@]}" install -q setuptools_scm
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
  fi
  echo "building inplace-abn (1-3 minutes the first time; pip caches the wheel) ..."
  MAX_JOBS=${MAX_JOBS:-2} "${pip[@]}" install -q --no-build-isolation inplace-abn
fi
rm -f "$VENV"/.tresnet-setup-*
touch "$stamp"
echo "$VENV is ready; to use it in this shell: source $VENV/bin/activate (then: python train.py --help)"
