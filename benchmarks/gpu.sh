#!/usr/bin/env bash
# One command for the day a GPU is lent: build catfast's extension for this machine, run the kernel and
# parity tests on CUDA, then `catfast bench train-step` (SD1.5, bf16, batch 1 and 4, every contestant),
# the measured CUDA memory table, `catfast bench serve` and `catfast bench ops`; results go to
# benchmarks/results/gpu-<device>.jsonl (one JSON line per stage, logs beside it). ~8 minutes on one H100-class
# GPU; each stage has its own time limit (benchmarks/gpu_run.py) and a failing stage does not stop the rest.
#
#   bash benchmarks/gpu.sh            # on a machine with CUDA
#   bash benchmarks/gpu.sh --smoke    # tiny shapes on the CPU: the dry run the test suite makes
#   bash benchmarks/gpu.sh --only train,memory --out /tmp/r
#
# Where packages are missing (diffusers on a bare GPU image), put their wheels in .whl/ and they are installed
# into a private folder first; nothing is installed system-wide.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/catfast-site .whl/*.whl \
    || { echo "gpu.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/catfast-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
smoke=0
for a in "$@"; do [ "$a" = --smoke ] && smoke=1; done
if [ $smoke = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
  echo "+ building catfast's extension in place (CUDA part where the toolkit and a CUDA torch are present)"
  start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} "$py" setup.py -q build_ext --inplace 2>&1 | tail -5
  echo "+ build took $(( $(date +%s) - start )) s"
fi
"$py" -c "import catfast._ext as e; print('catfast._C:', 'loaded' if e.EXT else e.EXT_ERROR)"
exec "$py" benchmarks/gpu_run.py "$@"
