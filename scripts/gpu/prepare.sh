#!/usr/bin/env bash
# Build the payload a GPU lease needs, HERE (a CPU machine that reaches PyPI), and print the calls.
#
#   bash scripts/gpu/prepare.sh            # LEAN=1 drops nvcomp, nvJPEG2000 and nvTIFF (see below)
#
# The lease's machine (nvidia-h100-x1 / nvidia-h200) has torch, timm, nvcc and Python 3.12 but no
# DALI, no InPlace-ABN and no network, and each `run` call carries at most 64 MiB of working tree
# plus `carry` paths (/work/.library/device/README.md). So this script
#   1. downloads nvidia-dali-cuda130 and every wheel it needs that the image lacks (cp312, x86_64),
#      and the inplace-abn sdist with the build tools its setup.py imports (setuptools_scm 10 needs
#      vcs-versioning, which needs packaging >= 26.2);
#   2. installs the wheels into one folder (pip --target, for Python 3.12), drops the extension
#      modules built for other Pythons (~45 MB) and packs it with xz (199 MB DALI wheel -> ~135 MB);
#   3. appends imagenette-128 (tar.gz; JPEGs barely compress, tar headers do);
#   4. splits that payload into parts that fit one call each beside the working tree, writes
#      sha256 sums, and prints which paths each call carries.
# Everything lands in the git-ignored .gpu_payload/: kit/ (sdist, build tools, manifest; carried in
# every call) and call<N>/ (one payload part each). scripts/gpu/install.sh, run THERE, stages the
# parts into /tmp across calls and installs once all have arrived. It also copies the data to the
# ignored .data/imagenette-128, which a call can carry directly (55 MiB: that call carries nothing else).
# Idempotent: downloads and the packed site are reused while the pins below are unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
PAYLOAD=.gpu_payload
DATA_SRC=${DATA_SRC:-../shared/data/imagenette-128}
LEAN=${LEAN:-0}
MARGIN_MIB=${MARGIN_MIB:-4}   # headroom for files other sessions add to the tree before the lease
LIMIT=$((64 * 1024 * 1024))   # bytes one call may carry: working tree + carry paths

# Wheels the image lacks (KINDS.md lists what it has: numpy, six, packaging, pyyaml, typing-extensions,
# wheel, setuptools, nvidia-nvtx...). Versions are the ones tested on CPU in this project's .venv.
PINS=(
  nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43
  astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
)
# DALI pins nvcomp and nvImageCodec's [all] extra pulls nvJPEG2000 and nvTIFF; none is linked at
# load time (readelf: no DT_NEEDED), they are dlopen'ed by the inflate operator and the TIFF/J2K
# codecs only. LEAN=1 leaves them out to save ~25 MiB; JPEG decoding (CPU and GPU) does not use them.
[ "$LEAN" = 1 ] || PINS+=(nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82)
BUILD_PINS=(setuptools_scm==10.3.4 vcs-versioning==2.6.0 packaging==26.3)
IABN=inplace-abn==1.1.0
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        "${PLATFORMS[@]}")
pip=("$PY" -m pip --disable-pip-version-check -q)

mkdir -p "$PAYLOAD/wheels" "$PAYLOAD/kit" "$PAYLOAD/build"
echo "1/4 downloading wheels (cp312, manylinux x86_64) into $PAYLOAD/wheels ..."
"${pip[@]}" download --no-deps "${TARGET[@]}" -d "$PAYLOAD/wheels" "${PINS[@]}"
"${pip[@]}" download --no-deps --only-binary=:all: -d "$PAYLOAD/kit" "${BUILD_PINS[@]}"
# The sdist's metadata step imports torch and setuptools_scm: no build isolation.
ls "$PAYLOAD"/kit/inplace[-_]abn-*.tar.gz >/dev/null 2>&1 ||
  "${pip[@]}" download --no-deps --no-binary=:all: --no-build-isolation -d "$PAYLOAD/kit" "$IABN"

# Every requirement of every wheel is either carried or on the image (Python 3.12, Linux).
"$PY" - "$PAYLOAD/wheels" <<'PYEOF'
import sys, zipfile, pathlib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
on_image = {"numpy", "six", "packaging", "pyyaml", "typing-extensions", "wheel", "setuptools", "nvidia-nvtx"}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
wheels = sorted(pathlib.Path(sys.argv[1]).glob("*.whl"))
have = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker and not req.marker.evaluate(env):
                    continue
                name = canonicalize_name(req.name)
                optional = name in {"nvidia-libnvcomp-cu13", "nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13"}
                if name not in have | on_image and not optional:
                    missing.append(f"{w.name} needs {req}")
if missing:
    sys.exit("missing wheels:\n  " + "\n  ".join(missing))
print(f"   {len(wheels)} wheels; every requirement is carried or on the image")
PYEOF

stamp="$PAYLOAD/build/site-$( (printf '%s\n' "${PINS[@]}"; ls "$PAYLOAD/wheels") | sha256sum | cut -c1-12).tar.xz"
if [ ! -f "$stamp" ]; then
  echo "2/4 installing into one folder for Python 3.12 and packing it with xz (several minutes) ..."
  rm -rf "$PAYLOAD/build/site" "$PAYLOAD"/build/site-*.tar.xz
  wheels=()
  for pin in "${PINS[@]}"; do
    name=$(echo "${pin%%==*}" | tr '-' '_')
    wheels+=("$(ls "$PAYLOAD"/wheels/"$name"-"${pin##*==}"-*.whl | head -1)")
  done
  "${pip[@]}" install --no-deps --no-index --no-compile "${TARGET[@]}" --target "$PAYLOAD/build/site" "${wheels[@]}"
  find "$PAYLOAD/build/site" -name '*.cpython-3*' ! -name '*.cpython-312-*' -delete
  find "$PAYLOAD/build/site" -name __pycache__ -prune -exec rm -rf {} +
  tar -C "$PAYLOAD/build/site" -cf - . | xz -T0 -6 > "$stamp.tmp"
  mv "$stamp.tmp" "$stamp"
  rm -rf "$PAYLOAD/build/site"
else
  echo "2/4 packed site up to date: $stamp"
fi

echo "3/4 packing $DATA_SRC ..."
[ -d "$DATA_SRC/train" ] || { echo "no dataset at $DATA_SRC (set DATA_SRC)"; exit 1; }
data_tgz="$PAYLOAD/build/imagenette-128.tar.gz"
if [ ! -f "$data_tgz" ] || [ -n "$(find "$DATA_SRC" -newer "$data_tgz" -print -quit)" ]; then
  tar -C "$(dirname "$DATA_SRC")" -cf - "$(basename "$DATA_SRC")" | gzip -6 > "$data_tgz.tmp"
  mv "$data_tgz.tmp" "$data_tgz"
fi
mkdir -p .data
[ -d .data/imagenette-128/train ] || cp -r "$DATA_SRC" .data/imagenette-128

echo "4/4 splitting into parts that fit one call each ..."
cp -p "$stamp" "$PAYLOAD/build/site.tar.xz"  # -p: same mtime, same payload sha on a re-run
tar -C "$PAYLOAD/build" -cf "$PAYLOAD/build/payload.tar" site.tar.xz imagenette-128.tar.gz
rm "$PAYLOAD/build/site.tar.xz"
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
             "$PY" -c "import os,sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split('\0') if os.path.isfile(p)))")
rm -f "$PAYLOAD"/kit/manifest.sha256 "$PAYLOAD"/kit/plan.txt
kit_bytes=$(du -cb "$PAYLOAD"/kit/* | tail -1 | cut -f1)
part_bytes=$((LIMIT - tree_bytes - kit_bytes - MARGIN_MIB * 1024 * 1024))
rm -rf "$PAYLOAD"/call* "$PAYLOAD/build/parts"
mkdir -p "$PAYLOAD/build/parts"
split -b "$part_bytes" -d -a 2 "$PAYLOAD/build/payload.tar" "$PAYLOAD/build/parts/payload.part"
(cd "$PAYLOAD/build" && sha256sum payload.tar | sed 's/ .*/  payload.tar/') > "$PAYLOAD/kit/manifest.sha256"
n=0
for part in "$PAYLOAD"/build/parts/payload.part*; do
  n=$((n + 1))
  mkdir -p "$PAYLOAD/call$n"
  mv "$part" "$PAYLOAD/call$n/"
  (cd "$PAYLOAD/call$n" && sha256sum payload.part*) >> "$PAYLOAD/kit/manifest.sha256"
done
rm -rf "$PAYLOAD/build/parts" "$PAYLOAD/build/payload.tar"
(cd "$PAYLOAD/kit" && sha256sum -- *.whl *.tar.gz) >> "$PAYLOAD/kit/manifest.sha256"

mib() { echo "$(( ($1 + 1048575) / 1048576 )) MiB"; }
{
  echo "GPU lease payload: $n part(s) of at most $(mib "$part_bytes"); working tree now $(mib "$tree_bytes"), kit $(mib "$kit_bytes")."
  echo "Make the calls back to back: the machine keeps /tmp only while warm (30 s after a call)."
  for i in $(seq 1 "$n"); do
    size=$(du -cb "$PAYLOAD/call$i" "$PAYLOAD/kit" | tail -1 | cut -f1)
    echo "  call $i: carry [\"$PAYLOAD/kit\", \"$PAYLOAD/call$i\"]  ($(mib $((size + tree_bytes))) with the tree)"
  done
  echo "  every call starts: bash scripts/gpu/install.sh && . /tmp/tresnet_gpu/env.sh && ..."
  echo "  later calls (all parts staged): carry [\"$PAYLOAD/kit\"]"
  echo "  a call with no staging that needs only the data: carry [\".data/imagenette-128\"], IMAGENETTE_ROOT=.data/imagenette-128"
  echo "See benchmarks/README.md for what each call runs."
} | tee "$PAYLOAD/kit/plan.txt"
