"""`plm-engine` command line: generate | serve | train | plot-log | info | selfcheck | report-kernels.

Each job's module adds its own subcommand (add_parser) and imports its heavy dependencies only when run.
"""

from __future__ import annotations

import argparse
import json
import sys


def cmd_info(args) -> int:
    from plm_engine import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def cmd_selfcheck(args) -> int:
    import torch

    if not torch.cuda.is_available() and not args.no_triton:
        # Without a GPU the Triton kernels can still be checked, slowly, by Triton's interpreter.
        from plm_engine.ops.triton import interpreter

        interpreter.enable()
    from plm_engine import selfcheck

    rows = selfcheck.run()
    if args.no_triton:
        rows = [r for r in rows if r["backend"] != "triton"]
    print(json.dumps(rows, indent=2) if args.json else selfcheck.format_text(rows))
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_report_kernels(args) -> int:
    from plm_engine.ops import report

    return report.report_kernels(json_output=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plm-engine", description="Fused-kernel engine for transformer language models")
    sub = p.add_subparsers(dest="command", required=True)

    from plm_engine.generation import cli as generate_cli
    from plm_engine.server import cli as serve_cli
    from plm_engine.training import cli as train_cli

    generate_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    train_cli.add_parser(sub)  # train and plot-log

    s = sub.add_parser("info", help="versions and the backends usable on this machine")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("selfcheck", help="run every op on every usable backend against the reference")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--no-triton", action="store_true", help="skip the Triton kernels (interpreted without a GPU)")
    s.set_defaults(func=cmd_selfcheck)

    s = sub.add_parser(
        "report-kernels",
        help="registers, spills and shared memory of every shipped GPU kernel "
        "(compiled for sm_80 and sm_90, no GPU needed)",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_report_kernels)
    return p


def main(argv=None) -> int:
    from plm_engine.models.registry import ModelNotFoundError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelNotFoundError as e:  # a --model (or --init, --tokenizer) that names nothing we can get
        print(f"plm-engine {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
