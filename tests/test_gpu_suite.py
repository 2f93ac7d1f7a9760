"""What the GPU suite relies on, checked without a GPU: benchmarks/gpu_suite.sh's dry run (every phase's
logic, the per-test timeout, the junit written when pytest is stopped, the single archive), that every
Triton launch runs under its input's device guard, and report-kernels' shared-memory limit."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from plm_engine.ops import report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"

needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils' timeout"
)

# Stand-ins for the CUDA tests: outside the repository, so no conftest skips them on this GPU-less machine.
FAKE_TESTS = """
import time

import pytest


@pytest.mark.cuda
def test_passes():
    assert 1 + 1 == 2


@pytest.mark.cuda
def test_skips():
    pytest.skip("needs something this machine lacks")


@pytest.mark.cuda
def test_hangs():
    time.sleep(SLEEP)


def test_not_selected():  # not marked cuda: -m cuda leaves it out
    raise AssertionError("should not run")
"""


def _run_suite(tmp_path, sleep_s: int, timeout, **env) -> tuple[str, Path]:
    """Runs the suite CPU-only on FAKE_TESTS (test_hangs sleeping sleep_s): it must exit 1, since test_hangs
    fails or is stopped. Returns the log and the unpacked archive's folder."""
    tests_file = tmp_path / "fake_cuda_tests" / "test_fake.py"
    tests_file.parent.mkdir()
    tests_file.write_text(FAKE_TESTS.replace("SLEEP", str(sleep_s)))
    out = tmp_path / "out"
    full_env = {
        **os.environ,
        "SUITE_NO_GPU": "1",
        "SUITE_SKIP_BUILD": "1",
        "PYTHON": sys.executable,
        "SUITE_TESTS": str(tests_file),
        **env,
    }
    full_env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    return log, _unpack(out, tmp_path / "unpacked")


def _unpack(out: Path, dest: Path) -> Path:
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_suite.tar.gz", "summary.md"], files  # far under the 8 files that come back
    with tarfile.open(out / "gpu_suite.tar.gz") as tar:
        tar.extractall(dest, filter="data")
    stage = dest / "gpu_suite"
    assert (stage / "summary.md").read_text() == (out / "summary.md").read_text()
    return stage


def _status(summary: str) -> dict[str, str]:
    rows = [line.split("|") for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[1].strip(): cells[2].strip() for cells in rows[1:]}


def _junit_cases(path: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        out[case.get("name")] = kind
    return out


@needs_bash
def test_dry_run(tmp_path):
    log, stage = _run_suite(
        tmp_path,
        60,
        timeout=240,
        SUITE_TEST_TIMEOUT_S="3",
        SUITE_RANDOM_MODEL="1",
        SUITE_GEN_PRESET="llama-tiny",
        SUITE_ONLY="info selfcheck tests benches",
    )
    summary = (stage / "summary.md").read_text()
    status = _status(summary)

    assert status["build"].startswith("skipped"), status
    assert status["info"] == "ok" and status["selfcheck"] == "ok", status
    assert status["cuda_tests"] == "FAILED (rc 1)", status
    assert "SOME STEPS FAILED" in summary and "CUDA tests: 1 failed, 1 passed, 1 skipped" in summary
    assert json.loads((stage / "info.json").read_text())
    checks = json.loads((stage / "selfcheck.json").read_text())  # --no-triton without a GPU: no interpreter
    assert checks and all(r["ok"] for r in checks) and not any(r["backend"] == "triton" for r in checks)

    cases = _junit_cases(stage / "cuda_tests.xml")
    assert cases == {"test_passes": "passed", "test_skips": "skipped", "test_hangs": "failure"}, cases
    results = [json.loads(line) for line in (stage / "cuda_tests.jsonl").read_text().splitlines()]
    hung = next(r for r in results if r["nodeid"].endswith("test_hangs"))
    assert "timed out after 3 s" in hung["message"]

    # Each benchmark is planned (options checked against the script) or skipped with its reason; a dry run
    # times nothing. Generation and serving take the random-weight folder through --model.
    benches = {k: v for k, v in status.items() if k.startswith("bench_")}
    assert set(benches) == {p.stem for p in (ROOT / "benchmarks").glob("bench_*.py")}, benches
    assert benches.pop("bench_linear").startswith("skipped (CPU only")
    for name, st in benches.items():
        if name == "bench_serve" and st.startswith("skipped"):
            continue  # fastapi / uvicorn / httpx absent here
        assert st == "planned (dry run)", (name, st, (stage / "logs" / f"{name}.log").read_text())
    gen_log = (stage / "logs" / "bench_generate.log").read_text()
    assert "--model" in gen_log and "random-llama-tiny" in gen_log and "every option is defined" in gen_log
    assert "--providers" in (stage / "logs" / "bench_train.log").read_text()
    assert "--time-budget" in (stage / "logs" / "bench_norms.log").read_text()
    for step in ("build", "info", "selfcheck", "cuda_tests", *benches):
        assert (stage / "logs" / f"{step}.log").exists(), step
    assert not list(stage.glob("*.csv"))  # nothing was benchmarked


@needs_bash
def test_stopped_tests_still_leave_a_junit_report(tmp_path):
    """pytest stopped by the phase's time limit (TERM, as `timeout` sends it) in the middle of a test: the
    results so far are in cuda_tests.jsonl and cuda_tests.xml, and the archive is written."""
    log, stage = _run_suite(
        tmp_path,
        300,
        timeout=120,
        SUITE_TEST_TIMEOUT_S="200",
        SUITE_TESTS_S="20",
        SUITE_BENCH_RESERVE_S="0",
        SUITE_ONLY="tests",
    )
    status = _status((stage / "summary.md").read_text())
    cases = _junit_cases(stage / "cuda_tests.xml")
    if status["cuda_tests"] == "FAILED (timeout 20 s)":
        assert cases.get("test_passes") == "passed", cases
        assert "test_hangs" not in cases or cases["test_hangs"] != "passed", cases
    else:
        # A very slow start: pytest reached the deadline before test_hangs and skipped it instead.
        assert cases.get("test_hangs") == "skipped", (status, cases, log)


# ---- Triton launches: the device guard ------------------------------------------------------------------------

TRITON_DIR = ROOT / "plm_engine" / "ops" / "triton"


def _launches(tree: ast.AST):
    """(launch call, enclosing with-statements) for every `kernel[grid](...)` call in a module."""
    found = []

    def visit(node, withs):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Subscript)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id.endswith("_kernel")
        ):
            found.append((node, withs))
        for child in ast.iter_child_nodes(node):
            visit(child, withs + [node] if isinstance(node, ast.With) else withs)

    visit(tree, [])
    return found


def test_every_triton_launch_runs_under_its_device_guard():
    modules = 0
    for path in sorted(TRITON_DIR.glob("*.py")):
        launches = _launches(ast.parse(path.read_text()))
        if not launches:
            continue
        modules += 1
        for call, withs in launches:
            guarded = any(
                isinstance(item.context_expr, ast.Call)
                and isinstance(item.context_expr.func, ast.Name)
                and item.context_expr.func.id == "device_guard"
                for w in withs
                for item in w.items
            )
            assert guarded, f"{path.name}:{call.lineno}: {call.func.value.id} launched outside `with device_guard(...)`"
    assert modules >= 7


def test_device_guard_is_free_on_cpu():
    from plm_engine.ops.triton.guard import device_guard

    with device_guard(torch.ones(2)):  # the interpreter's tensors: nothing to switch, nothing initialised
        pass


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_on_the_inputs_device():
    """Inputs on cuda:1 while cuda:0 is current: every family's Triton kernel runs on cuda:1 (a launch on the
    current device would read cuda:1 pointers on cuda:0: an illegal address or garbage)."""
    from plm_engine import ops

    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    x = torch.randn(64, 1000, device=dev, dtype=torch.bfloat16)
    w = torch.rand(1000, device=dev, dtype=torch.bfloat16) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, w, backend="triton"), ops.rms_norm(x, w, backend="torch"))
    torch.testing.assert_close(
        ops.softmax(x.view(1, 64, 1000), backend="triton"), ops.softmax(x.view(1, 64, 1000), backend="torch")
    )
    q = torch.randn(2, 128, 4, 64, device=dev, dtype=torch.bfloat16)
    out = ops.attention(q, q, q, causal=True, backend="triton")
    ref = ops.attention(q, q, q, causal=True, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    assert torch.cuda.current_device() == 0


# ---- report-kernels: shared memory -------------------------------------------------------------------------


def _usage_row(arch, shared, spill=0, kernel="attn_fwd"):
    return {
        "backend": "triton",
        "kernel": kernel,
        "config": "BLOCK_M=128,align16",
        "arch": arch,
        "registers": 128,
        "stack": spill,
        "local": 0,
        "spill_bytes": spill,
        "shared_mem": shared,
        "num_warps": 8,
    }


def test_shared_memory_over_the_arch_limit_fails_the_report():
    assert report.shared_mem_limit(80) == 163 * 1024 and report.shared_mem_limit(90) == 227 * 1024
    ok = [_usage_row(80, 163 * 1024), _usage_row(90, 227 * 1024), _usage_row(90, 200 * 1024)]
    assert report.problems(ok) == []
    over80 = _usage_row(80, 163 * 1024 + 1)  # fits an H100's 227 KB, not an A100's 163 KB
    over90 = _usage_row(90, 232 * 1024, spill=16)
    bad = report.problems(ok + [over80, over90])
    assert len(bad) == 3, bad
    assert any("sm_80: shared memory 166913 B > 166912 B per block" in p for p in bad), bad
    assert any("sm_90: shared memory 237568 B > 232448 B" in p for p in bad), bad
    assert any("spills" in p for p in bad), bad
    table = report.format_table(ok + [over80])
    assert "PROBLEM: triton attn_fwd [BLOCK_M=128,align16] sm_80: shared memory" in table
    assert "no spills" in report.format_table(ok)
    # An arch without a known limit is not judged; notes and failed compiles are unchanged.
    assert report.problems([_usage_row(70, 10**6)]) == []


def test_report_kernels_exit_status_on_shared_memory(monkeypatch, capsys):
    monkeypatch.setattr(report, "collect", lambda *a, **k: [_usage_row(80, 200 * 1024)])
    assert report.report_kernels(False) == 1
    assert "shared memory 204800 B > 166912 B" in capsys.readouterr().out
    monkeypatch.setattr(report, "collect", lambda *a, **k: [_usage_row(90, 200 * 1024)])
    assert report.report_kernels(True) == 0


def test_suite_script_is_one_file_without_report_kernels():
    text = SCRIPT.read_text()
    assert "report-kernels --json" not in text and "report_kernels" not in text
    assert "\nCC=" not in text and " CC=" not in text  # the C compiler's variable stays the compiler's
    assert text.startswith("#!/usr/bin/env bash")
