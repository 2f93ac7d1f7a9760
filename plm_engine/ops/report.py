"""Static GPU resource report: registers, spills and shared memory of every shipped kernel, no GPU needed.

Triton: every module named in TRITON_MODULES exposes `kernel_specs()` (plm_engine/ops/triton/spec.py),
the configurations its launchers can pick. Each is compiled ahead of time for each target (sm_80,
sm_90: triton.compile with a GPUTarget works without a device) and its cubin read by the cuobjdump
bundled in Triton's wheel. Triton's JIT specialises arguments on 16-divisibility (pointers 16-byte
aligned, integers multiples of 16: vectorised loads), so every spec is compiled both ways: "align16",
the common case, and "align1", what an odd row length gets; they can differ a lot in registers.

CUDA: cuobjdump --dump-resource-usage on plm_engine._C's shared object reads the fatbin nvcc
embedded in it, one section per arch.

A stack frame or local memory in a kernel is taken as register spilling (plm_engine's kernels have
no local arrays, calls or printf): `report_kernels` exits non-zero then. So it does when a kernel's
shared memory (static + dynamic) passes what one block may use on the arch (SHARED_MEM_PER_BLOCK):
such a configuration compiles but fails at launch ("out of resource: shared memory").

Compiling needs TRITON_INTERPRET unset: under the interpreter @triton.jit functions are interpreted
and cannot be compiled, so such a process runs the collection in a subprocess without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import importlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# Op families with Triton kernels; each new family appends its module.
TRITON_MODULES = [
    "plm_engine.ops.triton.norms",
    "plm_engine.ops.triton.softmax",
    "plm_engine.ops.triton.cross_entropy",
    "plm_engine.ops.triton.rope",
    "plm_engine.ops.triton.activations",
    "plm_engine.ops.triton.attention",
    "plm_engine.ops.triton.paged_attention",
    "plm_engine.ops.triton.token_mask",
    "plm_engine.ops.triton.linear",
]
ARCHS = (80, 90)
# Most shared memory one block can use (with the opt-in carve-out Triton requests), per SM version,
# in bytes: the CUDA programming guide's compute-capability table (8.0: 163 KB, 8.6/8.9: 99 KB, 9.0: 227 KB).
SHARED_MEM_PER_BLOCK = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ALIGNMENTS = (16, 1)
# Compiling is CPU-bound and single-threaded per kernel; two workers suit a small CI machine.
DEFAULT_WORKERS = 2

_FUNCTION_RE = re.compile(r"^\s*Function\s+(\S+):\s*$")
_USAGE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_ARCH_RE = re.compile(r"^\s*arch\s*=\s*sm_(\d+)(\w*)\s*$")


# ---- reading cuobjdump -----------------------------------------------------------------------------


def cuobjdump_path() -> str | None:
    """The cuobjdump shipped in Triton's wheel (the same one its NVIDIA backend uses), else one on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        tool = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(tool, os.X_OK):
            return tool
    return shutil.which("cuobjdump")


def parse_resource_usage(text: str, default_arch: int | None = None) -> list[dict]:
    """Functions and their resources from `cuobjdump --dump-resource-usage` output.

    A fatbin has one section per arch ("arch = sm_90a" header); a bare cubin has none, so its functions
    get default_arch. Returns [{"symbol", "arch", "registers", "stack", "shared", "local"}].
    """
    out, arch, symbol = [], default_arch, None
    for line in text.splitlines():
        if m := _ARCH_RE.match(line):
            arch, symbol = int(m[1]), None
        elif m := _FUNCTION_RE.match(line):
            symbol = m[1]
        elif symbol is not None and (m := _USAGE_RE.search(line)):
            out.append(
                {
                    "symbol": symbol,
                    "arch": arch,
                    "registers": int(m[1]),
                    "stack": int(m[2]),
                    "shared": int(m[3]),
                    "local": int(m[4]),
                }
            )
            symbol = None
    return out


def _cuobjdump(path: str) -> tuple[int, str]:
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it ships in the triton wheel: pip install triton)")
    proc = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def _demangle(symbols: list[str]) -> dict[str, str]:
    """C++ symbol -> readable name, through c++filt when it is installed (else unchanged)."""
    tool = shutil.which("c++filt")
    if tool is None or not symbols:
        return {s: s for s in symbols}
    proc = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True)
    names = proc.stdout.splitlines()
    if proc.returncode != 0 or len(names) != len(symbols):
        return {s: s for s in symbols}
    return dict(zip(symbols, names, strict=True))


def spill_bytes(row: dict) -> int:
    """Bytes of stack frame plus local memory: register spills, for kernels without local arrays."""
    return (row.get("stack") or 0) + (row.get("local") or 0)


def _row(backend, kernel, config, arch, usage, shared, num_warps, **extra) -> dict:
    row = {
        "backend": backend,
        "kernel": kernel,
        "config": config,
        "arch": arch,
        "registers": usage["registers"],
        "stack": usage["stack"],
        "local": usage["local"],
        "shared_mem": shared,
        "num_warps": num_warps,
    }
    row["spill_bytes"] = spill_bytes(row)
    row.update(extra)
    return row


# ---- Triton ----------------------------------------------------------------------------------------


@functools.cache
def _module_specs(module: str) -> list:
    return importlib.import_module(module).kernel_specs()


def _split_name(name: str) -> tuple[str, str]:
    """'norm_fwd[layer,BLOCK_N=64,bf16]' -> ('norm_fwd', 'layer,BLOCK_N=64,bf16')."""
    kernel, _, rest = name.partition("[")
    return kernel, rest.rstrip("]")


def _divisibility_attrs(signature: dict[str, str], align: int) -> dict:
    """The attrs Triton's JIT would attach when every pointer and integer argument is 16-divisible."""
    if align < 16:
        return {}
    is_int = re.compile(r"^[iu](8|16|32|64)$")
    return {
        (i,): [["tt.divisibility", 16]]
        for i, ty in enumerate(signature.values())
        if ty.startswith("*") or is_int.match(ty)
    }


def compile_spec_usage(spec, arch: int, align: int = 16) -> dict:
    """Compiles one KernelSpec for sm_<arch> and reads its resources (registers, stack, shared, local).

    Must run with TRITON_INTERPRET unset.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=spec.fn,
        signature=dict(spec.signature),
        constexprs=dict(spec.constexprs),
        attrs=_divisibility_attrs(spec.signature, align),
    )
    # FMA contraction pinned on, as plm_engine's launchers do (Triton 3.10 changes the default).
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        rc, text = _cuobjdump(path)
    found = parse_resource_usage(text, default_arch=arch)
    if rc != 0 or not found:
        raise RuntimeError(f"cuobjdump could not read the cubin of {spec.name}: {text.strip()[:500]}")
    usage = found[0]
    # Triton allocates its shared memory dynamically (metadata.shared); cuobjdump sees the static part.
    usage["shared"] += int(compiled.metadata.shared)
    return usage


def _triton_task(module: str, index: int, arch: int, align: int) -> dict:
    spec = _module_specs(module)[index]
    kernel, config = _split_name(spec.name)
    config = f"{config},align{align}" if config else f"align{align}"
    try:
        usage = compile_spec_usage(spec, arch, align)
    except Exception as e:  # one broken configuration must not hide the others
        return {
            "backend": "triton",
            "kernel": kernel,
            "config": config,
            "arch": arch,
            "registers": None,
            "stack": None,
            "local": None,
            "shared_mem": None,
            "num_warps": spec.num_warps,
            "spill_bytes": None,
            "module": module,
            "error": f"{type(e).__name__}: {e}",
        }
    return _row("triton", kernel, config, arch, usage, usage["shared"], spec.num_warps, module=module)


def _collect_triton(archs, modules, workers: int) -> list[dict]:
    tasks = [
        (m, i, arch, align)
        for m in modules
        for i, spec in enumerate(_module_specs(m))
        for arch in archs
        for align in ALIGNMENTS
        if align in spec.alignments
    ]
    if workers <= 1 or len(tasks) < 2:
        return [_triton_task(*t) for t in tasks]
    # spawn, not fork: the parent may hold torch's thread pools and Triton's MLIR context.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_triton_task, *zip(*tasks, strict=True), chunksize=4))


# ---- CUDA (plm_engine._C) --------------------------------------------------------------------------


def extension_path() -> str | None:
    """File of the built plm_engine._C, found without importing it (None when it is not built)."""
    try:
        spec = importlib.util.find_spec("plm_engine._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _note(backend: str, text: str) -> dict:
    return {
        "backend": backend,
        "kernel": None,
        "config": None,
        "arch": None,
        "registers": None,
        "stack": None,
        "local": None,
        "shared_mem": None,
        "num_warps": None,
        "spill_bytes": None,
        "note": text,
    }


def collect_cuda(archs=ARCHS, path: str | None = None) -> list[dict]:
    """Rows for every CUDA kernel embedded in a shared object (default: plm_engine._C) for `archs`.

    A library without device code gives one row with a "note" and no kernel, not an error.
    """
    path = path or extension_path()
    if path is None:
        return [_note("cuda", "plm_engine._C is not built")]
    if cuobjdump_path() is None:
        return [_note("cuda", "no cuobjdump to read plm_engine._C with (it ships in the triton wheel)")]
    rc, text = _cuobjdump(path)
    if "does not contain device code" in text:
        return [_note("cuda", f"{os.path.basename(path)} has no CUDA kernels (built without nvcc)")]
    if rc != 0:
        return [_note("cuda", f"cuobjdump failed on {path}: {text.strip()[:300]}")]
    found = [f for f in parse_resource_usage(text) if f["arch"] in archs]
    if not found:
        return [_note("cuda", f"{os.path.basename(path)} has no CUDA kernels for sm_{archs}")]
    names = _demangle(sorted({f["symbol"] for f in found}))
    return [_row("cuda", names[f["symbol"]], "", f["arch"], f, f["shared"], None, symbol=f["symbol"]) for f in found]


# ---- collecting --------------------------------------------------------------------------------------


def _collect_in_subprocess(archs, include_cuda, modules, workers) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child imports exactly what this process can (tests pass their own modules).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [
            sys.executable,
            "-m",
            "plm_engine.ops.report",
            "--rows-to",
            out,
            "--archs",
            ",".join(map(str, archs)),
            "--modules",
            ",".join(modules),
            "--workers",
            str(workers),
        ]
        if not include_cuda:
            cmd.append("--no-cuda")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"kernel report subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def collect(archs=ARCHS, include_cuda: bool = True, *, modules=None, workers: int = DEFAULT_WORKERS) -> list[dict]:
    """One row per (kernel, configuration, arch): backend, kernel, config, arch, registers, stack, local,
    spill_bytes, shared_mem (bytes, static + dynamic), num_warps; an "error" key when a Triton
    configuration failed to compile; rows with a "note" (and no kernel) say why a part has no rows.

    modules: the Triton modules to compile (default TRITON_MODULES).
    """
    archs = tuple(int(a) for a in archs)
    modules = list(TRITON_MODULES if modules is None else modules)
    if importlib.util.find_spec("triton") is None:
        rows = [_note("triton", "triton is not installed (pip install 'triton>=3.6')")]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        return _collect_in_subprocess(archs, include_cuda, modules, workers)
    else:
        rows = _collect_triton(archs, modules, workers)
    if include_cuda:
        rows += collect_cuda(archs)
    return rows


# ---- the report --------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> list[dict]:
    """Per (backend, kernel, arch): configurations, max registers, max spill bytes, max shared memory."""
    out: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kernel") is None or r.get("registers") is None:
            continue
        key = (r["backend"], r["kernel"], r["arch"])
        s = out.setdefault(
            key,
            {
                "backend": r["backend"],
                "kernel": r["kernel"],
                "arch": r["arch"],
                "configs": 0,
                "max_registers": 0,
                "max_spill_bytes": 0,
                "max_shared_mem": 0,
            },
        )
        s["configs"] += 1
        s["max_registers"] = max(s["max_registers"], r["registers"])
        s["max_spill_bytes"] = max(s["max_spill_bytes"], r["spill_bytes"])
        s["max_shared_mem"] = max(s["max_shared_mem"], r["shared_mem"])
    return list(out.values())


def shared_mem_limit(arch) -> int | None:
    """Bytes of shared memory one block may use on sm_<arch> (None: an arch this table does not know)."""
    return SHARED_MEM_PER_BLOCK.get(arch) if arch is not None else None


def problems(rows: list[dict]) -> list[str]:
    """What makes the report fail: spills, shared memory over the arch's per-block limit, and
    configurations that did not compile."""
    out = []
    for r in rows:
        config = f" [{r['config']}]" if r.get("config") else ""
        where = f"{r['backend']} {r['kernel']}{config} sm_{r['arch']}"
        if r.get("error"):
            out.append(f"{where}: did not compile: {r['error']}")
            continue
        if r.get("kernel") is None:
            continue
        if r.get("spill_bytes"):
            out.append(f"{where}: spills ({r['stack']} B stack, {r['local']} B local, {r['registers']} registers)")
        limit = shared_mem_limit(r.get("arch"))
        if limit is not None and (r.get("shared_mem") or 0) > limit:
            out.append(f"{where}: shared memory {r['shared_mem']} B > {limit} B per block on sm_{r['arch']}")
    return out


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return "-" if v is None else str(v)

    header = ("backend", "kernel", "config", "arch", "regs", "spill_B", "smem_B", "warps")
    body = [
        (
            r["backend"],
            r["kernel"],
            r["config"] or "",
            f"sm_{r['arch']}",
            cell(r["registers"]),
            cell(r["spill_bytes"]),
            cell(r["shared_mem"]),
            cell(r["num_warps"]),
        )
        for r in rows
        if r.get("kernel") is not None
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in (header, *body)]
    lines += [f"note ({r['backend']}): {r['note']}" for r in rows if r.get("note")]
    lines.append("")
    lines.append("max per kernel and arch:")
    summary = summarize(rows)
    width = max((len(s["kernel"]) for s in summary), default=0)
    for s in summary:
        lines.append(
            f"  {s['backend']:6} {s['kernel']:{width}}  sm_{s['arch']}  configs {s['configs']:3}  "
            f"regs {s['max_registers']:3}  spill {s['max_spill_bytes']} B  smem {s['max_shared_mem']} B"
        )
    bad = problems(rows)
    lines.append("")
    lines += [f"PROBLEM: {p}" for p in bad] or ["no spills, shared memory within every arch's limit"]
    return "\n".join(lines)


def report_kernels(
    json_output: bool = False, *, archs=ARCHS, include_cuda: bool = True, modules=None, workers: int = DEFAULT_WORKERS
) -> int:
    """Prints the report (a table, or JSON rows) and returns the exit status: 1 on any spill, shared
    memory over the per-block limit or failed compile, 0 otherwise. What `plm-engine report-kernels [--json]` runs."""
    start = time.monotonic()
    rows = collect(archs, include_cuda, modules=modules, workers=workers)
    if json_output:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
        print(f"({len(rows)} rows in {time.monotonic() - start:.0f} s)")
    return 1 if problems(rows) else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m plm_engine.ops.report", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma-separated SM versions")
    p.add_argument("--modules", default=",".join(TRITON_MODULES), help="Triton modules with kernel_specs()")
    p.add_argument("--no-cuda", action="store_true", help="skip plm_engine._C's CUDA kernels")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="parallel compile processes")
    p.add_argument("--rows-to", help=argparse.SUPPRESS)  # the parent's subprocess call: raw rows to a file
    args = p.parse_args(argv)
    archs = tuple(int(a) for a in args.archs.split(",") if a)
    modules = [m for m in args.modules.split(",") if m]
    if args.rows_to:
        rows = collect(archs, not args.no_cuda, modules=modules, workers=args.workers)
        with open(args.rows_to, "w") as f:
            json.dump(rows, f)
        return 0
    return report_kernels(args.json, archs=archs, include_cuda=not args.no_cuda, modules=modules, workers=args.workers)


if __name__ == "__main__":
    sys.exit(main())
