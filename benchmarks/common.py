"""The benchmark harness (bench_<name>.py): cases x providers -> timing, bytes moved, CSV rows, a table.

A benchmark script describes its cases and how each provider runs one; `run` does the rest:

    p = common.parser("norms", __doc__, PROVIDERS)          # --device --quick --providers --repeat ...
    p.add_argument("--shapes", ...)                        # the script's own case options
    args = p.parse_args(argv)

    def setup(case, device):                               # inputs once per case, shared by providers
        x = ...
        def provider(name):                                # -> Timed(fn, check) or a dict of metrics
            return common.Timed(lambda: op(x, backend=name), check=common.check_close(...))
        return provider

    return common.run("norms", args, cases, setup, providers=..., columns=COLUMNS, bytes_moved=...)

Per case, the providers are timed in interleaved rounds (--repeat; each round a median); each row has the
environment (ENV_COLUMNS: commit, device and CPU model with its vector extensions and our kernels'
instruction set, torch/triton versions, threads), the case's labels, ms, GB/s and TFLOP/s from the case's
bytes moved / FLOPs, the speedup over the baseline provider measured in the same run, and the check of the
provider's output. A provider that measures itself (a subprocess, an end-to-end run) returns a dict of
metrics instead, which becomes its row. Rows are appended to <out-dir>/<name>.csv after every case (a run
cut short keeps what it measured); the file keeps the header it was created with.

Timing follows DESIGN.md section 7: torch.utils.benchmark (blocked_autorange, median) on CPU,
triton.testing.do_bench (median) on CUDA.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    from plm_engine.info import _cpu_name  # the name `plm-engine info` prints

    return _cpu_name()


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
    """Median ms per call of fn() with torch's current thread count, from torch.utils.benchmark's
    blocked_autorange."""
    from torch.utils.benchmark import Timer

    fn()  # warm-up: first-call costs (lazy init, allocator) are not the kernel's
    # Timer runs fn on ONE thread unless told otherwise (its num_threads defaults to 1, whatever
    # torch.set_num_threads says): pass the count the run records in its "threads" column.
    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
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
    # Older files may lack some environment columns; only a missing benchmark column is worth a warning.
    dropped = sorted({k for r in rows for k in r} - set(header) - set(ENV_COLUMNS))
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


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str | None = None, file=None) -> None:
    """Rows as an aligned plain-text table that reads the same in a terminal, a pipe or a log file.

    Columns with one value in every row move to a line under the title, so the table shows only what
    varies. In a terminal too narrow for the table, each row is printed as a block of `column: value`
    lines instead (a pipe has no width: the table is never wrapped there).
    """
    file = file or sys.stdout
    if title:
        print(title, file=file)
    if not rows:
        print("(no rows)", file=file)
        return
    cells = {c: [fmt(r.get(c)) for r in rows] for c in columns}
    same = [c for c in columns if len(rows) > 1 and len(set(cells[c])) == 1]
    if same:
        print("  " + "  ".join(f"{c}={cells[c][0]}" for c in same if cells[c][0]), file=file)
    shown = [c for c in columns if c not in same]
    widths = [max(len(c), *(len(v) for v in cells[c])) for c in shown]
    line_width = sum(widths) + 2 * (len(widths) - 1)
    if file.isatty() and line_width > shutil.get_terminal_size((120, 24)).columns:
        key_width = max(len(c) for c in shown)
        for i in range(len(rows)):
            print(file=file)
            for c in shown:
                print(f"  {c.rjust(key_width)}: {cells[c][i]}", file=file)
        return
    print("  ".join(c.rjust(w) for c, w in zip(shown, widths)), file=file)
    for i in range(len(rows)):
        print("  ".join(cells[c][i].rjust(w) for c, w in zip(shown, widths)), file=file)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as a GitHub markdown table; columns default to the rows' keys minus the environment columns."""
    if not rows:
        return "(no rows)"
    columns = list(columns or [c for c in rows[0] if c not in ENV_COLUMNS])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report_rows(
    args, rows: Sequence[dict], table_columns: Sequence[str], title: str, csv_name: str, csv_columns=None
) -> None:
    """A whole-run report: the rows as indented JSON (--json) or a table, then appended to
    <--out-dir>/csv_name unless --no-csv (csv_columns: the header of a new file, default the first row's keys)."""
    if args.json:
        print(json.dumps(list(rows), indent=2))
    else:
        print_table(rows, table_columns, title=title)
    if not args.no_csv:
        path = append_csv(Path(args.out_dir) / csv_name, rows, csv_columns)
        print(f"appended {len(rows)} {'row' if len(rows) == 1 else 'rows'} to {path}", file=sys.stderr)


def print_json_lines(rows: Iterable[dict]) -> None:
    for r in rows:
        print(json.dumps(r), flush=True)


# ---- the harness: cases x providers -> rows ------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# PyTorch itself, then plm_engine's backends: what the kernel benchmarks compare.
KERNEL_PROVIDERS = ("torch", "cpu", "triton", "cuda")
# How far a provider's forward may be from the baseline's, relative to the largest reference value.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class Case:
    """One case of a kernel benchmark. Its labels (the CSV columns that say what was measured) are its
    fields, the shape written AxBxC; a benchmark subclasses it to name the parts of its shape."""

    op: str
    variant: str
    mode: str  # "fwd" | "fwd_bwd" | ...
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]

    @property
    def labels(self) -> dict:
        shape = "x".join(map(str, self.shape))
        return {"op": self.op, "variant": self.variant, "mode": self.mode, "dtype": self.dtype, "shape": shape}


@dataclass
class Timed:
    """One provider's run of one case: fn() is what is timed; check is its output against the baseline's
    ("ok", "mismatch ..."; "" for the baseline itself). A fast wrong kernel is no result."""

    fn: Callable[[], object]
    check: str = ""


def parser(
    name: str,
    doc: str,
    providers: Sequence[str] = KERNEL_PROVIDERS,
    dtypes: str | None = None,
    modes: str | None = None,
    shapes: str | None = None,
) -> argparse.ArgumentParser:
    """The options every harness benchmark takes; the script adds the other options that choose its cases.
    When given: dtypes, the default of --dtypes (a comma list of fp32, bf16, fp16); modes, the default of
    --modes; shapes, what --shapes takes (e.g. "ROWSxN, e.g. 4096x4096")."""
    p = argparse.ArgumentParser(
        prog=f"bench_{name}.py", description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small cases and short timing (a smoke test)")
    if dtypes is not None:
        p.add_argument("--dtypes", default=None, help=f"comma list of fp32,bf16,fp16 (default: {dtypes})")
    if modes is not None:
        p.add_argument("--modes", default=modes, help=f"comma list of {modes}")
    if shapes is not None:
        p.add_argument("--shapes", default=None, help=f"comma list of {shapes} (default: a set per device)")
    p.add_argument(
        "--providers",
        default=",".join(providers),
        help=f"comma list of {','.join(providers)} (those that cannot run here are skipped, saying why)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="time each case this many rounds, providers interleaved, and keep each provider's best "
        "median (steadier on a shared machine)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds: start no new case after this (the rows so far are kept); exits 0",
    )
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help=f"where {name}.csv is appended")
    p.add_argument("--no-csv", action="store_true", help="do not append to the CSV")
    p.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    p.set_defaults(known_providers=tuple(providers))
    return p


def split_list(value: str | None, default: str, allowed: Iterable[str] | None = None, what: str = "value") -> list:
    """A comma-list option (value, or default when it is None), each item checked against `allowed`."""
    items = [v for v in (value if value is not None else default).split(",") if v]
    if allowed is not None:
        allowed = list(allowed)
        for v in items:
            if v not in allowed:
                raise SystemExit(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")
    return items


def parse_shapes(value: str) -> list[tuple[int, ...]]:
    """ "4096x4096,8192x1024" -> [(4096, 4096), (8192, 1024)]."""
    return [tuple(int(d) for d in s.lower().split("x")) for s in value.split(",") if s]


def require_device(name: str, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_{name}: no CUDA device here; use --device cpu", file=sys.stderr)
        raise SystemExit(2)


def provider_usable(provider: str, device: str, op: str) -> tuple[bool, str]:
    """(usable, why not) for "torch" (PyTorch itself) or one of plm_engine's backends running `op`."""
    if provider == "torch":
        return True, ""
    if provider == "triton" and not device.startswith("cuda"):
        return False, "Triton runs on CUDA tensors (the CPU interpreter is for tests)"
    from plm_engine.ops import backends

    return backends.availability(provider, torch.device(device), op)


_SKIP_NOTED: set = set()


def usable_providers(name: str, wanted: Sequence[str], device: str, op: str, usable=provider_usable) -> list[str]:
    """The providers of `wanted` that can run `op` here; each one skipped is reported once, with why."""
    out = []
    for p in wanted:
        ok, why = usable(p, device, op)
        if ok:
            out.append(p)
        elif (name, p, op) not in _SKIP_NOTED:
            _SKIP_NOTED.add((name, p, op))
            print(f"bench_{name}: skipping provider {p} for {op}: {why}", file=sys.stderr)
    return out


def check_close(out, ref, tolerance: dict | None = None) -> str:
    """ "ok" when every tensor of out (a tensor or a tuple) is within the dtype's tolerance of ref's,
    relative to ref's largest value; else "mismatch <max error>"."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for a, b in zip(outs, refs, strict=True):
        a, b = a.detach().float(), b.detach().float()
        err = (a - b).abs().max().item() if b.numel() else 0.0
        tol = (tolerance or TOLERANCE)[outs[0].dtype] * max(1.0, b.abs().max().item() if b.numel() else 1.0)
        if not err <= tol:
            return f"mismatch {err:.2g}"
    return "ok"


def fwd_or_fwd_bwd(impl: Callable, args: Sequence, mode: str, inputs: Sequence = (), grads=None) -> Callable:
    """What is timed: impl(*args) for "fwd"/"fwd_inplace"; for "fwd_bwd" also torch.autograd.grad of
    every output (impl's tensor or tuple) w.r.t. inputs (default: args) with grads as the upstream."""
    if mode != "fwd_bwd":
        return lambda: impl(*args)
    wrt = list(inputs or args)

    def step():
        out = impl(*args)
        return torch.autograd.grad(list(out) if isinstance(out, tuple) else [out], wrt, grads)

    return step


def against_torch(
    impl_of: Callable[[str], Callable],
    args: Sequence,
    mode: str = "fwd",
    inputs: Sequence = (),
    grads=None,
    tolerance: dict | None = None,
    inplace: bool = False,
) -> Callable[[str], Timed]:
    """The provider(name) of a setup() whose providers all run impl_of(name)(*args): each one's output is
    checked against impl_of("torch")'s, then timed as fwd_or_fwd_bwd. An in-place impl gets copies of
    args (the check's and the timed ones), so the shared inputs never change."""
    with torch.no_grad():
        ref = impl_of("torch")(*args)

    def copies():
        return [t.detach().clone() for t in args] if inplace else args

    def provider(name: str) -> Timed:
        impl = impl_of(name)
        with torch.no_grad():
            check = check_close(impl(*copies()), ref, tolerance) if name != "torch" else ""
        return Timed(fwd_or_fwd_bwd(impl, copies(), mode, inputs, grads), check)

    return provider


def _warn(name: str, what: str, e: Exception) -> None:
    print(f"bench_{name}: {what}: {e!r}", file=sys.stderr)
    traceback.print_exc(limit=3)


def run(
    name: str,
    args: argparse.Namespace,
    cases: Iterable,
    setup: Callable[[object, str], Callable[[str], Timed | dict]],
    *,
    op: str | None = None,
    providers: Callable[[object], Sequence[str]] | None = None,
    columns: Sequence[str],
    table: Sequence[str] | None = None,
    bytes_moved: Callable[[object], float | None] | None = None,
    flops: Callable[[object], float | None] | None = None,
    baseline: str = "torch",
    derive: Callable[[object, str, dict, dict], dict] | None = None,
    reduce: Callable[[list[float]], float] = min,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> int:
    """Runs every case with its providers and records one row per (case, provider); returns the exit
    status: 1 if any provider failed or its check found a mismatch, else 0.

    cases: objects with a `labels` dict (the case's columns, e.g. op, dtype, shape).
    setup(case, device): makes the case's inputs once and returns provider(name) -> Timed(fn, check), or
      a dict of metrics for a provider that measures itself (it becomes the row as is).
    op: the plm_engine op (e.g. "norm_fwd") whose backends are the providers: --providers minus those
      that cannot run it here (each reported once, with why).
    providers(case): instead of op, the providers to run for each case. A name starting with "_" is timed
      but not reported (a yardstick that `derive` reads, e.g. the memory read bandwidth).
    columns: the CSV columns after ENV_COLUMNS (a new file's header; an existing file keeps its own).
    bytes_moved / flops (case -> number or None): give each timed row gbps / tflops.
    derive(case, provider, ms_by_provider, times_by_provider): more columns for a row.
    reduce: each provider's figure from its per-round medians (min: the best round).
    timer: fn -> ms (default: time_ms on args.device, shorter with --quick).
    """
    device = args.device
    require_device(name, device)
    if providers is None:
        wanted = split_list(args.providers, "", args.known_providers, "provider")
        usable = usable_providers(name, wanted, device, op)
        providers = lambda case: usable
    env = env_info(device)
    csv_path = Path(args.out_dir) / f"{name}.csv"
    timer = timer or (lambda fn: time_ms(fn, device, quick=args.quick))
    cases = list(cases)
    all_rows, failures, start = [], 0, time.monotonic()
    for i, case in enumerate(cases):
        if args.time_budget is not None and time.monotonic() - start > args.time_budget:
            print(
                f"bench_{name}: time budget of {args.time_budget:.0f} s spent; skipped the last "
                f"{len(cases) - i} of {len(cases)} cases",
                file=sys.stderr,
            )
            break
        try:
            make = setup(case, device)
        except Exception as e:  # e.g. out of memory for the largest shapes: the other cases still run
            failures += 1
            _warn(name, f"could not set up {case.labels}", e)
            continue
        runs = {}
        for p in providers(case):
            try:
                runs[p] = make(p)
            except Exception as e:  # a broken provider must not stop the others
                failures += 1
                _warn(name, f"{p} failed on {case.labels}", e)
        times = {p: [] for p, r in runs.items() if isinstance(r, Timed)}
        for _ in range(max(1, args.repeat)):
            for p in [p for p in times if p in runs]:
                try:
                    times[p].append(timer(runs[p].fn))
                except Exception as e:
                    failures += 1
                    _warn(name, f"timing {p} failed on {case.labels}", e)
                    del runs[p]
        ms = {p: reduce(t) for p, t in times.items() if t and p in runs}
        rows = []
        for p, r in runs.items():
            if p.startswith("_") or (isinstance(r, Timed) and p not in ms):
                continue
            row = dict(r) if isinstance(r, dict) else _timed_row(case, p, ms, r.check, bytes_moved, flops, baseline)
            if derive is not None:
                row.update(derive(case, p, ms, times))
            rows.append({**env, **case.labels, "provider": p, **row})
        _emit(name, args, rows)
        if not args.no_csv:
            append_csv(csv_path, rows, [*ENV_COLUMNS, *columns])
        all_rows += rows
        del make, runs
    if not args.json:
        print_table(all_rows, table or columns, title=f"{name} on {env['device_name']} ({env['commit']})")
    if not args.no_csv and all_rows:
        print(f"appended {len(all_rows)} rows to {csv_path}", file=sys.stderr)
    mismatches = [r for r in all_rows if str(r.get("check", "")).startswith("mismatch")]
    for r in mismatches:
        print(f"bench_{name}: {r['provider']} gave a wrong result on {_labels(r)}: {r['check']}", file=sys.stderr)
    return 1 if failures or mismatches else 0


def _labels(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items() if k not in ENV_COLUMNS and k != "provider")[:200]


def _timed_row(case, provider, ms, check, bytes_moved, flops, baseline) -> dict:
    t = ms[provider]
    nbytes = bytes_moved(case) if bytes_moved else None
    nflops = flops(case) if flops else None
    row = {"ms": round(t, 4)}
    if bytes_moved is not None:
        row["gbps"] = round(nbytes / (t * 1e6), 2) if nbytes else ""
    if flops is not None:
        row["tflops"] = round(nflops / (t * 1e9), 4) if nflops else ""
    row[f"speedup_vs_{baseline}"] = round(ms[baseline] / t, 3) if baseline in ms else ""
    row["check"] = check
    return row


def _emit(name: str, args, rows: list[dict]) -> None:
    """Per-case output while the run goes: JSON lines (--json), else one progress line per row on stderr."""
    if args.json:
        print_json_lines(rows)
        return
    skip = {*ENV_COLUMNS, "provider"}
    for r in rows:
        figures = "  ".join(f"{k}={fmt(v)}" for k, v in r.items() if k not in skip and v not in ("", None))
        print(f"bench_{name}: {r['provider']:>8}  {figures}", file=sys.stderr, flush=True)
