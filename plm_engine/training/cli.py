"""`plm-engine train CONFIG [--field value ...]` and `plm-engine plot-log LOG`.

plm_engine/cli.py adds these with add_parser(subparsers) and dispatches to run(args). Every TrainConfig
field is also a flag (`--max-steps 200`, `--data a.txt,b.txt`, `--model-overrides '{"n_layers": 4}'`),
overriding the config file. Multi-process: `torchrun --nproc_per_node N -m plm_engine.training.cli train ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from plm_engine.training.config import TrainConfig, parse_override, read_config_file


def add_parser(subparsers) -> None:
    s = subparsers.add_parser(
        "train",
        help="pretrain (clm, mlm, seq2seq) or fine-tune (classify) a model from a config file",
        description="Train from a TOML/YAML config; --<field> flags override its keys.",
    )
    s.add_argument("config", nargs="?", help="a .toml / .yaml / .json TrainConfig (optional when flags say it all)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "resume":
            s.add_argument(
                flag,
                nargs="?",
                const="latest",
                default=None,
                dest="o_resume",
                help="continue from the latest checkpoint in out_dir, or from the folder given",
            )
            continue
        s.add_argument(flag, default=None, dest=f"o_{f.name}", metavar=f.name.upper(), help=argparse.SUPPRESS)
    s.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    s.set_defaults(func=run)

    p = subparsers.add_parser("plot-log", help="plot the loss curves of a training log (log.jsonl)")
    p.add_argument("log", help="a log.jsonl written by `plm-engine train` (or its run folder)")
    p.add_argument("--out", default=None, help="output PNG (default: next to the log)")
    p.set_defaults(func=run_plot)


def resolve_config(args) -> TrainConfig:
    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("o_") and value is not None:
            name = key[2:]
            overrides[name] = value if name == "resume" else parse_override(name, value)
    base = read_config_file(args.config) if args.config else {}
    base = dict(base.get("train", base)) if isinstance(base.get("train"), dict) else base
    return TrainConfig.from_dict({**base, **overrides})


def run(args) -> int:
    from plm_engine.training.trainer import Trainer

    cfg = resolve_config(args)
    if getattr(args, "print_config", False):
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        from plm_engine.training.metrics import classification_report

        for i, r in enumerate(summary.get("reconstructions") or []):  # seq2seq: what the model writes back
            print(f"--- reconstruction {i + 1} (eval)", file=sys.stderr)
            for key in ("noised", "reconstruction", "original"):
                print(f"{key:>14}: {r[key]!r}", file=sys.stderr)
        print(json.dumps(summary, indent=2))
        report = classification_report(summary)
        if report:
            print(report)
    if summary.get("interrupted"):
        return 128 + int(summary["interrupted"])  # the shell's convention for death by a signal
    return 0


def run_plot(args) -> int:
    import os

    from plm_engine.training.metrics import plot_log

    log = os.path.join(args.log, "log.jsonl") if os.path.isdir(args.log) else args.log
    print(plot_log(log, args.out))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="plm-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
