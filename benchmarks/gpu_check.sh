#!/usr/bin/env bash
# The one script a GPU machine runs: build copa_fast against the installed torch, run the tests
# (CUDA tensors included), run the benchmarks, print a compact table last. JSON and logs go to
# $OUT (default ./out). `--dry-run` does the same on a CPU-only machine at small sizes.
# Stages can be picked to split the work over two calls on a warm machine (the build stays):
#   gpu_check.sh [--dry-run] [build] [tests] [bench]      (no stage named: all three)
#
# With a lent GPU (15 minutes of device time, 10 a call): first call `bash benchmarks/gpu_check.sh
# build tests` (the build stays on the warm machine), second call `bash benchmarks/gpu_check.sh
# bench`, then give the machine back. Before spending device time, on the CPU machine:
# `python benchmarks/triton_aot.py` (every Triton kernel compiles for sm_90 / sm_80, no spills)
# and `bash benchmarks/gpu_check.sh --dry-run`.
#
# Expects torch, triton, numpy, pytest, pytest-benchmark installed; downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
STAGES=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    build|tests|bench) STAGES="$STAGES $a" ;;
    *) echo "gpu_check.sh: unknown argument $a (expected --dry-run, build, tests, bench)" >&2; exit 2 ;;
  esac
done
[ -z "$STAGES" ] && STAGES=" build tests bench"
want() { case "$STAGES" in *" $1"*) return 0 ;; *) return 1 ;; esac; }
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

echo "== machine"
$PY - <<'PY' | tee "$OUT/machine.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/machine.txt"

if want build; then
echo "== build"
if [ "$DRY" = 1 ]; then export COPA_FAST_CUDA=0; else export COPA_FAST_CUDA="${COPA_FAST_CUDA:-1}"; fi
# torch finds the toolkit from nvcc's location; a wrapper script on PATH can mislead it
for c in /usr/local/cuda /usr/local/cuda-13.0; do
  if [ -z "${CUDA_HOME:-}" ] && [ -f "$c/include/cuda_runtime_api.h" ]; then export CUDA_HOME="$c"; fi
done
MAX_JOBS="${MAX_JOBS:-16}" $PY -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | tail -5 | tee "$OUT/build.log"
$PY -c "import copa_fast; print('backends', copa_fast.available_backends())" | tee -a "$OUT/machine.txt"
fi

if want tests; then
echo "== tests"
if [ "$DRY" = 1 ]; then
  $PY -m pytest tests -q -x -p no:cacheprovider -k "deterministic or opcheck or bad_label" 2>&1 | tail -5 | tee "$OUT/tests.log"
else
  $PY -m pytest tests -q -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.log"
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (bad labels with validation off, small shapes)"
    compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_validation.py -q -x \
      -p no:cacheprovider -k "unchecked_bad_label" 2>&1 | tail -8 | tee "$OUT/memcheck.log"
    compute-sanitizer --tool memcheck --error-exitcode 3 $PY -m pytest tests/test_episodes.py -q -x \
      -p no:cacheprovider -k "bad_label" 2>&1 | tail -8 | tee -a "$OUT/memcheck.log"
  fi
fi

fi

if want bench; then
echo "== benchmarks"
if [ "$DRY" = 1 ]; then export COPA_BENCH_SHAPES=small; fi
# the published step under torch.compile costs minutes of compilation per shape: opt in with =1
export COPA_BENCH_COMPILE="${COPA_BENCH_COMPILE:-0}"
$PY -m pytest benchmarks/bench_copa_loss.py -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
  --benchmark-group-by=param:shape 2>&1 | tail -3
echo "== sweep (copa-fast bench: time and memory vs N, markdown + PNG)"
SWEEP_ARGS="--budget 0.5"
if [ "$DRY" = 1 ]; then SWEEP_ARGS="--max-n 500 --budget 0.2"; fi
$PY -m copa_fast bench --out "$OUT/sweep" $SWEEP_ARGS 2>"$OUT/sweep.log" | tail -2
echo "== extras (CUDA-graph replay, batched episodes, adapt_many)"
EXTRA_ARGS=""
if [ "$DRY" = 1 ]; then EXTRA_ARGS="--small"; fi
$PY benchmarks/bench_gpu_extras.py $EXTRA_ARGS 2>&1 | tee "$OUT/extras.md" | tail -40
echo "== table"
$PY benchmarks/report.py "$OUT/bench.json" | tee "$OUT/table.md"
fi
