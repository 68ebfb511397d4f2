#!/usr/bin/env bash
# Download, where the package registry is reachable, the wheels an offline CUDA image lacks
# (bench/gpu_wheels.txt) into .gpu-wheels/ (git-ignored), for bench/gpu_check.sh to install there.
#
#   bench/gpu_wheels.sh [DEST]          # default: .gpu-wheels in the checkout
#
# GPU_PYTHON_VERSION (default 3.12) is the target machine's Python. The target's wheels are fetched
# whatever this machine runs (--python-version/--platform), with --no-deps: every dependency is named
# in gpu_wheels.txt. The folder is replaced only once every download succeeded.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.gpu-wheels}
py=${PYTHON:-python3}
version=${GPU_PYTHON_VERSION:-3.12}
mapfile -t pins < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$root/bench/gpu_wheels.txt")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  "${platforms[@]}" -d "$tmp" "${pins[@]}"
count=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$count" -ne "${#pins[@]}" ]; then
  echo "gpu_wheels.sh: expected ${#pins[@]} wheels (bench/gpu_wheels.txt), got $count in $tmp" >&2
  exit 1
fi
rm -rf "$dest"
mkdir -p "$dest"
mv "$tmp"/*.whl "$dest"/
echo "gpu_wheels.sh: $count wheels for CPython $version x86-64 in $dest ($(du -sh "$dest" | cut -f1))"
