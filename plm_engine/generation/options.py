"""The model options every engine front end shares (`plm-engine generate`, `plm-engine serve`), so the
two commands accept the same model names and dtypes and say so the same way."""

from __future__ import annotations

import argparse

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, as Engine(model, dtype=...) takes them (a dtype name or None)."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a HF folder, a .gguf file, a packaged name or a Hugging Face Hub id (org/name) (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the loader's)")
