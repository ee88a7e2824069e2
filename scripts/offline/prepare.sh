#!/usr/bin/env bash
# Install on a GPU machine without internet, step 1 of 2: on a machine WITH internet, bundle the wheels
# (this package, its dependencies, DALI, InPlace-ABN) and optionally data folders for the target's
# Python and CPU, in parts of a chosen size. Step 2, on the target: scripts/offline/install.sh.
#
#   bash scripts/offline/prepare.sh [options] [REQUIREMENT ...]
#
#   --python-version X.Y   the target's Python (default: this machine's)
#   --arch x86_64|aarch64  the target's CPU (default: this machine's); Linux (manylinux) wheels
#   --extras LIST          this package's extras to bundle (default: dali-cu13; `dali` for CUDA 12)
#   --no-torch             leave out torch, torchvision and what only they need (the target has them:
#                          a cluster module, a container image); same as --exclude torch,torchvision
#   --exclude NAMES        comma list of other distributions the target already has
#   --iabn sdist|none|FILE InPlace-ABN: its sdist and build tools, built on the target against its
#                          torch and CUDA (default: sdist); none; or a wheel built for the target
#                          (same Python, torch and CUDA: install.sh prints where it left the one it built)
#   --data DIR             a folder to bundle (repeatable), e.g. a dataset; unpacked on the target
#                          under install.sh's --data-dir with the same folder name
#   --part-size SIZE       parts of at most SIZE (split's units: 60M, 2G); default: one part
#   --out DIR              where the parts go (default: offline_bundle)
#
# REQUIREMENTs (pip specs) replace the default set (this package with its extras). Without --no-torch,
# torch comes from your index (PyPI's Linux x86_64 torch is a CUDA build whose NVIDIA wheels take a few
# GB); another build: set PIP_EXTRA_INDEX_URL (e.g. https://download.pytorch.org/whl/cu126) and
# TORCH_SPEC ("torch==X torchvision==Y").
# pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, ...) apply to every download.
#
# Writes OUT/bundle.tar.partNNN, OUT/bundle.sha256 (one line per part) and OUT/bundle.txt (what is
# inside). Copy OUT/ to the target (all parts in one folder, or in several: install.sh takes them all).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
die() { echo "prepare.sh: $*" >&2; exit 2; }

PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
ARCH=$(uname -m)
EXTRAS=dali-cu13
EXCLUDE=""
IABN=sdist
DATA=()
PART_SIZE=""
OUT=offline_bundle
REQS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=${2:?}; shift 2 ;;
    --arch) ARCH=${2:?}; shift 2 ;;
    --extras) EXTRAS=${2?}; shift 2 ;;
    --no-torch) EXCLUDE="$EXCLUDE,torch,torchvision"; shift ;;
    --exclude) EXCLUDE="$EXCLUDE,${2:?}"; shift 2 ;;
    --iabn) IABN=${2:?}; shift 2 ;;
    --data) [ -d "${2:?}" ] || die "--data $2: no such folder"; DATA+=("$2"); shift 2 ;;
    --part-size) PART_SIZE=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) REQS+=("$1"); shift ;;
  esac
done
case "$ARCH" in x86_64|aarch64) ;; *) die "--arch $ARCH: x86_64 or aarch64" ;; esac
[[ "$PYVER" =~ ^3\.[0-9]+$ ]] || die "--python-version $PYVER: expected 3.X"
case "$IABN" in sdist|none) ;; *.whl) [ -f "$IABN" ] || die "--iabn $IABN: no such file" ;;
  *) die "--iabn $IABN: sdist, none or a .whl file" ;; esac

ABI=cp${PYVER/./}
TARGET=(--only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none)
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 linux; do
  TARGET+=(--platform "${p}_${ARCH}")
done
pip=("$PY" -m pip --disable-pip-version-check -q)
WORK=$OUT/.work
rm -rf "$WORK" && mkdir -p "$WORK/wheels"
: > "$WORK/requirements.txt"

# 1. what to install on the target (requirements.txt) and what pip must resolve for it
RESOLVE=()
if [ ${#REQS[@]} -eq 0 ]; then
  echo "1/4 building this package's wheel ..."
  "${pip[@]}" wheel --no-deps --no-build-isolation -w "$WORK/wheels" . > "$WORK/wheel.log" 2>&1 ||
    { cat "$WORK/wheel.log" >&2; die "building this package's wheel failed (output above)"; }
  project=$(ls "$WORK"/wheels/tresnet_train-*.whl)
  pip_extras=$(echo "$EXTRAS" | tr ',' '\n' | grep -v -e '^iabn$' -e '^$' | paste -sd, - || true)
  RESOLVE+=("$project${pip_extras:+[$pip_extras]}")
  echo "tresnet-train${pip_extras:+[$pip_extras]}" >> "$WORK/requirements.txt"
  # TORCH_SPEC pins a torch build (e.g. from PIP_EXTRA_INDEX_URL); unset, the package's range decides
  if [[ ",$EXCLUDE," != *",torch,"* && -n "${TORCH_SPEC:-}" ]]; then
    read -r -a torch_pins <<< "$TORCH_SPEC"
    RESOLVE+=("${torch_pins[@]}")
    printf '%s\n' "${torch_pins[@]}" >> "$WORK/requirements.txt"
  fi
else
  RESOLVE+=("${REQS[@]}")
  printf '%s\n' "${REQS[@]}" >> "$WORK/requirements.txt"
fi
case "$IABN" in
  sdist)  # its setup.py imports torch and setuptools_scm: built on the target without isolation
    "${pip[@]}" download --no-deps --no-binary=:all: --no-build-isolation -d "$WORK/wheels" "inplace-abn>=1.1.0"
    RESOLVE+=(setuptools_scm setuptools wheel) ;;
  *.whl)
    cp "$IABN" "$WORK/wheels/"
    echo "inplace-abn" >> "$WORK/requirements.txt" ;;
esac

# 2. resolve for the target, drop what it already has, download the rest
echo "2/4 resolving for Python $PYVER on Linux $ARCH (excluded: ${EXCLUDE#,}) ..."
"${pip[@]}" install --dry-run --ignore-installed --target "$WORK/unused" --report "$WORK/report.json" \
  "${TARGET[@]}" "${RESOLVE[@]}"
"$PY" - "$WORK/report.json" "$PYVER" "$ARCH" "$EXCLUDE" "$WORK/wheels" > "$WORK/pins.txt" <<'PYEOF'
import json, sys
from pathlib import Path
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

report, pyver, arch, exclude, wheels = sys.argv[1:6]
excluded = {canonicalize_name(n) for n in exclude.split(",") if n}
env = {"python_version": pyver, "python_full_version": pyver + ".0", "implementation_version": pyver + ".0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch, "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "platform_release": "", "platform_version": ""}
items = {canonicalize_name(i["metadata"]["name"]): i for i in json.load(open(report))["install"]}
# Walk the dependency graph from what was asked for; an excluded package's own dependencies are
# kept only when something else needs them (torch's CUDA wheels go, numpy stays).
todo = [(n, tuple(i.get("requested_extras") or ())) for n, i in items.items() if i.get("requested")]
seen, keep = set(), set()
while todo:
    name, extras = todo.pop()
    if name in excluded or name not in items or (name, extras) in seen:
        continue
    seen.add((name, extras))
    keep.add(name)
    for text in items[name]["metadata"].get("requires_dist") or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("",) + extras):
            todo.append((canonicalize_name(req.name), tuple(sorted(req.extras))))
local = {p.name for p in Path(wheels).iterdir()}
for name in sorted(keep):
    item = items[name]
    if Path(item["download_info"]["url"]).name in local:  # this package's wheel, a given wheel
        continue
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
PYEOF
if [ -s "$WORK/pins.txt" ]; then
  "${pip[@]}" download --no-deps "${TARGET[@]}" -d "$WORK/wheels" -r "$WORK/pins.txt"
fi

# 3. one tar stream (wheels, requirements, data), cut into parts
echo "3/4 packing $(ls "$WORK/wheels" | wc -l) files ($(du -sh "$WORK/wheels" | cut -f1)) and ${#DATA[@]} data folder(s) ..."
{
  echo "tresnet-train offline bundle, made $(date -u +%Y-%m-%dT%H:%MZ) by scripts/offline/prepare.sh"
  echo "target: CPython $PYVER, Linux $ARCH"
  echo "the target already has (not bundled): ${EXCLUDE#,}"
  echo "install: $(paste -sd' ' "$WORK/requirements.txt")"
  echo "inplace-abn: $IABN"
  echo "wheels:"; ls "$WORK/wheels" | sed 's/^/  /'
  if [ ${#DATA[@]} -gt 0 ]; then echo "data:"; for d in "${DATA[@]}"; do echo "  $(basename "$d") ($(du -sh "$d" | cut -f1))"; done; fi
} > "$WORK/bundle.txt"
rm -f "$OUT"/bundle.tar.part* "$OUT/bundle.sha256"
"$PY" - "$WORK" "${DATA[@]}" <<'PYEOF' | split -b "${PART_SIZE:-1024G}" -d -a 3 - "$OUT/bundle.tar.part"
import sys, tarfile
from pathlib import Path
work, data = Path(sys.argv[1]), sys.argv[2:]
with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
    for name in ("bundle.txt", "requirements.txt", "wheels"):
        tar.add(work / name, arcname=name)
    for folder in data:
        tar.add(folder, arcname=f"data/{Path(folder).resolve().name}")
PYEOF

# 4. checksums
(cd "$OUT" && sha256sum bundle.tar.part*) > "$OUT/bundle.sha256"
cp "$WORK/bundle.txt" "$OUT/bundle.txt"
rm -rf "$WORK"
n=$(wc -l < "$OUT/bundle.sha256")
echo "4/4 $OUT: $n part(s), $(du -ch "$OUT"/bundle.tar.part* | tail -1 | cut -f1) in all, with bundle.sha256 and bundle.txt"
echo "On the target, with this repository and the parts copied there:"
echo "  bash scripts/offline/install.sh --venv .venv ${DATA:+--data-dir DATA_DIR }PARTS_DIR [MORE_PARTS_DIRS ...]"
