"""Training metrics: a JSONL + CSV logger (TensorBoard too when installed), throughput and MFU, the
classification scores, and a plot of the loss curves from a log."""

from __future__ import annotations

import csv
import json
import math
import os
import time

import torch

CSV_COLUMNS = (
    "step",
    "split",
    "loss",
    "ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "accuracy",
    "macro_f1",
    "tokens",
    "elapsed_s",
)


class MetricsLogger:
    """Appends one JSON object per record to <out_dir>/log.jsonl and a row to <out_dir>/log.csv.

    Resuming appends to the same files; records of steps after the resume point (written by the interrupted
    run after its last checkpoint) are dropped first, so the log holds each step once.
    """

    def __init__(self, out_dir: str, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "log.jsonl")
        self.csv = os.path.join(out_dir, "log.csv")
        self.tb = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                if os.path.exists(p):
                    os.remove(p)
        else:
            self._truncate_after(resume_step)
        if not os.path.exists(self.csv):
            with open(self.csv, "w", newline="") as f:
                csv.writer(f).writerow(CSV_COLUMNS)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def _truncate_after(self, step: int) -> None:
        records = read_log(self.jsonl) if os.path.exists(self.jsonl) else []
        keep = [r for r in records if r.get("step", 0) <= step]
        with open(self.jsonl, "w") as f:
            for r in keep:
                f.write(json.dumps(r) + "\n")
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for r in keep:
                w.writerow([_fmt(r.get(c)) for c in CSV_COLUMNS])

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(record.get(c)) for c in CSV_COLUMNS])
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{split}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(v):
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v


def read_log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training log {path!r} does not exist")
    out = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{ln}: not a JSON record ({e})") from e
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) overflows nothing useful


# ----------------------------------------------------------------------------------------- throughput


def flops_per_token(config, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token, the PaLM paper's (appendix B) formula:

        6 * N  +  12 * n_layers * n_heads * head_dim * seq_len

    N counts the parameters that take part in matmuls: every parameter but the position / token-type
    embedding tables (the token embedding stays in: tied, it is the LM head's matmul). 6N is forward
    (2N) + backward (4N); the second term is attention's QK^T and PV, forward + backward, without
    discounting the causal mask (as the paper does).
    """
    c = config
    if c.is_encoder_decoder:
        # The trainer counts source and target tokens, and each goes through one stack (the target's
        # through the decoder, which attends twice: self and cross): with source and target about as
        # long, half of the decoder-only figure. Learned position tables are left out as above.
        tables = 2 * (c.max_position_embeddings + 2) * c.hidden_size if c.positions == "learned" else 0
        attn_layers = c.n_layers + 2 * c.n_decoder_layers
        return (6.0 * (n_params - tables) + 12.0 * attn_layers * c.n_heads * c.head_dim * seq_len) / 2
    tables = (c.max_position_embeddings * c.hidden_size if c.arch != "llama" else 0) + c.type_vocab_size * c.hidden_size
    n = n_params - tables
    return 6.0 * n + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


GPU_PEAK_FLOPS = {  # dense tensor-core peaks (bf16/fp16, tf32) from the vendor data sheets
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "A10": (125e12, 62.5e12),
    "RTX 4090": (165e12, 82.6e12),
}


def peak_flops(device: torch.device, precision: str) -> float:
    """The FLOP/s MFU divides by: the data-sheet peak of a known GPU, else a measured fp32/bf16 matmul
    rate on this machine (then MFU reads as the fraction of what a large matmul achieves here)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (low, fp32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return low if precision in ("bf16", "fp16") else fp32
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 1024
    g = torch.Generator().manual_seed(0)  # not the global RNG: probing must not change a run's dropout masks
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ classification


def classification_scores(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict:
    """accuracy and macro-F1 (the unweighted mean over classes of F1; a class with no true and no
    predicted examples is left out of the mean)."""
    preds, labels = preds.long().flatten(), labels.long().flatten()
    if preds.shape != labels.shape or preds.numel() == 0:
        raise ValueError(f"classification_scores: {preds.numel()} predictions for {labels.numel()} labels")
    f1s = []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": (preds == labels).float().mean().item(), "macro_f1": sum(f1s) / max(1, len(f1s))}


def classification_report(summary: dict) -> str:
    """A few lines for the end of a classification run: the model's eval scores beside the baselines'
    and its margin over bag-of-words logistic regression, in points (hundredths)."""
    ev = summary.get("eval") or {}
    if "accuracy" not in ev:
        return ""
    how = f", the weights of step {ev['step']} (best {ev['selected_by']})" if ev.get("selected_by") else ""
    lines = [f"eval: {ev.get('n_examples', '?')} examples{how}", f"  {'':<12}{'accuracy':>10}{'macro-F1':>10}"]
    rows = [("model", ev)] + list((summary.get("baselines") or {}).items())
    lines += [f"  {name:<12}{r['accuracy']:>10.3f}{r['macro_f1']:>10.3f}" for name, r in rows]
    m = summary.get("margin")
    if m:
        lines.append(
            f"  margin over {m['baseline']}: accuracy {100 * m['accuracy']:+.1f} points, "
            f"macro-F1 {100 * m['macro_f1']:+.1f} points"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- plot


def plot_log(log_path: str, out_path: str | None = None) -> str:
    """Train and eval loss against step (and the lr) from a log.jsonl; writes a PNG next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("split") == "eval" and r.get("loss") is not None]
    vals = [r for r in records if r.get("split") == "val" and r.get("loss") is not None]
    if not train and not evals and not vals:
        raise ValueError(f"{log_path}: no loss records to plot")
    out_path = out_path or os.path.splitext(log_path)[0] + "_loss.png"
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval", lw=1.5)
    if vals:
        ax.plot([r["step"] for r in vals], [r["loss"] for r in vals], "s--", label="val", lw=1.2)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or "training")
    lrs = [r for r in train if r.get("lr") is not None]
    if lrs:
        ax_lr.plot([r["step"] for r in lrs], [r["lr"] for r in lrs], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
