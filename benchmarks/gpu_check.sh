#!/usr/bin/env bash
# The one script a GPU machine runs: build copa_fast against the installed torch, run the tests
# (CUDA tensors included), run the benchmarks, print a compact table last. JSON and logs go to
# $OUT (default ./out). `--dry-run` does the same on a CPU-only machine at small sizes.
# Stages can be picked to split the work over two calls on a warm machine (the build stays):
#   gpu_check.sh [--dry-run] [build] [tests] [bench]      (no stage named: all three)
#
# With a lent GPU (15 minutes of device time in all, machine start included; 10 minutes a call;
# the machine goes back 30 s after a call): first call `bash benchmarks/gpu_check.sh build tests`
# (timeout_s 480), then AT ONCE, while the machine is warm, `bash benchmarks/gpu_check.sh bench`
# (timeout_s 300), then give the machine back. Every stage runs under its own limit (*_BUDGET_S
# below; 0 skips one) and a stage that fails or runs out of time is recorded in the closing status
# line while the next one still runs. Measured on an H200 (2026-11-27, second lease): machine start
# + transfer ~40 s, build 38 s, tests 235 s (12 workers, without the distributed ones), memcheck
# 13 + 11 s, bench 27 s, extras 68 s, sweep 22 s: the two calls took 336 + 121 s. The bench call runs its stages in order of importance for the targets: pytest-benchmark
# shapes, then the extras (graph replay, batched episodes, adapt_many, Triton tiles), then the
# sweep. Logs travel back as logs.tgz (a lent machine returns at most 8 files); the failures with
# their tracebacks are in failures.log as they happen. Before spending device time, on the CPU
# machine: `python benchmarks/triton_aot.py` (every Triton kernel compiles for sm_90 / sm_80, no
# spills) and `bash benchmarks/gpu_check.sh --dry-run`.
#
# Stage budgets, seconds (env): BUILD_BUDGET_S 180, TESTS_BUDGET_S 330, MEMCHECK_BUDGET_S 60 (x2),
# BENCH_BUDGET_S 180, EXTRAS_BUDGET_S 170, ADAPT_BUDGET_S 60, SWEEP_BUDGET_S 90.
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
# the package imports from this tree in every call (an in-place build, when pip could not install)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STATUS=""
# timed NAME SECONDS LOG CMD...: CMD's output to LOG, killed after SECONDS; a failure is recorded
# in the closing status line and the script goes on to the next stage
timed() {
  local name="$1" limit="$2" log="$3"; shift 3
  local t0=$SECONDS rc=0
  if [ "$limit" = 0 ]; then STATUS="$STATUS $name=skipped"; echo "$name: skipped (budget 0)"; return 0; fi
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" = 0 ]; then STATUS="$STATUS $name=ok"; else STATUS="$STATUS $name=rc$rc"; fi
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "$name: stopped after ${limit} s (log: $log)"; fi
  echo "$name: $((SECONDS - t0)) s, exit $rc"
  return 0
}

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
export MAX_JOBS="${MAX_JOBS:-16}"
# kernels for this machine's GPU only (setup.py's default, sm_80 + sm_90, compiles twice)
if [ "$DRY" = 0 ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
  [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST && echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi
timed build "${BUILD_BUDGET_S:-180}" "$OUT/build.log" $PY -m pip install -v --no-build-isolation --no-deps -e .
case "$STATUS" in *" build=rc"*)   # pip failed (e.g. a read-only site-packages): build in place
  echo "pip install failed (tail of build.log below); building in place"; tail -n 5 "$OUT/build.log" 2>/dev/null || true
  timed build-inplace "${BUILD_BUDGET_S:-180}" "$OUT/build-inplace.log" $PY setup.py build_ext --inplace
  tail -n 3 "$OUT/build-inplace.log" 2>/dev/null || true ;;
esac
if [ "$DRY" = 0 ] && ! $PY -c "import copa_fast._C" 2>/dev/null; then
  # the CUDA kernels failed to build: the CPU extension alone still lets the Triton backend be
  # measured (the CUDA errors are in build.log)
  echo "the build with CUDA failed (tail below); building the CPU extension only"
  grep -m 5 -E "error|Error" "$OUT/build.log" 2>/dev/null || true
  COPA_FAST_CUDA=0 timed build-cpu-only "${BUILD_BUDGET_S:-180}" "$OUT/build-cpu.log" $PY setup.py build_ext --inplace
fi
tail -n 2 "$OUT/build.log" 2>/dev/null || true
$PY -c "import copa_fast._C" || echo "the extension does not import (error above)"
$PY -c "import copa_fast; print('backends', copa_fast.available_backends())" | tee -a "$OUT/machine.txt"
fi

if want tests; then
echo "== tests"
if [ "$DRY" = 1 ]; then
  timed tests "${TESTS_BUDGET_S:-300}" "$OUT/tests-full.log" $PY -m pytest tests -q -x -p no:cacheprovider -k "deterministic or opcheck or bad_label"
  tail -n 3 "$OUT/tests-full.log" 2>/dev/null | tee "$OUT/tests.log" || true
else
  # The CPU-only checks (plain-nvcc and Triton AOT builds, host emulation of the CUDA kernels) ran
  # in CI; here every test that can take CUDA tensors, over workers where pytest-xdist is
  # installed; one line a test in tests-full.log, the failures and the slowest tests on screen.
  # The distributed tests run gloo on CPU tensors alone: CI covers them.
  # Each failure's report goes to failures.log as it happens (tests/conftest.py), and 25 s before
  # the stage's limit the remaining tests are skipped so that pytest still prints its summary.
  XDIST=(); $PY -c "import xdist" 2>/dev/null && XDIST=(-n "${TEST_WORKERS:-12}")
  # one CPU thread a worker unless there are cores to spare: 12 workers of 16 threads each on 16
  # cores made the float64 CPU tests (gradgradcheck, the 10,000-call run) outlast their 150 s
  NPROC=$(nproc 2>/dev/null || echo 1); NW="${TEST_WORKERS:-12}"; [ "${#XDIST[@]}" = 0 ] && NW=1
  TEST_THREADS=$(( NPROC / NW )); [ "$TEST_THREADS" -lt 1 ] && TEST_THREADS=1
  PTO=(); $PY -c "import pytest_timeout" 2>/dev/null && PTO=("--timeout=${TEST_TIMEOUT_S:-150}")
  TB="${TESTS_BUDGET_S:-330}"
  export COPA_FAST_FAILURE_LOG="$OUT/failures.log"
  [ "$TB" -gt 60 ] && export COPA_FAST_TEST_DEADLINE=$(( $(date +%s) + TB - 25 ))
  OMP_NUM_THREADS="$TEST_THREADS" timed tests "$TB" "$OUT/tests-full.log" $PY -m pytest tests -v -rfE --durations=8 \
    -p no:cacheprovider "${XDIST[@]}" "${PTO[@]}" --ignore=tests/test_build.py --ignore=tests/test_cuda_kernels_host.py \
    --ignore=tests/test_distributed.py
  unset COPA_FAST_FAILURE_LOG COPA_FAST_TEST_DEADLINE
  grep -sE '^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped)' "$OUT/tests-full.log" | tail -30 | tee "$OUT/tests.log" || true
  sed -n '/slowest/,/^=/p' "$OUT/tests-full.log" 2>/dev/null | grep -v ' in [0-9.]*s' | head -10 || true
  if command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer memcheck (bad labels with validation off, episodes laid outside their buffers; small shapes)"
    # a sandboxed GPU may refuse the sanitizer ("Device not supported"): recorded, not fatal
    timed memcheck-validation "${MEMCHECK_BUDGET_S:-60}" "$OUT/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PY -m pytest tests/test_validation.py -q -x -p no:cacheprovider -k unchecked_bad_label
    timed memcheck-episodes "${MEMCHECK_BUDGET_S:-60}" "$OUT/memcheck-episodes.log" compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PY -m pytest tests/test_episodes.py -q -x -p no:cacheprovider -k "bad_label or outside_its_buffers"
    tail -n 4 "$OUT/memcheck.log" "$OUT/memcheck-episodes.log" 2>/dev/null || true
    if grep -qs "not supported" "$OUT/memcheck.log"; then   # the sandbox's refusal, not a finding
      STATUS="${STATUS// memcheck-validation=rc/ memcheck-validation=refused-rc}"
      STATUS="${STATUS// memcheck-episodes=rc/ memcheck-episodes=refused-rc}"
    fi
  fi
fi
fi

if want bench; then
echo "== benchmarks"
if [ "$DRY" = 1 ]; then export COPA_BENCH_SHAPES=small; fi
# the published step under torch.compile costs minutes of compilation per shape: opt in with =1
export COPA_BENCH_COMPILE="${COPA_BENCH_COMPILE:-0}"
timed bench "${BENCH_BUDGET_S:-180}" "$OUT/bench.log" $PY -m pytest benchmarks/bench_copa_loss.py -q \
  -p no:cacheprovider --benchmark-json="$OUT/bench.json" --benchmark-group-by=param:shape
tail -n 2 "$OUT/bench.log" 2>/dev/null || true
echo "== extras (CUDA-graph replay, batched episodes, adapt_many, Triton tiles)"
EXTRA_ARGS=()
if [ "$DRY" = 1 ]; then EXTRA_ARGS=(--small); fi
timed extras "${EXTRAS_BUDGET_S:-170}" "$OUT/extras.md" $PY benchmarks/bench_gpu_extras.py "${EXTRA_ARGS[@]}"
tail -n 40 "$OUT/extras.md" 2>/dev/null || true
echo "== episode adaptation throughput (published loop, adapt, adapt_many; pytest-benchmark)"
timed adapt "${ADAPT_BUDGET_S:-60}" "$OUT/adapt.log" $PY -m pytest benchmarks/bench_adapt.py -q -p no:cacheprovider \
  --benchmark-columns=median,ops
grep -E "test_adapt_episodes|passed|failed" "$OUT/adapt.log" 2>/dev/null || true
# last: the sweep repeats the pytest-benchmark shapes over more N for the plot (least needed when
# the lease runs short)
echo "== sweep (copa-fast bench: time and memory vs N, markdown + PNG)"
SWEEP_ARGS=(--budget 0.5)
if [ "$DRY" = 1 ]; then SWEEP_ARGS=(--max-n 500 --budget 0.2); fi
timed sweep "${SWEEP_BUDGET_S:-90}" "$OUT/sweep.log" $PY -m copa_fast bench --out "$OUT/sweep" "${SWEEP_ARGS[@]}"
tail -n 2 "$OUT/sweep.log" 2>/dev/null || true
echo "== table"
[ -s "$OUT/bench.json" ] && $PY benchmarks/report.py "$OUT/bench.json" | tee "$OUT/table.md"
fi

# at most 8 files come back from a lent machine: the stage logs travel as one archive
if [ "$DRY" = 0 ]; then
  ( cd "$OUT" && ls ./*.log >/dev/null 2>&1 && tar czf logs.tgz ./*.log && \
    rm -f build*.log memcheck*.log tests-full.log bench.log adapt.log sweep.log ) || true
fi
echo "== status:$STATUS"
case "$STATUS" in *"=rc"*) exit 1 ;; esac   # refused-rc (sanitizer refused the device) is no failure
