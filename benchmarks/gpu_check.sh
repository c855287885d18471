#!/usr/bin/env bash
# The GPU check: run it whenever a GPU machine is available.
#
#   benchmarks/gpu_check.sh OUT_DIR              # on a machine with CUDA: fails fast without one
#   benchmarks/gpu_check.sh OUT_DIR --cpu-smoke  # the same fit on CPU for a few steps (tests the script)
#   GPU_CHECK_CPU_SMOKE=1 benchmarks/gpu_check.sh OUT_DIR   # same as --cpu-smoke
#
# Runs, writing JSON and logs to OUT_DIR (correctness first, so a cut-short run still answers it):
#   1. the CUDA tests (a GPU step of every callback under set_sync_debug_mode("error"), the compiled step on the
#      GPU against the eager one)  -> cuda_tests.log
#   2. benchmarks/gpu_fit.py         -> gpu_fit.json, gpu_fit.log: a one-GPU fit with every callback, median
#      step time and host syncs per step (torch.cuda.set_sync_debug_mode("warn")); next to it
#      benchmarks/op_count.py        -> op_count.json: the tensor ops (kernel launches) of one step per callback,
#      counted on the meta device (ops_<callback>_sync / ops_<callback>_nosync; no GPU needed)
#   3. benchmarks/overhead.py        -> overhead.json, overhead.log   (with --accelerator gpu if it takes one);
#      the same with LossReweighting(compile=...) -> overhead_compiled.json (mode "default") and
#      overhead_cudagraphs.json (mode "reduce-overhead"); benchmarks/compile_step.py --device cuda ->
#      compile_step.json: launches, step time and agreement of the compiled step against the eager one
#   4. benchmarks/sampler_speed.py   -> sampler_speed.json, sampler_speed.log
#   5. benchmarks/fsdp_check.py      -> fsdp.json, fsdp.log: FSDP vs DDP on every visible GPU
# plus nvidia-smi.txt and summary.txt (every figure, one per line). In --cpu-smoke mode only step 2 runs
# (the fit on CPU, 4 steps, and the op count), unless GPU_CHECK_SMOKE_BENCHMARKS=1 adds steps 3-4 with --quick
# (and compile_step.py --quick on the CPU).
# Environment: PYTHON (default: python), GPU_CHECK_QUICK=1 passes --quick to every benchmark,
# GPU_CHECK_STEP_TIMEOUT=SECONDS stops a step that runs longer (it counts as failed; the next step runs),
# GPU_CHECK_SAMPLER_ARGS adds arguments to sampler_speed.py (e.g. "--sizes 1e7" for a short run: the full one
# times torch.multinomial at 1e8, minutes of CPU time).
# Exit status: 0 all passed, 2 usage or no CUDA device, 1 a benchmark failed (the others still ran).
set -uo pipefail

usage() { echo "usage: $0 OUT_DIR [--cpu-smoke]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT="$1"; shift
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'" >&2; usage ;;
  esac
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
cd "$REPO" || exit 2

if [ "$SMOKE" != "1" ]; then  # one interpreter start: torch importable (else 4), a CUDA device (else 3)
  "$PY" -c "
import sys
try:
    import torch
except Exception:
    sys.exit(4)
sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 3)" 2>/dev/null
  case $? in
    0) ;;
    3) echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False): run this on a GPU machine," \
            "or pass --cpu-smoke to check the script itself on CPU." >&2
       exit 2 ;;
    *) echo "gpu_check.sh: cannot import torch with '$PY'; set PYTHON to the project's interpreter." >&2
       exit 2 ;;
  esac
fi

mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
START=$(date +%s)
STATUS=0
QUICK=()
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && QUICK=(--quick)

step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, report elapsed time, remember a failure
  local name="$1"; shift
  echo "[gpu_check $(( $(date +%s) - START )) s] $name: $*"
  local limit=()
  [ -n "${GPU_CHECK_STEP_TIMEOUT:-}" ] && limit=(timeout "$GPU_CHECK_STEP_TIMEOUT")
  if "${limit[@]}" "$@" > "$OUT/$name.log" 2>&1; then
    echo "[gpu_check $(( $(date +%s) - START )) s] $name: ok"
  else
    echo "[gpu_check $(( $(date +%s) - START )) s] $name: FAILED (exit $?), see $OUT/$name.log" >&2
    tail -n 20 "$OUT/$name.log" >&2
    STATUS=1
  fi
}

if [ "$SMOKE" = "1" ]; then
  echo "[gpu_check] CPU smoke mode: the fit on CPU for 4 steps"
  if [ "${GPU_CHECK_SMOKE_BENCHMARKS:-0}" = "1" ]; then
    step overhead "$PY" benchmarks/overhead.py --quick --json "$OUT/overhead.json" --out "$OUT"
    step sampler_speed "$PY" benchmarks/sampler_speed.py --quick --json "$OUT/sampler_speed.json" --out "$OUT"
    step compile_step "$PY" benchmarks/compile_step.py --quick --device cpu --json "$OUT/compile_step.json" --out "$OUT"
  fi
  step gpu_fit "$PY" benchmarks/gpu_fit.py --device cpu --steps 4 --batch-size 32 --json "$OUT/gpu_fit.json"
  step op_count "$PY" benchmarks/op_count.py --quick --json "$OUT/op_count.json"
else
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
  OVERHEAD_ARGS=()
  if "$PY" benchmarks/overhead.py --help 2>/dev/null | grep -q -- "--accelerator"; then
    OVERHEAD_ARGS=(--accelerator gpu)
  fi
  step cuda_tests "$PY" -m pytest tests/callbacks/test_device_path.py tests/core/test_device.py \
    "tests/core/test_compile.py::test_the_compiled_step_on_a_gpu_equals_the_eager_one" -rs \
    -p no:cacheprovider
  step gpu_fit "$PY" benchmarks/gpu_fit.py --device cuda "${QUICK[@]}" --json "$OUT/gpu_fit.json"
  step op_count "$PY" benchmarks/op_count.py --quick --json "$OUT/op_count.json"
  step overhead "$PY" benchmarks/overhead.py "${QUICK[@]}" "${OVERHEAD_ARGS[@]}" --json "$OUT/overhead.json" --out "$OUT"
  step compile_step "$PY" benchmarks/compile_step.py "${QUICK[@]}" --device cuda --json "$OUT/compile_step.json" --out "$OUT"
  step overhead_compiled "$PY" benchmarks/overhead.py "${QUICK[@]}" "${OVERHEAD_ARGS[@]}" --compile default \
    --json "$OUT/overhead_compiled.json" --out "$OUT/compiled"
  step overhead_cudagraphs "$PY" benchmarks/overhead.py "${QUICK[@]}" "${OVERHEAD_ARGS[@]}" --compile reduce-overhead \
    --json "$OUT/overhead_cudagraphs.json" --out "$OUT/cudagraphs"
  read -r -a SAMPLER_ARGS <<< "${GPU_CHECK_SAMPLER_ARGS:-}"
  step sampler_speed "$PY" benchmarks/sampler_speed.py "${QUICK[@]}" "${SAMPLER_ARGS[@]}" --json "$OUT/sampler_speed.json" --out "$OUT"
  step fsdp "$PY" benchmarks/fsdp_check.py --steps 4 --json "$OUT/fsdp.json"
fi

# every figure of every JSON written, one per line
"$PY" - "$OUT" > "$OUT/summary.txt" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    for key, value in json.loads(path.read_text()).get("figures", {}).items():
        print(f"{path.stem}.{key} = {value}")
EOF
cat "$OUT/summary.txt"
echo "[gpu_check $(( $(date +%s) - START )) s] done: $( [ $STATUS = 0 ] && echo 'all passed' || echo 'some step FAILED' ); outputs in $OUT"
exit $STATUS
