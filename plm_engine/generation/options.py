"""The model options every engine front end shares (`plm-engine generate`, `plm-engine serve`), so the
two commands accept the same model names and dtypes and say so the same way."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_MODEL = "smollm2-135m"
DTYPES = ("float32", "bfloat16", "float16")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --dtype, --dequantize and --quantize, as Engine(model, dtype=..., dequantize=...,
    quantize=...) takes them."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="a HF folder, a .gguf file, a packaged name or a Hugging Face Hub id (org/name) (default: %(default)s)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weight dtype (default: the loader's)")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="a GGUF's quantized weights as plain --dtype tensors (default: run its Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks natively)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="store every linear weight in blocks at load: int8 = Q8_0 (symmetric), int4 = Q4_1 (zero point), groups of 32",
    )


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """What add_model_options parsed, as Engine's keyword arguments: one place that pairs the flags with
    Engine's parameters, so that a new model option reaches every front end."""
    return dict(model=args.model, dtype=args.dtype, dequantize=args.dequantize, quantize=args.quantize)
