#!/usr/bin/env bash
# The GPU check in one command on an offline CUDA machine (no registry, no `pip install -e`):
#
#   bash bench/gpu_check.sh                      # on one H100/H200: under 8 minutes
#   bash bench/gpu_check.sh --tiny --device cpu  # the CPU rehearsal (tests/test_gpu_check.py)
#
# 1. Installs the wheels bench/gpu_wheels.sh downloaded (.gpu-wheels/, or $GPU_WHEELS) with
#    `pip install --no-index --no-deps --target $GPU_SITE` (default /tmp/site), and runs the project from
#    this checkout: PYTHONPATH=checkout:site. Without wheels it uses what is installed.
# 2. Checks that the training path imports, naming the missing package if not.
# 3. Runs bench/gpu_check.py (arguments passed on): tests/gpu with its full output in
#    $OUT/pytest_gpu.txt, runpod_1b and runpod_2b single / DDP / FSDP2 on world size 1, packed
#    attention (flex against dense, where the model has flex), save and resume; every figure in
#    $OUT/gpu_check.json and the whole console in $OUT/gpu_check.log.
# OUT defaults to ./gpu-check-out; PYTORCH_CUDA_ALLOC_CONF defaults to expandable_segments:True.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$PWD/gpu-check-out}
wheels=${GPU_WHEELS:-$root/.gpu-wheels}
site=${GPU_SITE:-/tmp/site}
py=${PYTHON:-python3}
mkdir -p "$out"
shopt -s nullglob
whls=("$wheels"/*.whl)
if [ ${#whls[@]} -gt 0 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${whls[@]}" \
    || { echo "gpu_check.sh: installing ${#whls[@]} wheels from $wheels into $site failed (see above)" >&2; exit 2; }
  export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check.sh: ${#whls[@]} wheels from $wheels installed into $site"
else
  export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check.sh: no wheels in $wheels: using the installed packages (bench/gpu_wheels.sh fetches them)"
fi
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cd "$root"
if ! "$py" -c "import training.trainer, training.cli, training.memory_plan" >"$out/import_check.txt" 2>&1; then
  cat "$out/import_check.txt" >&2
  echo "gpu_check.sh: the training path does not import here ($(tail -n 1 "$out/import_check.txt")): run bench/gpu_wheels.sh where the registry is reachable and bring .gpu-wheels" >&2
  exit 2
fi
rm -f "$out/import_check.txt"
"$py" bench/gpu_check.py --out "$out/gpu_check.json" --tests-log "$out/pytest_gpu.txt" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
