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
from dataclasses import dataclass

import common
import torch
import torch.nn.functional as F

from plm_engine.ops import backends
from plm_engine.ops.cross_entropy import cross_entropy, linear_cross_entropy

SPEED_SHAPES = {
    "cpu": [(1024, 32000), (256, 131072), (4096, 49152)],
    "cuda": [(8192, 32000), (4096, 131072), (8192, 49152), (2048, 262144)],
}
MEM_VARIANTS = ("torch", "ce_fused", "ce_inplace", "linear_ce")
# Gradients of softmax probabilities: bf16/fp16 round every logit, so their bound is looser than fp32's.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
COLUMNS = [
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
TABLE_COLUMNS = [c for c in COLUMNS if c not in ("op", "loss")]


@dataclass(frozen=True)
class Case:
    part: str  # "speed" (the loss and gradient of (n, v) logits) | "memory" (the LM head's peak memory)
    dtype: str
    n: int
    v: int
    d: int = 0  # memory: the hidden size

    @property
    def labels(self) -> dict:
        if self.part == "speed":
            return {"op": "cross_entropy", "part": "speed_fwd_bwd", "dtype": self.dtype, "shape": f"{self.n}x{self.v}"}
        shape = f"N{self.n}xV{self.v}xd{self.d}"
        return {"op": "linear_cross_entropy", "part": "peak_memory_fwd_bwd", "dtype": self.dtype, "shape": shape}


def ce_bytes(c: Case) -> int | None:
    """Logits read once, their gradient written once."""
    return 2 * c.n * c.v * common.DTYPES[c.dtype].itemsize if c.part == "speed" else None


def backend_for(device: str) -> str | None:
    """The fused backend plm_engine picks automatically on this device (None: only the reference)."""
    b = backends.choose(torch.device(device), "cross_entropy_fwd")
    return None if b == "torch" else b


# ---- part 1: speed ------------------------------------------------------------------------------------


def speed_setup(c: Case, device: str):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(c.n, c.v, generator=g) * 3).to(device, common.DTYPES[c.dtype]).requires_grad_()
    target = torch.randint(0, c.v, (c.n,), generator=g).to(device)

    def step(provider):
        """Forward + backward of the mean loss w.r.t. the logits."""
        if provider == "torch":
            loss = F.cross_entropy(logits, target)
        else:
            loss = cross_entropy(logits, target, backend=provider)
        return torch.autograd.grad(loss, logits)[0]

    ref = step("torch")

    def provider(p):
        # Each row's gradient of the mean is 1/n of its softmax: compare them at the softmax's scale.
        check = common.check_close(step(p) * c.n, ref * c.n, TOLERANCE) if p != "torch" else ""
        return common.Timed(lambda: step(p), check)

    return provider


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
    dt = common.DTYPES[dtype]
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


def memory_setup(c: Case, device: str):
    """Runs every variant in its own process first; provider(variant) then gives its row (the peaks and
    the check are relative to the torch variant's)."""
    res = {}
    for variant in MEM_VARIANTS:
        cmd = [sys.executable, __file__, "--_mem-child", variant, "--device", device, "--dtype", c.dtype]
        cmd += ["--tokens", str(c.n), "--vocab", str(c.v), "--hidden", str(c.d)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"bench_cross_entropy: {variant} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    base = res.get("torch")

    def provider(variant):
        r = res[variant]
        check = ""
        if base is not None and variant != "torch":
            same = abs(r["loss"] - base["loss"]) <= 1e-3 * abs(base["loss"]) and all(
                abs(r[k] - base[k]) <= 1e-2 * base[k] for k in ("gh_sum", "gw_sum")
            )
            check = "ok" if same else "mismatch"
        return {
            "peak_mb": round(r["peak_bytes"] / 2**20, 1),
            # A step can fit in memory the process already held (peak 0): no ratio then.
            "peak_vs_torch": round(r["peak_bytes"] / base["peak_bytes"], 3) if base and base["peak_bytes"] > 0 else "",
            "loss": round(r["loss"], 6),
            "check": check,
        }

    return provider


def main(argv=None) -> int:
    p = common.parser("cross_entropy", __doc__)
    p.add_argument("--part", default="speed,memory", help="comma list of speed,memory")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--shapes", default=None, help="speed part: comma list of NxV (default: a fixed set per device)")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--_mem-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if a._mem_child:
        mem_child(a._mem_child, a.device, a.tokens, a.vocab, a.hidden, a.dtype)
        return 0
    dev = "cuda" if a.device.startswith("cuda") else "cpu"
    parts = common.split_list(a.part, "", ("speed", "memory"), "part")
    shapes = common.parse_shapes(a.shapes) if a.shapes else [(256, 8192)] if a.quick else SPEED_SHAPES[dev]
    cases = [Case("speed", a.dtype, n, v) for n, v in shapes] if "speed" in parts else []
    if "memory" in parts:
        cases.append(Case("memory", a.dtype, *((1024, 8192, 128) if a.quick else (a.tokens, a.vocab, a.hidden))))
    wanted = common.split_list(a.providers, "", common.KERNEL_PROVIDERS, "provider")
    fused = common.usable_providers("cross_entropy", wanted, a.device, "cross_entropy_fwd")
    setups = {"speed": speed_setup, "memory": memory_setup}
    return common.run(
        "cross_entropy",
        a,
        cases,
        lambda c, device: setups[c.part](c, device),
        providers=lambda c: fused if c.part == "speed" else MEM_VARIANTS,
        columns=COLUMNS,
        table=TABLE_COLUMNS,
        bytes_moved=ce_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
