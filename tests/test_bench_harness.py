"""The benchmark harness (benchmarks/common.py) and the kernel benchmarks built on it, with tiny cases."""

from __future__ import annotations

import argparse
import csv
import importlib
import io
import sys
import time
from dataclasses import dataclass

import pytest

from tests.utils import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
common = importlib.import_module("common")


@dataclass(frozen=True)
class Case:
    n: int

    @property
    def labels(self) -> dict:
        return {"op": "toy", "shape": f"{self.n}"}


def _args(tmp_path, **kw) -> argparse.Namespace:
    return common.parser("toy", "toy benchmark", ("torch", "fast")).parse_args(
        ["--device", "cpu", "--quick", "--out-dir", str(tmp_path), *kw.pop("argv", [])]
    )


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_times_every_provider_and_writes_rows(tmp_path):
    timings = {"torch": 2.0, "fast": 0.5, "_yardstick": 1.0}
    seen = []

    def setup(case, device):
        def provider(p):
            if p == "model":  # a provider that measures itself
                return {"ms": 7.0, "check": "ok"}
            return common.Timed(lambda: p, check="" if p == "torch" else "ok")

        return provider

    def timer(fn):
        seen.append(fn())
        return timings[fn()]

    rc = common.run(
        "toy",
        _args(tmp_path, argv=["--repeat", "2"]),
        [Case(1000), Case(10)],
        setup,
        providers=lambda c: ["torch", "fast", "_yardstick", "model"],
        columns=["op", "shape", "provider", "ms", "gbps", "speedup_vs_torch", "check", "extra"],
        bytes_moved=lambda c: c.n * 1e6,
        derive=lambda c, p, ms, times: {"extra": ms["_yardstick"]},
        timer=timer,
    )
    assert rc == 0
    assert seen.count("fast") == 4  # 2 cases x 2 interleaved rounds
    rows = _rows(tmp_path / "toy.csv")
    assert [(r["shape"], r["provider"]) for r in rows] == [
        ("1000", "torch"),
        ("1000", "fast"),
        ("1000", "model"),
        ("10", "torch"),
        ("10", "fast"),
        ("10", "model"),
    ]  # _yardstick is timed, not reported
    fast = rows[1]
    assert fast["ms"] == "0.5" and fast["speedup_vs_torch"] == "4.0" and fast["check"] == "ok"
    assert fast["gbps"] == "2000.0" and fast["extra"] == "1.0"
    assert rows[2]["ms"] == "7.0" and rows[2]["check"] == "ok"
    # Every row says which machine, build and code produced it.
    assert all(r["device"] == "cpu" and r["device_name"] and r["commit"] and r["torch"] for r in rows)
    assert "kernels " in fast["device_name"]


def test_run_survives_a_broken_provider_and_reports_failure(tmp_path, capsys):
    def setup(case, device):
        def provider(p):
            if p == "broken":
                raise RuntimeError("no kernel")
            return common.Timed(lambda: None, check="mismatch 0.5" if p == "wrong" else "")

        return provider

    rc = common.run(
        "toy",
        _args(tmp_path),
        [Case(1)],
        setup,
        providers=lambda c: ["torch", "broken", "wrong"],
        columns=["op", "shape", "provider", "ms", "check"],
        timer=lambda fn: 1.0,
    )
    assert rc == 1
    assert [r["provider"] for r in _rows(tmp_path / "toy.csv")] == ["torch", "wrong"]
    err = capsys.readouterr().err
    assert "broken failed" in err and "no kernel" in err and "wrong gave a wrong result" in err


def test_time_budget_stops_starting_cases(tmp_path, capsys):
    rc = common.run(
        "toy",
        _args(tmp_path, argv=["--time-budget", "0.05", "--no-csv"]),
        [Case(1), Case(2)],
        lambda c, device: lambda p: common.Timed(lambda: None),
        providers=lambda c: ["torch"],
        columns=["op", "shape", "provider", "ms"],
        timer=lambda fn: time.sleep(0.1) or 1.0,
    )
    assert rc == 0 and "skipped the last 1 of 2 cases" in capsys.readouterr().err
    assert not (tmp_path / "toy.csv").exists()


class _Out(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_table_lifts_constant_columns_and_never_wraps_in_a_pipe(monkeypatch):
    rows = [{"dtype": "fp32", "shape": f"{n}x4096", "provider": p, "ms": 1.5} for n in (1, 2) for p in ("a", "bb")]
    out = _Out(tty=False)
    monkeypatch.setattr(common.shutil, "get_terminal_size", lambda fallback: __import__("os").terminal_size((10, 5)))
    common.print_table(rows, ["dtype", "shape", "provider", "ms"], title="t", file=out)
    lines = out.getvalue().splitlines()
    assert lines[:2] == ["t", "  dtype=fp32  ms=1.5"]
    assert lines[2].split() == ["shape", "provider"] and len(lines) == 7  # header + 4 rows, one line each
    narrow = _Out(tty=True)
    common.print_table(rows, ["dtype", "shape", "provider", "ms"], title="t", file=narrow)
    assert "     shape: 1x4096" in narrow.getvalue() and "  provider: bb" in narrow.getvalue()


def test_append_csv_keeps_an_old_header(tmp_path, capsys):
    path = tmp_path / "old.csv"
    path.write_text("timestamp,op,ms\n")
    common.append_csv(path, [{"timestamp": "t", "triton": "3.8", "op": "x", "ms": 1, "new": 2}])
    assert _rows(path) == [{"timestamp": "t", "op": "x", "ms": "1"}]
    err = capsys.readouterr().err
    assert "new" in err and "triton" not in err  # environment columns an old file lacks are no news


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_report_rows_prints_then_appends(tmp_path, capsys, as_json):
    """A whole-run report (bench_serve's modes): JSON or a table on stdout, the rows appended to the CSV."""
    args = argparse.Namespace(json=as_json, no_csv=False, out_dir=str(tmp_path))
    rows = [{"server": "ours", "req_per_s": 2.5}, {"server": "theirs", "req_per_s": 1.25}]
    common.report_rows(args, rows, ["server", "req_per_s"], "toy run", "toy.csv", ["server", "req_per_s", "x"])
    common.report_rows(args, rows[:1], ["server"], "toy run", "toy.csv")
    out, err = capsys.readouterr()
    assert ('"req_per_s": 1.25' in out) == as_json and ("toy run" in out) != as_json
    assert "appended 2 rows to" in err and "appended 1 row to" in err
    got = _rows(tmp_path / "toy.csv")
    assert [r["server"] for r in got] == ["ours", "theirs", "ours"] and list(got[0]) == ["server", "req_per_s", "x"]
    args.no_csv = True
    common.report_rows(args, rows, ["server"], "toy run", "toy.csv")
    assert len(_rows(tmp_path / "toy.csv")) == 3


# ---- the kernel benchmarks, smallest cases ----------------------------------------------------------------

SMOKE = {
    "bench_norms": ["--shapes", "8x64", "--dtypes", "fp32,bf16", "--ops", "rms", "--variants", "residual"],
    "bench_softmax": ["--shapes", "8x64", "--dtypes", "fp32"],
    "bench_activations": ["--shapes", "8x64", "--dtypes", "bf16", "--modes", "fwd_bwd"],
    "bench_rope": ["--shapes", "1x4x2x1x16", "--dtypes", "fp32", "--variants", "interleaved"],
    "bench_attention": ["--seqlens", "16", "--dtypes", "fp32", "--modes", "fwd_bwd", "--kinds", "dense"],
    "bench_cross_entropy": ["--part", "speed", "--shapes", "8x300"],
    "bench_linear": ["--layers", "o", "--rows", "1", "--dtypes", "bf16"],
    "bench_linear_q": ["--rows", "1", "--qtypes", "Q4_1"],
}


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_kernel_benchmark_smoke(name, tmp_path):
    bench = importlib.import_module(name)
    rc = bench.main(
        ["--device", "cpu", "--quick", "--out-dir", str(tmp_path), "--providers", "torch,cpu", *SMOKE[name]]
    )
    assert rc == 0
    rows = _rows(tmp_path / f"{name.removeprefix('bench_')}.csv")
    assert {r["provider"] for r in rows} == {"torch", "cpu"}
    assert all(r["check"] == "ok" for r in rows if r["provider"] == "cpu")
    assert all(float(r["ms"]) > 0 and r["speedup_vs_torch"] for r in rows)
    assert all("kernels " in r["device_name"] for r in rows)
