#!/usr/bin/env bash
# Install on a GPU machine without internet, step 2 of 2: install a bundle made by
# scripts/offline/prepare.sh. Run from this repository's root on the target:
#
#   bash scripts/offline/install.sh [--venv DIR | --python PY] [--data-dir DIR] PARTS_DIR [PARTS_DIR ...]
#
#   PARTS_DIR     folder(s) holding bundle.sha256 and the bundle.tar.partNNN files (any split)
#   --venv DIR    install into this virtual environment, created when missing with
#                 --system-site-packages, so a torch the machine already has is used (default: .venv)
#   --python PY   install into PY's environment instead (e.g. a conda env's python)
#   --data-dir D  where bundled data folders go (default: data); set TRESNET_DATA to it for the tests
#
# Checks every part's sha256 first (a missing or damaged part is named; exit 3 / 1), unpacks once per
# bundle (under ${TMPDIR:-/tmp}), installs with `pip install --no-index` from the bundle's wheels and,
# with an InPlace-ABN sdist in the bundle, builds it against the installed torch (nvcc needed for its
# CUDA kernels; TORCH_CUDA_ARCH_LIST defaults to this machine's GPU). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { echo "[offline-install] $*"; }
die() { echo "[offline-install] $*" >&2; exit "${2:-1}"; }

VENV=.venv
PYBIN=""
DATA_DIR=data
DIRS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=${2:?}; shift 2 ;;
    --python) PYBIN=${2:?}; shift 2 ;;
    --data-dir) DATA_DIR=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" 2 ;;
    *) DIRS+=("$1"); shift ;;
  esac
done
[ ${#DIRS[@]} -gt 0 ] || die "usage: install.sh [--venv DIR | --python PY] [--data-dir DIR] PARTS_DIR [...]" 2

# 1. every part present and intact
manifest=""
for d in "${DIRS[@]}"; do [ -z "$manifest" ] && [ -f "$d/bundle.sha256" ] && manifest=$d/bundle.sha256; done
[ -n "$manifest" ] || die "no bundle.sha256 in ${DIRS[*]}: copy prepare.sh's output folder here" 2
parts=() missing=()
while read -r want name; do
  found=""
  for d in "${DIRS[@]}"; do [ -f "$d/$name" ] && found="$d/$name" && break; done
  if [ -z "$found" ]; then missing+=("$name"); continue; fi
  parts+=("$found")
  got=$(sha256sum "$found" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "$found is damaged (sha256 $got, expected $want): copy it again"
done < "$manifest"
[ ${#missing[@]} -eq 0 ] || die "missing part(s): ${missing[*]} (looked in: ${DIRS[*]})" 3
say "${#parts[@]} part(s) checked"

# 2. unpack once per bundle
WORK=${TMPDIR:-/tmp}/tresnet-offline-$(sha256sum "$manifest" | cut -c1-12)
if [ ! -f "$WORK/.unpacked" ]; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  cat "${parts[@]}" | tar -x -C "$WORK"
  touch "$WORK/.unpacked"
fi
sed -n '1,5p' "$WORK/bundle.txt" | sed 's/^/  /'

# 3. the environment
if [ -z "$PYBIN" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV (sees the system's packages, e.g. its torch)"
    python3 -m venv --system-site-packages "$VENV"
  fi
  PYBIN=$VENV/bin/python
fi
pipi=("$PYBIN" -m pip install -q --disable-pip-version-check --no-index --find-links "$WORK/wheels")
say "installing $(paste -sd' ' "$WORK/requirements.txt") into $("$PYBIN" -c 'import sys; print(sys.prefix)')"
if ! "${pipi[@]}" -r "$WORK/requirements.txt"; then
  has=$(sed -n 's/^the target already has (not bundled): //p' "$WORK/bundle.txt")
  hint="use --venv, which sees the packages installed system-wide, or --python of an environment that has them"
  die "pip could not install from the bundle${has:+; it expects the environment to have: $has ($hint)}"
fi

# 4. InPlace-ABN from its sdist, against this torch (skipped when importable)
sdist=$(ls "$WORK"/wheels/inplace[-_]abn-*.tar.gz 2>/dev/null | head -1 || true)
if [ -n "$sdist" ] && ! "$PYBIN" -c "import inplace_abn" 2>/dev/null; then
  "${pipi[@]}" setuptools_scm setuptools wheel
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")}
    gpu_arch=$("$PYBIN" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability()
                             if torch.cuda.is_available() else '')" 2>/dev/null || true)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${gpu_arch:-8.0;9.0}}
    say "building inplace-abn for CUDA arch $TORCH_CUDA_ARCH_LIST (1-3 minutes) ..."
  else
    say "building inplace-abn without CUDA kernels (no nvcc found) ..."
  fi
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYBIN" -m pip wheel -q --disable-pip-version-check --no-index \
    --no-deps --no-build-isolation -w "$WORK/built" "$sdist"
  "${pipi[@]}" --no-deps "$WORK"/built/inplace_abn-*.whl
  say "built $(ls "$WORK"/built/inplace_abn-*.whl): keep it and pass it to prepare.sh --iabn next time"
fi

# 5. data
if [ -d "$WORK/data" ]; then
  mkdir -p "$DATA_DIR"
  for d in "$WORK"/data/*/; do
    name=$(basename "$d")
    if [ -e "$DATA_DIR/$name" ]; then say "$DATA_DIR/$name exists: kept as it is"; continue; fi
    cp -r "$d" "$DATA_DIR/$name"
    say "data: $DATA_DIR/$name"
  done
fi

"$PYBIN" - <<'PYEOF' || true
import importlib
line = []
for mod, name in (("torch", "torch"), ("timm", "timm"), ("nvidia.dali", "DALI"), ("inplace_abn", "inplace-abn"),
                  ("tresnet_train", "tresnet-train")):
    try:
        m = importlib.import_module(mod)
        line.append(f"{name} {getattr(m, '__version__', 'ok')}")
        if mod == "torch":
            line.append(f"CUDA {m.version.cuda}, GPU: {m.cuda.get_device_name() if m.cuda.is_available() else 'none'}")
    except Exception as e:  # noqa: BLE001 - a report, not a check
        line.append(f"{name} missing ({type(e).__name__})")
print("[offline-install] " + " | ".join(line))
PYEOF
[ "$PYBIN" = "$VENV/bin/python" ] && say "use it: source $VENV/bin/activate"
[ -d "$WORK/data" ] && say "data folders: export TRESNET_DATA=$(cd "$DATA_DIR" && pwd)"
exit 0
