"""Bar charts of a benchmark CSV: GB/s (or speedup over torch) per provider for every case.

    python benchmarks/plot.py benchmarks/results/norms.csv [-o norms.png] [--metric speedup] [--all-runs]

By default only the latest run (newest timestamp) of each device is drawn, one figure per device: a
panel per (op, variant, mode), the cases (dtype, shape) along x, one bar per provider. Runs made under
special settings (the CSV's `env` column, e.g. PLM_ENGINE_CPU_ISA=avx2) are skipped unless --env names
them, or unless a device has no other runs. Needs matplotlib (in the `dev` extra).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METRICS = {"gbps": "GB/s (bytes read + written once)", "speedup": "speedup vs torch (same run)", "ms": "ms"}
METRIC_COLUMN = {"gbps": "gbps", "speedup": "speedup_vs_torch", "ms": "ms"}
PROVIDER_ORDER = ["torch", "cpu", "triton", "cuda"]


def latest_runs(rows: list[dict]) -> list[dict]:
    """The rows of the newest run of each device (a run's rows share their timestamp)."""
    newest = {}
    for r in rows:
        newest[r["device_name"]] = max(newest.get(r["device_name"], ""), r["timestamp"])
    return [r for r in rows if r["timestamp"] == newest[r["device_name"]]]


def panel_key(r: dict) -> tuple:
    return tuple(r.get(k, "") for k in ("op", "variant", "mode"))


def case_label(r: dict) -> str:
    return f"{r.get('dtype', '')}\n{r.get('shape', '')}"


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower()[:60]


def plot_device(rows: list[dict], metric: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = METRIC_COLUMN[metric]
    panels = sorted({panel_key(r) for r in rows})
    providers = sorted(
        {r["provider"] for r in rows}, key=lambda p: (PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else 99, p)
    )
    ncols = min(4, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    most_cases = max(len({case_label(r) for r in rows if panel_key(r) == k}) for k in panels)
    panel_w = max(4.5, 0.85 * most_cases)  # room for each case's two-line label
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols, 3.6 * nrows), squeeze=False)
    width = 0.8 / max(1, len(providers))
    for ax, key in zip(axes.flat, panels):
        sel = [r for r in rows if panel_key(r) == key]
        cases = list(dict.fromkeys(case_label(r) for r in sel))
        values = defaultdict(dict)
        for r in sel:
            if r.get(col) not in ("", None):
                values[r["provider"]][case_label(r)] = float(r[col])
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(cases))]
            ax.bar(xs, [values[p].get(c, 0.0) for c in cases], width, label=p)
        ax.set_xticks(range(len(cases)), cases, fontsize=7)
        ax.set_title(" / ".join(k for k in key if k), fontsize=9)
        ax.set_ylabel(METRICS[metric], fontsize=8)
        if metric == "speedup":
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{first['device_name']} - commit {first.get('commit', '?')} - {first['timestamp']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="a benchmarks/results/*.csv file")
    p.add_argument(
        "-o",
        "--out",
        help="output .png (default: next to the CSV); one file per device, suffixed "
        "with the device when the CSV holds several",
    )
    p.add_argument("--metric", choices=sorted(METRICS), default="gbps")
    p.add_argument("--all-runs", action="store_true", help="draw every run, not only each device's latest")
    p.add_argument("--device", help="only devices whose name contains this (case-insensitive)")
    p.add_argument(
        "--env",
        default=None,
        help="only runs whose env column contains this ('' : default settings; "
        "default: default settings where a device has such runs)",
    )
    a = p.parse_args(argv)
    rows = common.read_csv(a.csv)
    if a.device:
        rows = [r for r in rows if a.device.lower() in r["device_name"].lower()]
    if a.env is not None:
        rows = [r for r in rows if (a.env in r.get("env", "") if a.env else not r.get("env"))]
    else:
        plain = {r["device_name"] for r in rows if not r.get("env")}
        rows = [r for r in rows if not r.get("env") or r["device_name"] not in plain]
    if a.all_runs:
        for r in rows:  # one bar per provider and run
            r["provider"] = f"{r['provider']} {r['timestamp'][5:16]}"
    else:
        rows = latest_runs(rows)
    if not rows:
        print(f"no rows to plot in {a.csv}", file=sys.stderr)
        return 1
    by_device = defaultdict(list)
    for r in rows:
        by_device[r["device_name"]].append(r)
    base = Path(a.out) if a.out else Path(a.csv).with_suffix(".png")
    for name, dev_rows in by_device.items():
        out = base if len(by_device) == 1 else base.with_name(f"{base.stem}-{slug(name)}{base.suffix}")
        plot_device(dev_rows, a.metric, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
