#!/usr/bin/env bash
# The whole GPU check in one script, for a lent GPU machine: one NVIDIA GPU (an H200 here), Python 3.12
# with torch and triton preinstalled, no network (nothing can be installed; only the working tree is
# copied there), about 10 minutes of wall time for a first run, and at most 8 files brought back.
#
#   bash benchmarks/gpu_suite.sh [OUT]        # OUT: $1, else $OUT, else ./out
#
# Phases, each under `timeout` with its own cap, all capped by what is left of SUITE_BUDGET_S:
#   build      python setup.py build_ext --inplace (MAX_JOBS=nproc, PLM_ENGINE_CUDA_ARCHS = this GPU, 90a on Hopper)
#   info       plm-engine info --json
#   selfcheck  plm-engine selfcheck --json (every op, every usable backend, against the reference)
#   tests      pytest -m cuda tests/, in parallel with pytest-xdist when installed (else serially), a per-test
#              timeout, and a stop at the phase's deadline; results are streamed to cuda_tests.jsonl as
#              they come, so a junit file (cuda_tests.xml) exists even when pytest itself is killed
#   benches    the kernel benchmarks, the training step (random weights), generation and serving (the
#              default model if its package is installed, else a random-weight folder of the same preset;
#              serving only where fastapi, uvicorn and httpx are installed); each gets an equal share of the time left
# report-kernels is not run here: it needs no GPU and runs in CI.
#
# Output: $OUT/gpu_suite.tar.gz (everything below) and a copy of $OUT/summary.md (two files):
#   gpu_suite/summary.md         one line per step (status, seconds, log), then the benchmark tables
#   gpu_suite/logs/<step>.log    stdout + stderr of each step
#   gpu_suite/info.json, selfcheck.json, cuda_tests.xml, cuda_tests.jsonl, <bench>.csv, env.txt
# Exit status: 0 if every step passed (skipped steps count as passed), 1 otherwise.
#
# Knobs (environment):
#   SUITE_BUDGET_S=540       total seconds for all phases (the packing at the end is kept out of it)
#   SUITE_BUILD_S=240 SUITE_SELFCHECK_S=75 SUITE_TESTS_S=180 SUITE_BENCH_RESERVE_S=210
#                            per-phase caps; the tests stop early enough to leave the benchmarks their reserve,
#                            which they share equally (at least 30 s each, in the order norms, attention,
#                            softmax, cross_entropy, rope, activations, train, generate, serve; those that no
#                            longer fit are listed as "skipped (budget spent)")
#   SUITE_TEST_TIMEOUT_S=60  per-test timeout
#   SUITE_TEST_WORKERS=N     pytest-xdist workers (default: min(8, nproc / 2)); 1: serial
#   SUITE_TESTS="tests/"     what pytest collects; SUITE_TEST_MARK=cuda its -m expression
#   SUITE_ONLY="build info selfcheck tests benches"   the phases to run
#   BENCHES="bench_norms bench_softmax"               the benchmarks to run (default: all that apply)
#   SUITE_GEN_PRESET=smollm2-135m   preset of the random-weight model when the default model is absent
#   SUITE_RANDOM_MODEL=1     use the random-weight model even when the default model is installed
#   SUITE_SKIP_BUILD=1       use the extension already built in this checkout
#   SUITE_NO_GPU=1           dry run on a machine without a GPU: every phase's logic runs, the build builds
#                            the CPU kernels only, the tests run on the CPU, and each benchmark is planned
#                            (its command line written to its log, its options checked against the script)
#                            but not run, except those in SUITE_DRY_RUN_BENCHES (run with --device cpu --quick)
#   PYTHON=python3           the interpreter that has torch (default: .venv/bin/python if present)

set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-./out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STAGE="$OUT_DIR/gpu_suite"
rm -rf "$STAGE" "$OUT_DIR/gpu_suite.tar.gz"
mkdir -p "$STAGE/logs"
SUMMARY="$STAGE/summary.md"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
BUDGET="${SUITE_BUDGET_S:-540}"
START=$(date +%s)
FAILED=0
ONLY=" ${SUITE_ONLY:-build info selfcheck tests benches} "
BENCH_ROWS=()

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3 || command -v python)"; fi
fi
PLM=("$PYTHON" -m plm_engine.cli)  # the module, not the console script: the build installs nothing
NPROC="$(nproc 2>/dev/null || echo 4)"

has_py() {  # has_py MODULE...: whether every module can be imported by $PYTHON (found, not imported)
  "$PYTHON" - "$@" <<'EOF' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) is not None for m in sys.argv[1:]) else 1)
EOF
}

# One interpreter start for the versions and the GPU (importing torch takes seconds).
IFS=$'\t' read -r PY_VERSION TORCH_VERSION TRITON_VERSION GPU_NAME SM_ARCH < <("$PYTHON" - <<'EOF' 2>/dev/null
import platform
try:
    import torch
    tv, gpu = torch.__version__, torch.cuda.is_available()
except Exception:
    tv, gpu = "missing", False
try:
    import importlib.metadata as md
    trv = md.version("triton")
except Exception:
    trv = "missing"
name = torch.cuda.get_device_name() if gpu else "-"
arch = "%d%d" % torch.cuda.get_device_capability() if gpu else "-"
print("\t".join([platform.python_version(), tv, trv, name, arch]))
EOF
)
HAVE_GPU=0
if [[ "${SUITE_NO_GPU:-0}" != "1" && "${SM_ARCH:--}" != "-" ]]; then HAVE_GPU=1; else GPU_NAME="no GPU (dry run)"; fi

{
  echo "# GPU suite — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- host: $(hostname), device: $GPU_NAME, cores: $NPROC"
  echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)')"
  echo "- python: ${PY_VERSION:-?} ($PYTHON), torch: ${TORCH_VERSION:-missing}, triton: ${TRITON_VERSION:-missing}"
  echo "- budget: ${BUDGET} s"
  echo
  echo "| step | status | seconds | log |"
  echo "|---|---|---|---|"
} >"$SUMMARY"
{ env | grep -E '^(CUDA|PLM_ENGINE|TRITON|SUITE|MAX_JOBS|TORCH)' | sort; nvidia-smi 2>&1 | head -n 20; } >"$STAGE/env.txt" 2>&1

record() {  # name status seconds
  echo "| $1 | $2 | $3 | logs/$1.log |" >>"$SUMMARY"
  printf '[gpu_suite] %-18s %-28s %4ss\n' "$1" "$2" "$3"
}

skip() {  # name reason
  echo "skipped: $2" >"$STAGE/logs/$1.log"
  record "$1" "skipped ($2)" 0
}

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP COMMAND...: COMMAND with stdout+stderr to logs/NAME.log, under a timeout of min(CAP, what is
# left of the budget); TERM first, KILL 10 s later. Never stops the suite. Sets STEP_RC.
STEP_RC=0
step() {
  local name=$1 cap=$2
  shift 2
  local l limit
  l=$(left)
  limit=$((cap < l ? cap : l))
  if ((limit < 5)); then
    echo "no time left in the ${BUDGET} s budget" >"$STAGE/logs/$name.log"
    record "$name" "FAILED (no time left)" 0
    FAILED=1
    STEP_RC=124
    return
  fi
  local t0 status
  t0=$(date +%s)
  echo "[gpu_suite] $name (limit ${limit} s): $*"
  { echo "\$ $*"; echo "(limit ${limit} s)"; } >"$STAGE/logs/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$STAGE/logs/$name.log" 2>&1
  STEP_RC=$?
  case $STEP_RC in
    0) status="${STEP_OK_LABEL:-ok}" ;;
    5) if [[ $name == cuda_tests ]]; then status="ok (no test collected)"; else status="FAILED (rc 5)"; FAILED=1; fi ;;
    124 | 137) status="FAILED (timeout ${limit} s)"; FAILED=1 ;;
    *) status="FAILED (rc $STEP_RC)"; FAILED=1 ;;
  esac
  record "$name" "$status" $(($(date +%s) - t0))
  if [[ $STEP_RC != 0 ]]; then tail -n 15 "$STAGE/logs/$name.log" | sed 's/^/    /'; fi
}

total_line() {
  echo
  echo "Total: $(($(date +%s) - START)) s of a ${BUDGET} s budget; $([[ $FAILED == 0 ]] && echo 'every step passed' || echo 'SOME STEPS FAILED')."
}

pack() {  # everything under $STAGE into one archive, plus a copy of the summary beside it
  trap - EXIT INT TERM
  cp "$SUMMARY" "$OUT_DIR/summary.md"
  tar -czf "$OUT_DIR/gpu_suite.tar.gz" -C "$OUT_DIR" gpu_suite && rm -rf "$STAGE"
  rm -rf "$WORK"
  echo "[gpu_suite] $OUT_DIR/gpu_suite.tar.gz ($(du -h "$OUT_DIR/gpu_suite.tar.gz" | cut -f1)), summary: $OUT_DIR/summary.md"
}
# Interrupted (the caller's own timeout): still pack what there is.
trap 'echo "[gpu_suite] interrupted"; FAILED=1; { echo "| (suite) | interrupted | | |"; total_line; } >>"$SUMMARY"; pack; exit 1' INT TERM
trap 'pack' EXIT

# ---- 1. build --------------------------------------------------------------------------------------------
if [[ "$ONLY" != *" build "* ]]; then
  skip build "not in SUITE_ONLY"
elif [[ "${SUITE_SKIP_BUILD:-0}" == "1" ]]; then
  skip build "SUITE_SKIP_BUILD=1"
else
  if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
    # nvcc may be a wrapper on PATH: resolve it to the toolkit's bin/.
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
  [[ -n "${CUDA_HOME:-}" ]] && export CUDA_HOME
  BUILD_ENV=(env MAX_JOBS="${MAX_JOBS:-$NPROC}")
  if [[ $HAVE_GPU == 0 ]]; then
    BUILD_ENV+=(PLM_ENGINE_SKIP_CUDA_BUILD=1)  # no GPU: the CPU kernels suffice
  elif [[ -z "${PLM_ENGINE_CUDA_ARCHS:-}" ]]; then
    # Only this GPU's architecture keeps the build short (90a on Hopper: wgmma and TMA).
    [[ "$SM_ARCH" == 90 ]] && SM_ARCH=90a
    BUILD_ENV+=(PLM_ENGINE_CUDA_ARCHS="$SM_ARCH")
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset} ${BUILD_ENV[*]}" >>"$STAGE/env.txt"
  step build "${SUITE_BUILD_S:-240}" "${BUILD_ENV[@]}" "$PYTHON" setup.py -q build_ext --inplace
fi

# ---- 2. environment, self-check ------------------------------------------------------------------------------
if [[ "$ONLY" == *" info "* ]]; then
  step info 30 bash -c '"$@" info --json >"'"$STAGE"'/info.json"' _ "${PLM[@]}"
else
  skip info "not in SUITE_ONLY"
fi
if [[ "$ONLY" != *" selfcheck "* ]]; then
  skip selfcheck "not in SUITE_ONLY"
else
  # Without a GPU the Triton kernels would run interpreted (minutes): the dry run checks the rest.
  SC_ARGS=(selfcheck --json)
  [[ $HAVE_GPU == 0 ]] && SC_ARGS+=(--no-triton)
  step selfcheck "${SUITE_SELFCHECK_S:-75}" bash -c '"$@" >"'"$STAGE"'/selfcheck.json"' _ "${PLM[@]}" "${SC_ARGS[@]}"
fi

# ---- 3. CUDA tests --------------------------------------------------------------------------------------------
# A pytest plugin (PYTEST_PLUGINS, so xdist's workers load it too): per-test timeout (SIGALRM in the
# process running the test), no new test after the phase's deadline, every result appended to a JSON
# lines file as it arrives, and SIGTERM turned into an interrupt so that pytest still writes its junit.
mkdir -p "$WORK/plugins"
cat >"$WORK/plugins/gpu_suite_plugin.py" <<'EOF'
import json, os, signal, time

import pytest

TIMEOUT = float(os.environ.get("GPU_SUITE_TEST_TIMEOUT", "0") or 0)
DEADLINE = float(os.environ.get("GPU_SUITE_DEADLINE", "0") or 0)
RESULTS = os.environ.get("GPU_SUITE_RESULTS")
IS_WORKER = False  # an xdist worker: the controller records its results


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout(f"test timed out after {TIMEOUT:g} s (GPU suite per-test timeout)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt("GPU suite: phase time limit reached")


def pytest_configure(config):
    global IS_WORKER
    IS_WORKER = hasattr(config, "workerinput")
    if not IS_WORKER:  # the controller (or the only process)
        try:
            signal.signal(signal.SIGTERM, _interrupt)
        except ValueError:
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    armed = False
    if TIMEOUT > 0:
        try:
            signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
            armed = True
        except ValueError:  # not the main thread: no per-test timeout, the phase's still holds
            pass
    try:
        yield
    finally:
        if armed:
            signal.setitimer(signal.ITIMER_REAL, 0)


def pytest_runtest_setup(item):
    if DEADLINE and time.time() > DEADLINE:
        pytest.skip("GPU suite: the tests' time budget is spent")


def pytest_runtest_logreport(report):
    if not RESULTS or IS_WORKER:
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    msg = ""
    if report.failed or report.skipped:
        msg = str(report.longrepr)[-2000:] if report.longrepr is not None else ""
    with open(RESULTS, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "duration": round(report.duration, 3), "message": msg}) + "\n")
EOF

# junit from the streamed results, for a pytest run that was killed before writing its own.
cat >"$WORK/jsonl_to_junit.py" <<'EOF'
import json, sys
from xml.sax.saxutils import escape, quoteattr

src, dst, why = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
try:
    with open(src) as f:
        rows = [json.loads(line) for line in f if line.strip()]
except FileNotFoundError:
    pass
counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped")}
out = [f'<?xml version="1.0" encoding="utf-8"?>',
       f'<testsuites><testsuite name="gpu_suite (rebuilt from cuda_tests.jsonl: {escape(why)})" '
       f'tests="{len(rows)}" failures="{counts["failed"]}" errors="0" skipped="{counts["skipped"]}">']
for r in rows:
    path, _, name = r["nodeid"].partition("::")
    case = f'<testcase classname={quoteattr(path)} name={quoteattr(name + ("" if r["when"] == "call" else " [" + r["when"] + "]"))} time="{r["duration"]}"'
    if r["outcome"] == "failed":
        out.append(f'{case}><failure message="failed">{escape(r["message"])}</failure></testcase>')
    elif r["outcome"] == "skipped":
        out.append(f'{case}><skipped message={quoteattr(r["message"][-300:])}/></testcase>')
    else:
        out.append(f"{case}/>")
out.append("</testsuite></testsuites>")
with open(dst, "w") as f:
    f.write("\n".join(out) + "\n")
print(f"{dst}: {len(rows)} results ({counts})")
EOF

if [[ "$ONLY" != *" tests "* ]]; then
  skip cuda_tests "not in SUITE_ONLY"
else
  # Leave the benchmarks their reserve: the tests get min(cap, left - reserve), at least 30 s.
  T_CAP="${SUITE_TESTS_S:-180}"
  T_AVAIL=$(($(left) - ${SUITE_BENCH_RESERVE_S:-210}))
  ((T_AVAIL < 30)) && T_AVAIL=30
  ((T_AVAIL < T_CAP)) && T_CAP=$T_AVAIL
  L=$(left); ((L < T_CAP)) && T_CAP=$L
  # pytest stops starting tests a margin before the phase's end, so it writes its report itself.
  MARGIN=$((T_CAP / 4 < 25 ? T_CAP / 4 : 25))
  read -r -a TEST_PATHS <<<"${SUITE_TESTS:-tests/}"
  # -p no:timeout: pytest-timeout (pyproject's timeout = 600) would re-arm the same SIGALRM as the plugin.
  T_ARGS=(-m "${SUITE_TEST_MARK:-cuda}" -q -rfE -p no:cacheprovider -p no:timeout --junitxml="$STAGE/cuda_tests.xml"
          -o junit_family=xunit1 -o faulthandler_timeout=$((${SUITE_TEST_TIMEOUT_S:-60} + 30)))
  WORKERS="${SUITE_TEST_WORKERS:-$((NPROC / 2 < 8 ? NPROC / 2 : 8))}"
  if ((WORKERS > 1)) && has_py xdist; then
    T_ARGS+=(-n "$WORKERS" --dist load)
    echo "pytest-xdist: $WORKERS workers" >>"$STAGE/env.txt"
  else
    echo "pytest: serial (pytest-xdist $(has_py xdist && echo 'not wanted' || echo 'not installed'))" >>"$STAGE/env.txt"
  fi
  rm -f "$STAGE/cuda_tests.jsonl"
  step cuda_tests "$T_CAP" env PYTHONPATH="$WORK/plugins${PYTHONPATH:+:$PYTHONPATH}" PYTEST_PLUGINS=gpu_suite_plugin \
    GPU_SUITE_TEST_TIMEOUT="${SUITE_TEST_TIMEOUT_S:-60}" GPU_SUITE_DEADLINE=$(($(date +%s) + T_CAP - MARGIN)) \
    GPU_SUITE_RESULTS="$STAGE/cuda_tests.jsonl" "$PYTHON" -m pytest "${TEST_PATHS[@]}" "${T_ARGS[@]}"
  TEST_RC=$STEP_RC
  if [[ ! -s "$STAGE/cuda_tests.xml" ]]; then
    "$PYTHON" "$WORK/jsonl_to_junit.py" "$STAGE/cuda_tests.jsonl" "$STAGE/cuda_tests.xml" "pytest exited with rc $TEST_RC" \
      >>"$STAGE/logs/cuda_tests.log" 2>&1
  fi
  [[ -f "$STAGE/cuda_tests.jsonl" ]] || : >"$STAGE/cuda_tests.jsonl"
  {
    echo
    echo "CUDA tests: $("$PYTHON" -c '
import collections, json, sys
c = collections.Counter(json.loads(l)["outcome"] for l in open(sys.argv[1]) if l.strip())
print(", ".join(f"{v} {k}" for k, v in sorted(c.items())) or "no results")' "$STAGE/cuda_tests.jsonl" 2>/dev/null)"
  } >"$WORK/tests_line.md"
fi
# ---- 4. benchmarks ------------------------------------------------------------------------------------------
# The model for generation and serving: the default one when its package is installed, else the same preset
# with random weights written as a HF folder (save_pretrained + a word-level tokenizer over its vocabulary),
# which bench_generate.py / bench_serve.py take through their --model PATH option.
cat >"$WORK/random_model.py" <<'EOF'
import json, sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from plm_engine.models import ModelConfig, Transformer, save_pretrained

preset, folder = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)
cfg = ModelConfig.preset(preset)
save_pretrained(Transformer(cfg).eval(), folder)
# Every id decodes (to "w<id>") and every text encodes: random prompts and outputs round-trip.
tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok.save(str(folder / "tokenizer.json"))
(folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "unk_token": "w0"}))
(folder / "RANDOM_WEIGHTS").write_text(f"preset {preset}, torch.manual_seed(0): random weights\n")
print(f"random-weight {preset} written to {folder}")
EOF

GEN_MODEL="" GEN_WHY=""
prepare_gen_model() {
  [[ -n "$GEN_MODEL$GEN_WHY" ]] && return
  if [[ "${SUITE_RANDOM_MODEL:-0}" != "1" ]] && "$PYTHON" -c 'from plm_engine.models.registry import resolve; resolve("smollm2-135m")' 2>/dev/null; then
    GEN_MODEL="smollm2-135m"
  elif has_py tokenizers safetensors; then
    local preset="${SUITE_GEN_PRESET:-smollm2-135m}"
    # The script lives in $WORK: PYTHONPATH gives it this checkout's plm_engine (nothing is installed).
    if PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$WORK/random_model.py" "$preset" "$WORK/random-$preset" \
      >"$STAGE/logs/random_model.log" 2>&1; then
      GEN_MODEL="$WORK/random-$preset"
    else
      GEN_WHY="could not write the random-weight model (logs/random_model.log)"
    fi
  else
    GEN_WHY="no default model package and no tokenizers/safetensors for a random-weight one"
  fi
}

# bench_args NAME: the command-line options of benchmark NAME on this machine (sets B_ARGS, or B_WHY to skip it).
bench_args() {
  local b=$1 dev=cuda
  B_ARGS=() B_WHY=""
  [[ $HAVE_GPU == 0 ]] && dev=cpu
  case $b in
    bench_linear)
      B_WHY="CPU only (CUDA tensors take F.linear / cuBLAS)"; return ;;
    bench_train)
      B_ARGS=(--device "$dev" --quick --precision bf16)
      if has_py transformers; then B_ARGS+=(--providers plm_engine,hf); else B_ARGS+=(--providers plm_engine); fi ;;
    bench_generate)
      has_py transformers || { B_WHY="transformers is not installed (bench_generate.py imports it)"; return; }
      prepare_gen_model
      [[ -n "$GEN_WHY" ]] && { B_WHY=$GEN_WHY; return; }
      B_ARGS=(--device "$dev" --model "$GEN_MODEL" --quick --skip-static --dtypes bfloat16 --hf-dtypes bfloat16) ;;
    bench_serve)
      has_py fastapi uvicorn httpx transformers prometheus_client || { B_WHY="needs fastapi, uvicorn, httpx, prometheus_client and transformers"; return; }
      prepare_gen_model
      [[ -n "$GEN_WHY" ]] && { B_WHY=$GEN_WHY; return; }
      B_ARGS=(--device "$dev" --model "$GEN_MODEL" --quick) ;;
    *)
      B_ARGS=(--device "$dev") ;;
  esac
}

# defines_option SCRIPT OPTION: whether the script takes --OPTION, itself or through the harness's shared
# options (benchmarks/common.py's parser(), which every script that calls it gets).
defines_option() {
  grep -q -- "\"$2\"" "$1" && return 0
  grep -q "common.parser(" "$1" && grep -q -- "\"$2\"" "$(dirname "$1")/common.py"
}
export -f defines_option

# A dry run checks each option the suite would pass against the options the script defines.
check_options() {  # script args...
  local script=$1 a missing=()
  shift
  for a in "$@"; do
    [[ "$a" == --* ]] || continue
    defines_option "$script" "$a" || missing+=("$a")
  done
  if ((${#missing[@]})); then echo "$script does not define: ${missing[*]}"; return 1; fi
  echo "every option is defined in $script"
}
export -f check_options

if [[ "$ONLY" != *" benches "* ]]; then
  skip benches "not in SUITE_ONLY"
else
  if [[ -n "${BENCHES:-}" ]]; then
    read -r -a BENCH_LIST <<<"$BENCHES"
  else
    # Kernels first (norms and attention, the headline figures, lead), then the end-to-end paths.
    BENCH_LIST=()
    for b in bench_norms bench_attention bench_softmax bench_cross_entropy bench_rope bench_activations bench_linear \
             bench_train bench_generate bench_serve; do
      [[ -f "benchmarks/$b.py" ]] && BENCH_LIST+=("$b")
    done
    for f in benchmarks/bench_*.py; do  # any benchmark added since
      b="$(basename "$f" .py)"
      [[ " ${BENCH_LIST[*]} " == *" $b "* ]] || BENCH_LIST+=("$b")
    done
  fi
  RUN=()
  for b in "${BENCH_LIST[@]}"; do
    bench_args "$b"
    if [[ -n "$B_WHY" ]]; then skip "$b" "$B_WHY"; else RUN+=("$b"); fi
  done
  for i in "${!RUN[@]}"; do
    b="${RUN[$i]}"
    bench_args "$b"
    share=$(($(left) / (${#RUN[@]} - i)))
    if (($(left) < 20)); then  # later benchmarks are the less important ones: say which did not fit
      skip "$b" "budget spent"
      continue
    fi
    ((share < 30)) && share=30
    defines_option "benchmarks/$b.py" --time-budget && B_ARGS+=(--time-budget $((share * 3 / 4)))
    BENCH_ROWS+=("$b")
    if [[ $HAVE_GPU == 1 ]]; then
      step "$b" "$share" "$PYTHON" "benchmarks/$b.py" "${B_ARGS[@]}" --out-dir "$STAGE"
    elif [[ " ${SUITE_DRY_RUN_BENCHES:-} " == *" $b "* ]]; then
      step "$b" "$share" "$PYTHON" "benchmarks/$b.py" "${B_ARGS[@]}" --quick --out-dir "$STAGE"
    else
      # Dry run: what would run, and whether the script takes those options.
      STEP_OK_LABEL="planned (dry run)" step "$b" 10 bash -c 'echo "would run: $*"; check_options "${@:2}"' _ \
        "$PYTHON" "benchmarks/$b.py" "${B_ARGS[@]}" --out-dir "$STAGE"
    fi
  done
fi

# ---- summary ------------------------------------------------------------------------------------------------
{
  total_line
  [[ -f "$WORK/tests_line.md" ]] && cat "$WORK/tests_line.md"
  for b in "${BENCH_ROWS[@]}"; do
    csv="$STAGE/${b#bench_}.csv"
    [[ -s "$csv" ]] || continue
    echo
    echo "## $b"
    echo
    "$PYTHON" -c 'import sys; sys.path.insert(0, sys.argv[1]); import common; print(common.markdown_table(common.read_csv(sys.argv[2])))' \
      "$ROOT/benchmarks" "$csv" 2>&1 || echo "(could not read $csv)"
  done
} >>"$SUMMARY"
exit $FAILED
