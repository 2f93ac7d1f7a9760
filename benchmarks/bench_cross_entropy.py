"""Cross-entropy benchmark: speed of the fused loss+gradient, and peak memory of the LM-head loss.

Part 1, speed (forward + backward of the loss w.r.t. (N, V) logits), providers in the same process:
  torch    F.cross_entropy(logits, target) + autograd
  cpu / triton / cuda   plm_engine.ops.cross_entropy (fused: the gradient comes out of the forward)
GB/s by ce_bytes(): the logits read once and their gradient written once.

Part 2, peak memory of loss(hidden @ W.T, target) forward + backward (grads of hidden and W), each
variant in its own subprocess so the peaks do not mix:
  torch            F.linear + F.cross_entropy (unfused)
  ce_fused         F.linear + plm_engine cross_entropy (one (N, V) gradient buffer, saved and scaled)
  ce_inplace       F.linear + cross_entropy(inplace_backward=True) (the gradient overwrites the logits)
  linear_ce        plm_engine linear_cross_entropy (chunked: the (N, V) logits never exist)
Method: CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before the step. CPU: the
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs after a small warm-up step)
during the step minus the resident set before it, i.e. the extra memory the step needed; where the mark
cannot be reset, getrusage's ru_maxrss after the step minus the same mark once the inputs exist.
The default shape is SmolLM2's head: N=8192 tokens, V=49152, d=576.

    python benchmarks/bench_cross_entropy.py                       # both parts on CPU (or CUDA)
    python benchmarks/bench_cross_entropy.py --quick --no-csv      # smoke test (small shapes)
    python benchmarks/bench_cross_entropy.py --part memory --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from plm_engine.ops import backends  # noqa: E402
from plm_engine.ops.cross_entropy import cross_entropy, linear_cross_entropy  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROVIDERS = ("torch", "cpu", "triton", "cuda")
SPEED_SHAPES = {
    "cpu": [(1024, 32000), (256, 131072), (4096, 49152)],
    "cuda": [(8192, 32000), (4096, 131072), (8192, 49152), (2048, 262144)],
}
MEM_VARIANTS = ("torch", "ce_fused", "ce_inplace", "linear_ce")
COLUMNS = [
    *common.ENV_COLUMNS,
    "op",
    "part",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbps",
    "speedup_vs_torch",
    "peak_mb",
    "peak_vs_torch",
    "loss",
    "check",
]
TABLE_COLUMNS = [
    "part",
    "dtype",
    "shape",
    "provider",
    "ms",
    "gbps",
    "speedup_vs_torch",
    "peak_mb",
    "peak_vs_torch",
    "check",
]


def ce_bytes(n: int, v: int, itemsize: int) -> int:
    """Logits read once, their gradient written once."""
    return 2 * n * v * itemsize


def backend_for(device: str) -> str | None:
    """The fused backend plm_engine picks automatically on this device (None: only the reference)."""
    b = backends.choose(torch.device(device), "cross_entropy_fwd")
    return None if b == "torch" else b


# ---- part 1: speed ------------------------------------------------------------------------------------


def _ce_step(provider, logits, target):
    """Forward + backward of the mean loss w.r.t. the logits."""

    def step():
        if provider == "torch":
            loss = F.cross_entropy(logits, target)
        else:
            loss = cross_entropy(logits, target, backend=provider)
        return torch.autograd.grad(loss, logits)

    return step


def speed(a, env) -> list[dict]:
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    shapes = [(256, 8192)] if a.quick else SPEED_SHAPES[dev]
    if a.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]
    providers = ["torch"] + [
        p
        for p in PROVIDERS[1:]
        if backends.availability(p, torch.device(a.device), "cross_entropy_fwd")[0]
        and not (p == "triton" and dev == "cpu")
    ]
    rows = []
    for n, v in shapes:
        dt = DTYPES[a.dtype]
        g = torch.Generator().manual_seed(0)
        logits = (torch.randn(n, v, generator=g) * 3).to(a.device, dt).requires_grad_()
        target = torch.randint(0, v, (n,), generator=g).to(a.device)
        ref_loss = F.cross_entropy(logits, target)
        (ref_grad,) = torch.autograd.grad(ref_loss, logits)
        best, checks = {}, {}
        for p in providers:
            step = _ce_step(p, logits, target)
            if p != "torch":
                (grad,) = step()
                err = (grad.float() - ref_grad.float()).abs().max().item() / ref_grad.float().abs().max().item()
                checks[p] = "ok" if err < (1e-4 if dt == torch.float32 else 2e-2) else f"mismatch {err:.2g}"
            best[p] = common.time_ms(step, a.device, quick=a.quick)
        gb = ce_bytes(n, v, dt.itemsize) / 1e9
        for p, ms in best.items():
            rows.append(
                {
                    **env,
                    "op": "cross_entropy",
                    "part": "speed_fwd_bwd",
                    "dtype": a.dtype,
                    "shape": f"{n}x{v}",
                    "provider": p,
                    "ms": round(ms, 4),
                    "gbps": round(gb / (ms / 1e3), 2),
                    "speedup_vs_torch": round(best["torch"] / ms, 3),
                    "check": checks.get(p, ""),
                }
            )
        del logits, ref_grad
    return rows


# ---- part 2: peak memory (one subprocess per variant) ---------------------------------------------------


def _mem_step(variant, hidden, weight, target, backend):
    if variant == "linear_ce":
        loss = linear_cross_entropy(hidden, weight, target, backend=backend)
    else:
        logits = hidden @ weight.t()  # (N, V)
        if variant == "torch":
            loss = F.cross_entropy(logits, target)
        else:
            loss = cross_entropy(logits, target, inplace_backward=variant == "ce_inplace", backend=backend)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return loss.item(), gh, gw


def _peak_bytes():
    if torch.cuda.is_available() and _peak_bytes.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Resets the process's RSS high-water mark (VmHWM; Linux >= 4.0), so the next peak is the step's
    own. Without it the mark may already hold more than the step needs (import, input creation), and
    the step would show no growth at all."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def mem_child(variant: str, device: str, n: int, v: int, d: int, dtype: str) -> None:
    """Runs one variant and prints {"peak_bytes", "loss", "gh_sum"} as JSON (the parent's subprocess)."""
    _peak_bytes.device = device
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device, dt).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(device, dt).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    backend = backend_for(device)
    # The RSS high-water mark only grows: take it before the warm-up, whose (V, d) gradient buffers are
    # part of what the step needs.
    before = _peak_bytes()
    # Warm-up on a slice: lazy initialisation (on CUDA, allocator pools) is not the step's memory.
    _mem_step(variant, hidden[:64].detach().requires_grad_(), weight, target[:64], backend)
    hwm = False
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    elif _reset_rss_peak():
        # The peak resident set during the step minus the resident set before it.
        hwm = True
        before = _proc_status_kib("VmRSS") * 1024
    loss, gh, gw = _mem_step(variant, hidden, weight, target, backend)
    peak = (_proc_status_kib("VmHWM") * 1024 if hwm else _peak_bytes()) - before
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "loss": loss,
                "gh_sum": gh.double().abs().sum().item(),
                "gw_sum": gw.double().abs().sum().item(),
            }
        )
    )


def memory(a, env) -> list[dict]:
    n, v, d = (1024, 8192, 128) if a.quick else (a.tokens, a.vocab, a.hidden)
    res = {}
    for variant in MEM_VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--_mem-child",
            variant,
            "--device",
            a.device,
            "--tokens",
            str(n),
            "--vocab",
            str(v),
            "--hidden",
            str(d),
            "--dtype",
            a.dtype,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"bench_cross_entropy: {variant} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    base = res.get("torch")
    for variant, r in res.items():
        check = ""
        if base is not None and variant != "torch":
            same = (
                abs(r["loss"] - base["loss"]) <= 1e-3 * abs(base["loss"])
                and abs(r["gh_sum"] - base["gh_sum"]) <= 1e-2 * base["gh_sum"]
                and abs(r["gw_sum"] - base["gw_sum"]) <= 1e-2 * base["gw_sum"]
            )
            check = "ok" if same else "mismatch"
        rows.append(
            {
                **env,
                "op": "linear_cross_entropy",
                "part": "peak_memory_fwd_bwd",
                "dtype": a.dtype,
                "shape": f"N{n}xV{v}xd{d}",
                "provider": variant,
                "peak_mb": round(r["peak_bytes"] / 2**20, 1),
                # A step can fit in memory the process already held (peak 0): no ratio then.
                "peak_vs_torch": round(r["peak_bytes"] / base["peak_bytes"], 3)
                if base and base["peak_bytes"] > 0
                else "",
                "loss": round(r["loss"], 6),
                "check": check,
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=common.default_device())
    p.add_argument("--quick", action="store_true", help="small shapes, short timing (smoke test)")
    p.add_argument("--part", default="speed,memory", help="comma list of speed,memory")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--shapes", default=None, help="speed part: comma list of NxV (default: a fixed set per device)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--_mem-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if a._mem_child:
        mem_child(a._mem_child, a.device, a.tokens, a.vocab, a.hidden, a.dtype)
        return 0
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_cross_entropy: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    env = common.env_info(a.device)
    rows = []
    parts = a.part.split(",")
    if "speed" in parts:
        rows += speed(a, env)
    if "memory" in parts:
        rows += memory(a, env)
    if not a.no_csv and rows:
        common.append_csv(Path(a.out_dir) / "cross_entropy.csv", rows, COLUMNS)
    common.print_table(rows, TABLE_COLUMNS, title=f"cross-entropy on {env['device_name']} ({env['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
