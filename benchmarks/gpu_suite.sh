#!/usr/bin/env bash
# The whole GPU check in one script, for a lent GPU machine (torch + triton preinstalled, no internet):
# build the extension, record the environment, run the CUDA tests, report the kernels' resources, run
# every benchmark. Everything it writes goes under the output directory:
#
#   bash benchmarks/gpu_suite.sh [OUT]        # OUT: $1, else $OUT, else ./out
#
#   OUT/summary.md         one line per step (status, seconds, log), then the benchmark tables
#   OUT/logs/<step>.log    stdout + stderr of each step
#   OUT/info.json, OUT/kernels.json, OUT/cuda_tests.xml, OUT/<bench>.csv (e.g. norms.csv)
#
# Each step runs under `timeout`, capped by what is left of SUITE_BUDGET_S (default 450 s) so the
# suite ends within 8 minutes; a failed or timed-out step is recorded and the next one still runs.
# Exit status: 0 if every step passed, 1 otherwise.
#
# Environment knobs:
#   SUITE_BUDGET_S=450     total seconds for all steps
#   SUITE_SKIP_BUILD=1     use the extension already built in this checkout
#   SUITE_NO_GPU=1         behave as on a machine without a GPU (dry run of the script on a CPU box)
#   PYTHON=python3         the interpreter that has torch (default: .venv/bin/python if present)

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-${OUT:-./out}}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.md"
BUDGET="${SUITE_BUDGET_S:-450}"
START=$(date +%s)
FAILED=0

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3 || command -v python)"; fi
fi
# The console script if installed, else the module (the build step may have failed).
if command -v plm-engine >/dev/null 2>&1; then PLM=(plm-engine); else PLM=("$PYTHON" -m plm_engine.cli); fi

HAVE_GPU=0
if [[ "${SUITE_NO_GPU:-0}" != "1" ]] && "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAVE_GPU=1
fi
GPU_NAME="no GPU"
if [[ $HAVE_GPU == 1 ]]; then
  GPU_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown GPU)"
fi

{
  echo "# GPU suite — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- host: $(hostname), device: $GPU_NAME"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- python: $("$PYTHON" --version 2>&1), torch: $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing), triton: $("$PYTHON" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo missing)"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

record() {  # name status seconds
  echo "| $1 | $2 | $3 | logs/$1.log |" >>"$SUMMARY"
  printf '[gpu_suite] %-16s %-14s %4ss\n' "$1" "$2" "$3"
}

skip() {  # name reason
  echo "skipped: $2" >"$OUT/logs/$1.log"
  record "$1" "skipped ($2)" 0
}

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with stdout+stderr to logs/NAME.log under a timeout of
# min(CAP, what is left of the budget). Never stops the suite.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET}s budget" >"$OUT/logs/$name.log"
    record "$name" "FAILED (no time left)" 0
    FAILED=1
    return
  fi
  local t0 rc status
  t0=$(date +%s)
  echo "[gpu_suite] $name: $* (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124 | 137) status="FAILED (timeout ${limit}s)"; FAILED=1 ;;
    *) status="FAILED (rc $rc)"; FAILED=1 ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0))
  if [[ $rc != 0 ]]; then tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'; fi
}

# ---- 1. build ----------------------------------------------------------------------------------------
if [[ "${SUITE_SKIP_BUILD:-0}" == "1" ]]; then
  skip build "SUITE_SKIP_BUILD=1"
else
  if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
    # nvcc may be a wrapper script on PATH: resolve it to the toolkit's bin/.
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
  [[ -n "${CUDA_HOME:-}" ]] && export CUDA_HOME
  BUILD_ENV=(env MAX_JOBS=16)
  [[ $HAVE_GPU == 0 ]] && BUILD_ENV+=(PLM_ENGINE_SKIP_CUDA_BUILD=1)  # no GPU: the CPU kernels suffice
  # The machine's own GPU first in the arch list keeps the build short; PTX covers the rest.
  if [[ $HAVE_GPU == 1 && -z "${PLM_ENGINE_CUDA_ARCHS:-}" ]]; then
    CC="$("$PYTHON" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
    [[ "$CC" == 90 ]] && CC=90a
    [[ -n "$CC" ]] && BUILD_ENV+=(PLM_ENGINE_CUDA_ARCHS="$CC")
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset} ${BUILD_ENV[*]}" >"$OUT/build_env.txt"
  step build 200 "${BUILD_ENV[@]}" "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e "$ROOT"
fi

# ---- 2. environment and kernel resources ---------------------------------------------------------------
step info 30 bash -c '"$@" info --json >"'"$OUT"'/info.json"' _ "${PLM[@]}"

# ---- 3. CUDA tests ----------------------------------------------------------------------------------
if [[ $HAVE_GPU == 1 ]]; then
  step cuda_tests 120 "$PYTHON" -m pytest -m cuda tests/ -q -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml"
else
  skip cuda_tests "no GPU"
fi

step report_kernels 90 bash -c '"$@" report-kernels --json >"'"$OUT"'/kernels.json"' _ "${PLM[@]}"

# ---- 4. benchmarks: every benchmarks/bench_*.py (norms first), each writing <out>/<name>.csv --------------
# BENCHES="bench_norms bench_softmax" picks some. Each gets an equal share of the time left; a script
# that takes --time-budget is told its share (minus a margin) so it stops cleanly instead of timing out.
if [[ -n "${BENCHES:-}" ]]; then
  read -r -a BENCHES <<<"$BENCHES"
else
  BENCHES=()
  [[ -f benchmarks/bench_norms.py ]] && BENCHES+=(bench_norms)
  for f in benchmarks/bench_*.py; do
    b="$(basename "$f" .py)"
    [[ "$b" != bench_norms ]] && BENCHES+=("$b")
  done
fi
for i in "${!BENCHES[@]}"; do
  b="${BENCHES[$i]}"
  left=$((BUDGET - ($(date +%s) - START)))
  share=$((left / (${#BENCHES[@]} - i)))
  ((share < 30)) && share=30
  extra=()
  grep -q -- "--time-budget" "benchmarks/$b.py" && extra=(--time-budget $((share * 3 / 4)))
  if [[ $HAVE_GPU == 1 ]]; then
    step "$b" "$share" "$PYTHON" "benchmarks/$b.py" --device cuda --out-dir "$OUT" "${extra[@]}"
  else
    # No GPU: a quick CPU run checks that the script works and writes its CSV.
    step "$b" "$share" "$PYTHON" "benchmarks/$b.py" --device cpu --quick --out-dir "$OUT" "${extra[@]}"
  fi
done

# ---- summary -----------------------------------------------------------------------------------------
{
  echo
  echo "Total: $(($(date +%s) - START)) s of a ${BUDGET} s budget; $([[ $FAILED == 0 ]] && echo 'all steps passed' || echo 'SOME STEPS FAILED')."
  for b in "${BENCHES[@]}"; do
    csv="$OUT/${b#bench_}.csv"
    echo
    echo "## $b"
    echo
    if [[ -s "$csv" ]]; then
      "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import common; print(common.markdown_table(common.read_csv(sys.argv[2])))' \
        "$ROOT/benchmarks" "$csv" || echo "(could not read $csv)"
    else
      echo "(no results: see logs/$b.log)"
    fi
  done
} >>"$SUMMARY"
echo "[gpu_suite] summary: $SUMMARY"
exit $FAILED
