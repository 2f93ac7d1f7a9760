"""Shared pieces of the kernel benchmarks (bench_<op>.py): environment row, timing, CSV, tables.

A benchmark script does, in this order:

    env = common.env_info(device)                   # one dict shared by every row of the run
    ms = common.time_ms(fn, device, quick=args.quick)   # median milliseconds of fn()
    rows.append({**env, "op": ..., "provider": ..., "ms": ms, ...})
    common.append_csv(path, rows)                   # benchmarks/results/<name>.csv, header created once
    common.print_table(rows, columns)               # rich if installed, else plain text

Timing follows DESIGN.md section 7: torch.utils.benchmark (blocked_autorange, median) on CPU,
triton.testing.do_bench (median) on CUDA. Rows are plain dicts so every benchmark can add its own
columns; the CSV keeps the header of the file it appends to.
"""

from __future__ import annotations

import csv
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# Measure this checkout's plm_engine (bench scripts import common first), not another one that an editable
# install put on the path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS_DIR = REPO / "benchmarks" / "results"

# The columns every benchmark row starts with, in CSV order; benchmark-specific columns follow.
ENV_COLUMNS = ["timestamp", "commit", "device", "device_name", "torch", "triton", "threads", "env"]
# Environment variables that change what the kernels do; recorded with each row when set.
RECORDED_ENV = (
    "PLM_ENGINE_BACKEND",
    "PLM_ENGINE_CPU_ISA",
    "PLM_ENGINE_CPU_HUGEPAGES",
    "THP_MEM_ALLOC_ENABLE",
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
    "TRITON_INTERPRET",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)


# ---- environment ----------------------------------------------------------------------------------


def git_commit() -> str:
    """Short hash of HEAD, with "+dirty" when tracked files differ; "unknown" outside a git checkout."""
    try:
        run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, timeout=10)
        head = run(["git", "rev-parse", "--short", "HEAD"])
        if head.returncode != 0:
            return "unknown"
        dirty = run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_flags() -> str:
    """The vector extensions that matter to the kernels, as the CPU reports them (e.g. "avx2 avx512f")."""
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_tile", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(w for w in want if w in have)
    except OSError:
        pass
    return platform.machine()


def kernels_isa() -> str:
    """The instruction set our C++ CPU kernels run with in this process ("none" without _C)."""
    try:
        from plm_engine.ops import extension
    except ImportError:
        return "none"
    return extension.cpu_isa()


def device_name(device: str) -> str:
    """GPU name; for the CPU its model, core count, vector extensions and our kernels' instruction set,
    so that every row says which CPU and which kernel build produced it."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cpus; {cpu_flags()}; kernels {kernels_isa()})"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_info(device: str) -> dict:
    """The columns shared by every row of one run: when, which code, which machine, which libraries."""
    env = " ".join(f"{k}={os.environ[k]}" for k in RECORDED_ENV if os.environ.get(k))
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": "cuda" if device.startswith("cuda") else device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "threads": torch.get_num_threads() if device == "cpu" else "",
        "env": env,
    }


# ---- timing ---------------------------------------------------------------------------------------


def time_cpu_ms(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Median ms per call of fn(), from torch.utils.benchmark's blocked_autorange."""
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call costs (lazy init, allocator) are not the kernel's
    m = Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def time_gpu_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median ms per call of fn() on the current CUDA device (triton.testing.do_bench, L2 flushed)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _time_gpu_events_ms(fn, rep_ms)
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def _time_gpu_events_ms(fn, rep_ms):
    # Fallback without triton: CUDA events around single calls, median.
    fn()
    torch.cuda.synchronize()
    times = []
    deadline = rep_ms / 1e3
    total = 0.0
    while total < deadline or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        total += times[-1] / 1e3
    return sorted(times)[len(times) // 2]


def time_ms(fn: Callable[[], object], device: str, quick: bool = False) -> float:
    """Median ms per call of fn() with the device's timer; `quick` for smoke runs (less precise)."""
    if device.startswith("cuda"):
        return time_gpu_ms(fn, warmup_ms=5, rep_ms=20) if quick else time_gpu_ms(fn)
    return time_cpu_ms(fn, min_run_time=0.05 if quick else 1.0)


# ---- output ---------------------------------------------------------------------------------------


def append_csv(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Appends rows to a CSV, writing the header when the file is new.

    New files get `columns` (default: the keys of the first row). An existing file keeps its header:
    keys it lacks are dropped with a warning, columns a row lacks are left empty.
    """
    path = Path(path)
    if not rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    header = None
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
    new = header is None
    if new:
        header = list(columns or rows[0].keys())
    dropped = sorted({k for r in rows for k in r} - set(header))
    if dropped:
        print(f"warning: {path} has no column(s) {', '.join(dropped)}; not recorded", file=sys.stderr)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore", restval="")
        if new:
            w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str | os.PathLike) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None) -> None:
    """A readable table of rows (rich if installed, else aligned plain text)."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
        if title:
            print(title)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in cells:
        table.add_row(*row)
    Console().print(table)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as a GitHub markdown table; columns default to the rows' keys minus the environment columns."""
    if not rows:
        return "(no rows)"
    columns = list(columns or [c for c in rows[0] if c not in ENV_COLUMNS])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_json_lines(rows: Iterable[dict]) -> None:
    for r in rows:
        print(json.dumps(r), flush=True)
