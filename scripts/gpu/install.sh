#!/usr/bin/env bash
# Run THERE, on the leased GPU machine, at the start of every `run` call:
#
#   bash scripts/gpu/install.sh && . /tmp/tresnet_gpu/env.sh && <the work>
#
# Idempotent; each call does only what is still missing:
#   1. stages the payload part this call carries (.gpu_payload/call<N>/, made by prepare.sh) into
#      /tmp/tresnet_gpu/parts after checking its sha256: the working tree is shipped afresh with each
#      call, /tmp survives between calls only while the machine stays warm;
#   2. builds InPlace-ABN from the carried sdist for sm_90 (about a minute with 16 cores), or installs
#      a wheel a previous lease built (.gpu_payload/kit/inplace_abn-*.whl), into /tmp/tresnet_gpu/iabn;
#      a freshly built wheel is copied to $OUT so it can be kept in the kit for the next lease;
#   3. once every part is staged: joins them, checks the whole payload's sha256, unpacks DALI and
#      its wheels (pip --target tree for Python 3.12) into /tmp/tresnet_gpu/site and imagenette-128
#      into /tmp/tresnet_gpu/data;
#   4. writes /tmp/tresnet_gpu/env.sh (PYTHONPATH, LD_LIBRARY_PATH, IMAGENETTE_ROOT) and prints versions.
# It exits 0 while parts are still missing (the call's other work can go on without DALI) and non-zero
# only on a real failure (bad checksum, failed build). SKIP_IABN=1 skips step 2; CHECK_DALI=0 skips the
# GPU decode check.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpu_payload/kit
STATE=${TRESNET_GPU_STATE:-/tmp/tresnet_gpu}
PY=${PYTHON:-python3}
MANIFEST=$KIT/manifest.sha256
say() { echo "[gpu-install] $*"; }

if [ ! -f "$MANIFEST" ]; then
  say "no $MANIFEST: run scripts/gpu/prepare.sh on the CPU machine and carry .gpu_payload/kit"
  exit 1
fi
sha_of() { awk -v n="$1" '$2 == n {print $1}' "$MANIFEST"; }
payload_sha=$(sha_of payload.tar)
mkdir -p "$STATE/parts"
# A payload from another prepare.sh run invalidates what was staged before.
if [ "$(cat "$STATE/payload.sha256" 2>/dev/null)" != "$payload_sha" ]; then
  rm -rf "$STATE/parts" "$STATE/site" "$STATE/data" "$STATE/payload.done"
  mkdir -p "$STATE/parts"
  echo "$payload_sha" > "$STATE/payload.sha256"
fi

# 1. stage the part(s) this call carries
for part in .gpu_payload/call*/payload.part*; do
  [ -f "$part" ] || continue
  name=$(basename "$part")
  want=$(sha_of "$name")
  if [ "$(cat "$STATE/parts/$name.ok" 2>/dev/null)" = "$want" ]; then
    say "$name already staged"
    continue
  fi
  got=$(sha256sum "$part" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    say "$part: sha256 $got does not match the manifest ($want): re-run prepare.sh and carry again"
    exit 1
  fi
  cp "$part" "$STATE/parts/$name.tmp" && mv "$STATE/parts/$name.tmp" "$STATE/parts/$name"
  echo "$want" > "$STATE/parts/$name.ok"
  say "staged $name"
done

# 2. InPlace-ABN (needs only the kit; torch, nvcc and ninja are on the image)
IABN=$STATE/iabn
if [ "${SKIP_IABN:-0}" = 1 ]; then
  say "inplace-abn: skipped (SKIP_IABN=1)"
elif PYTHONPATH=$IABN "$PY" -c "import inplace_abn" 2>/dev/null; then
  say "inplace-abn: ready"
else
  pipi=("$PY" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check)
  prebuilt=$(ls $KIT/inplace_abn-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$prebuilt" ]; then
    "${pipi[@]}" --target "$IABN" "$prebuilt" || true
  fi
  build_iabn() {
    rm -rf "$IABN" "$STATE/iabn-wheel"
    "${pipi[@]}" --target "$STATE/buildtools" $KIT/setuptools_scm-*.whl $KIT/vcs_versioning-*.whl $KIT/packaging-*.whl
    nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$nvcc_bin")")")}
    # setup.py imports torch and setuptools_scm (hence no isolation); the arch list must be set.
    PYTHONPATH=$STATE/buildtools TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
      "$PY" -m pip wheel -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --disable-pip-version-check -w "$STATE/iabn-wheel" $KIT/inplace-abn-*.tar.gz
    "${pipi[@]}" --target "$IABN" "$STATE"/iabn-wheel/inplace_abn-*.whl
    PYTHONPATH=$IABN "$PY" -c "import inplace_abn"
  }
  if ! PYTHONPATH=$IABN "$PY" -c "import inplace_abn" 2>/dev/null; then
    say "building inplace-abn for sm_90 ..."
    t0=$(date +%s)
    # A failed build is reported, not fatal: the iabn variants then record the import error.
    if (set -e; build_iabn); then
      say "inplace-abn built in $(( $(date +%s) - t0 )) s"
      if [ -n "${OUT:-}" ]; then
        cp "$STATE"/iabn-wheel/inplace_abn-*.whl "$OUT/"
        say "wheel copied to \$OUT: keep it in .gpu_payload/kit/ to skip the build next lease"
      fi
    else
      rm -rf "$IABN"
      say "inplace-abn build FAILED (output above); going on without it"
    fi
  fi
fi

# 3. join, check and unpack the payload once every part is here
n_want=$(grep -c ' payload\.part' "$MANIFEST")
n_have=$(find "$STATE/parts" -name 'payload.part*.ok' | wc -l)
if [ -f "$STATE/payload.done" ]; then
  say "DALI and imagenette-128: ready"
elif [ "$n_have" -lt "$n_want" ]; then
  missing=$(for f in $(awk '$2 ~ /^payload\.part/ {print $2}' "$MANIFEST"); do
              [ -f "$STATE/parts/$f.ok" ] || printf '%s ' "$f"; done)
  say "DALI and imagenette-128: $n_have/$n_want parts staged; still to carry: $missing"
else
  say "all $n_want parts staged: joining and unpacking ..."
  cat "$STATE"/parts/payload.part?? > "$STATE/parts/payload.tar"
  got=$(sha256sum "$STATE/parts/payload.tar" | cut -d' ' -f1)
  if [ "$got" != "$payload_sha" ]; then
    say "joined payload sha256 $got does not match the manifest: staging is broken"
    exit 1
  fi
  tar -xf "$STATE/parts/payload.tar" -C "$STATE/parts"
  rm -rf "$STATE/site" "$STATE/data"
  mkdir -p "$STATE/site" "$STATE/data"
  # Python's lzma and tarfile: no xz binary needed on the image.
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" \
    "$STATE/parts/site.tar.xz" "$STATE/site"
  tar -xzf "$STATE/parts/imagenette-128.tar.gz" -C "$STATE/data"
  rm -f "$STATE"/parts/payload.part?? "$STATE/parts/payload.tar" "$STATE/parts/site.tar.xz" "$STATE/parts/imagenette-128.tar.gz"
  touch "$STATE/payload.done"
  say "DALI and imagenette-128: unpacked"
fi

# 4. the environment later commands source
{
  echo "# written by scripts/gpu/install.sh"
  echo "export TRESNET_TRAIN_CACHE=$STATE/cache"
  if [ -d "$IABN/inplace_abn" ]; then echo "export PYTHONPATH=$IABN\${PYTHONPATH:+:\$PYTHONPATH}"; fi
  if [ -f "$STATE/payload.done" ]; then
    echo "export PYTHONPATH=$STATE/site\${PYTHONPATH:+:\$PYTHONPATH}"
    echo "export LD_LIBRARY_PATH=$STATE/site/nvidia/cu13/lib:$STATE/site/nvidia/libnvcomp/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo "export IMAGENETTE_ROOT=$STATE/data/imagenette-128"
  fi
} > "$STATE/env.sh"
# shellcheck disable=SC1091
. "$STATE/env.sh"

"$PY" - <<'PYEOF'
import importlib, subprocess
import torch
line = [f"torch {torch.__version__}", f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}"]
if torch.cuda.is_available():
    line.append(torch.cuda.get_device_name())
    try:
        drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        line.append(f"driver {drv}")
    except Exception:  # noqa: BLE001 - informative only
        pass
for mod, name in (("timm", "timm"), ("nvidia.dali", "DALI"), ("inplace_abn", "inplace-abn")):
    try:
        m = importlib.import_module(mod)
        line.append(f"{name} {getattr(m, '__version__', 'ok')}")
    except Exception as e:  # noqa: BLE001
        line.append(f"{name} missing ({type(e).__name__})")
print("[gpu-install] " + " | ".join(line))
PYEOF

# A GPU JPEG decode of a few images, so a broken DALI shows up before a benchmark depends on it.
if [ -f "$STATE/payload.done" ] && [ "${CHECK_DALI:-1}" = 1 ] && [ ! -f "$STATE/dali.checked" ]; then
  "$PY" - "$IMAGENETTE_ROOT/val" <<'PYEOF' && touch "$STATE/dali.checked"
import sys
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

@pipeline_def(batch_size=8, num_threads=4, device_id=0)
def pipe():
    jpegs, labels = fn.readers.file(file_root=sys.argv[1], random_shuffle=False, name="r")
    images = fn.decoders.image(jpegs, device="mixed")
    return fn.resize(images, resize_x=64, resize_y=64), labels

p = pipe()
p.build()
batch = next(iter(DALIGenericIterator([p], ["x", "y"], reader_name="r")))[0]
print(f"[gpu-install] DALI GPU decode ok: {tuple(batch['x'].shape)} on {batch['x'].device}")
PYEOF
  [ -f "$STATE/dali.checked" ] || say "DALI GPU decode check FAILED (output above)"
fi
mkdir -p "$STATE/results"
exit 0
