#!/usr/bin/env bash
# One-shot check on a machine with a GPU, torch already installed and nothing to download:
# builds shardpipe against that torch, runs the CUDA tests, runs the GPU benchmarks and
# prints their tables. Every step has a timeout; together they stay under 10 minutes.
#   bash benchmarks/gpu_check.sh          (from the repository root or anywhere)
# Each step is timed out on its own; a failing step is reported and the rest still run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
summary=()

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to $OUT/NAME.log, remember the outcome
  local name="$1" limit="$2"
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  summary+=("$(printf '%-14s %-6s %4d s' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - t0)))")
  return "$rc"
}

"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null

failed=0
if step build 200 env MAX_JOBS=16 SHARDPIPE_WITH_CUDA=1 "$PY" setup.py --quiet build_ext --inplace; then
  step cuda-tests 180 "$PY" -m pytest tests/python -m cuda -q -p no:cacheprovider || failed=1
  # GPU benchmarks, one line each; their timeouts keep the whole script under 10 minutes.
  step copy-bench 60 "$PY" benchmarks/copy_bench.py --plot "$OUT/copy_bench.png" || failed=1
  step pipeline-bench 60 "$PY" benchmarks/pipeline_bench.py --repeats 5 --out "$OUT" || failed=1
  step tp-bench 60 "$PY" benchmarks/tp_bench.py --steps 3 --rounds 2 || failed=1
  step resnet50 120 "$PY" benchmarks/resnet50.py --batches 3 --repeats 3 --chunks 1 2 4 8 \
    --no-torch-pipelining || failed=1
else
  failed=1
fi

echo
echo "== gpu_check summary"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/cuda-tests.log" ] && echo "cuda tests: $(tail -n 1 "$OUT/cuda-tests.log")"
exit "$failed"
