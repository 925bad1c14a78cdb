#!/usr/bin/env bash
# One prepared GPU check of ofakd_fast: build, GPU tests, loss benchmark, trainer step; one report.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# For a machine with one NVIDIA GPU whose python3 already has torch, triton, timm and pytest (no
# network, no package registry). Writes OUT_DIR/gpu_check.md (machine, GPU, versions, each part's
# result or failure, the logs of failed parts). At most ~8 minutes: every part has a timeout and the
# whole run a deadline (GPU_CHECK_BUDGET_S, default 480). Exit status: 0 all parts passed, 1 some
# part failed or timed out, 2 no GPU (stops at once, before anything is built) or bad usage.
#
# Parts and timeouts (seconds; each also cut to the time left):
#   env      60   machine, GPU, versions, the backends ofakd_fast sees
#   build   200   pip install --no-build-isolation --no-deps --no-index -e .  (falls back to
#                 setup.py build_ext --inplace + a path shim for ofakd_fast.kernels)
#   tests   150   pytest tests/loss -k "gpu or cuda or kernel_resources" (the GPU tests, the CUDA kernel's
#                 tests, and the zero-spill check of the compiled kernels)
#   bench   110   benchmarks/gpu_check.py bench: triton, cuda, eager, torch.compile, floor at
#                 256x1000x5 and 256x21841x5, fp32/bf16, fwd+bwd, CUDA events, fraction of 4.8 TB/s
#   trainer  70   benchmarks/gpu_check.py trainer: ResNet-18 <- DeiT-T, bf16 autocast, channels-last, batch 128
#
# Rehearsal without a GPU: GPU_CHECK_FAKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/x
# (skips the GPU test, the build and the tests' run -- it only collects them -- and runs the Python
# parts on CPU tensors with tiny shapes).
set -u -o pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
OUT_DIR=$1
PY=${PYTHON:-python3}
FAKE=${GPU_CHECK_FAKE:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
START=$(date +%s)

# --- no GPU: stop at once (before python, before any build) -------------------------------------
if [ "$FAKE" != "1" ]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (no nvidia-smi, no /dev/nvidia*): nothing to check; stopping." >&2
    exit 2
  fi
  if ! timeout 90 "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: a GPU device node exists but $PY's torch sees no usable CUDA device; stopping." >&2
    exit 2
  fi
fi

mkdir -p "$OUT_DIR" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
REPORT="$OUT_DIR/gpu_check.md"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
FAKE_ARG=()
[ "$FAKE" = "1" ] && FAKE_ARG=(--fake)

SUMMARY=()   # "| part | status | seconds |" rows
FAILED=0

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# run_part NAME TIMEOUT CMD...: runs CMD with min(TIMEOUT, time left - 10 s), stdout+stderr to
# $WORK/NAME.log; records status. Returns CMD's status (124 on timeout).
run_part() {
  local name=$1 limit=$2; shift 2
  local budget; budget=$(( $(left) - 10 ))
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -le 5 ]; then
    SUMMARY+=("| $name | skipped: the ${BUDGET} s budget is spent | 0 |"); FAILED=1
    echo "(skipped: no time left)" > "$WORK/$name.log"; return 124
  fi
  echo "gpu_check: $name (timeout ${limit} s)" >&2
  local t0 rc; t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) status
  case $rc in
    0) status="ok" ;;
    124|137) status="**timed out** after ${limit} s"; FAILED=1 ;;
    *) status="**failed** (exit $rc)"; FAILED=1 ;;
  esac
  SUMMARY+=("| $name | $status | $dt |")
  echo "gpu_check: $name: $status (${dt} s)" >&2
  return $rc
}

# Python parts print markdown on stdout and tracebacks on stderr: keep them apart.
run_py_part() {
  local name=$1 limit=$2; shift 2
  run_part "$name" "$limit" bash -c 'err=$1; shift; exec "$@" 2> "$err"' _ "$WORK/$name.err" "$@"
}

# --- 1. environment ----------------------------------------------------------------------------
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
    || echo "(nvidia-smi unavailable)"; } > "$WORK/smi.txt"
run_py_part env 60 "$PY" benchmarks/gpu_check.py env "${FAKE_ARG[@]}"

# --- 2. build ----------------------------------------------------------------------------------
# No network: no build isolation (use the image's setuptools/torch), no dependency resolution, no index.
build() {
  echo "== pip install --no-build-isolation --no-deps --no-index -e ."
  if "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ; then
    echo "BUILD_METHOD=pip-editable"; return 0
  fi
  echo "== pip failed; falling back to setup.py build_ext --inplace"
  "$PY" setup.py build_ext --inplace || return 1
  echo "BUILD_METHOD=build_ext-inplace"
}
if [ "$FAKE" = "1" ]; then
  SUMMARY+=("| build | skipped (rehearsal: the in-tree extensions are used) | 0 |")
  echo "BUILD_METHOD=none (rehearsal)" > "$WORK/build.log"
else
  run_part build 200 build
fi
# After build_ext --inplace, ofakd_fast.kernels (setup.py maps it to kernels/) needs a finder.
if grep -q "BUILD_METHOD=build_ext-inplace" "$WORK/build.log" 2>/dev/null; then
  mkdir -p "$WORK/shim"
  cat > "$WORK/shim/sitecustomize.py" <<EOF
import importlib.abc, importlib.util, sys
class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ofakd_fast.kernels":
            return importlib.util.spec_from_file_location(name, "$REPO/kernels/__init__.py",
                                                          submodule_search_locations=["$REPO/kernels"])
        return None
sys.meta_path.insert(0, _KernelsFinder())
EOF
  export PYTHONPATH="$WORK/shim:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import ofakd_fast.kernels.ofa_loss_triton, ofakd_fast; print('import ok', ofakd_fast.available_backends())" \
  > "$WORK/import.log" 2>&1 || FAILED=1

# --- 3. GPU tests ------------------------------------------------------------------------------
TEST_MODULES=(tests/loss/test_cuda_kernel.py tests/loss/test_triton_kernel.py tests/loss/test_cuda_extension.py
              tests/loss/test_api.py tests/loss/test_kernel_resources.py tests/loss/test_sparse_teacher.py)
if [ "$FAKE" = "1" ]; then
  run_part tests 150 "$PY" -m pytest "${TEST_MODULES[@]}" -q -p no:cacheprovider --co -k "gpu or cuda or kernel_resources"
else
  run_part tests 150 "$PY" -m pytest "${TEST_MODULES[@]}" -q -p no:cacheprovider -rfEs -k "gpu or cuda or kernel_resources"
fi

# --- 4. loss benchmark -------------------------------------------------------------------------
run_py_part bench 110 "$PY" benchmarks/gpu_check.py bench --budget-s 95 "${FAKE_ARG[@]}"

# --- 5. trainer step ---------------------------------------------------------------------------
run_py_part trainer 70 "$PY" benchmarks/gpu_check.py trainer --budget-s 55 "${FAKE_ARG[@]}"

# --- report ------------------------------------------------------------------------------------
section() {  # section TITLE NAME: the part's stdout; its stderr tail when it failed
  local title=$1 name=$2
  echo "## $title"; echo
  if [ -s "$WORK/$name.log" ]; then cat "$WORK/$name.log"; else echo "(no output)"; fi
  echo
  if [ -s "$WORK/$name.err" ] && grep -q "Traceback\|Error" "$WORK/$name.err"; then
    echo "<details><summary>stderr (last 60 lines)</summary>"; echo; echo '```'
    tail -n 60 "$WORK/$name.err"; echo '```'; echo; echo "</details>"; echo
  fi
}
{
  echo "# ofakd_fast GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(( $(date +%s) - START )) s in all (budget ${BUDGET} s)$([ "$FAKE" = "1" ] && echo ', **rehearsal on CPU (GPU_CHECK_FAKE=1)**')."
  echo "Repository: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'), $(git -C "$REPO" status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files)."
  echo
  echo "| part | status | seconds |"; echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  section "Machine" env
  echo "nvidia-smi: $(cat "$WORK/smi.txt")"; echo
  echo "## Build"; echo
  echo "$(grep -h "BUILD_METHOD=" "$WORK/build.log" | tail -1 || true)"; echo
  grep -h "ofakd_fast: \(NOT \)\?building" "$WORK/build.log" | sort -u || true
  echo; echo "Import check: \`$(tail -n 1 "$WORK/import.log")\`"; echo
  if ! printf '%s\n' "${SUMMARY[@]}" | grep -q "^| build | ok"; then
    echo "<details><summary>build log (last 40 lines)</summary>"; echo; echo '```'
    tail -n 40 "$WORK/build.log"; echo '```'; echo; echo "</details>"; echo
  fi
  echo "## GPU tests"; echo; echo '```'; tail -n 80 "$WORK/tests.log"; echo '```'; echo
  section "Loss benchmark (forward+backward)" bench
  section "Trainer step" trainer
} > "$REPORT"
echo "gpu_check: report written to $REPORT" >&2
exit $FAILED
