"""Write a GGUF of a published Llama shape with random weights and the default model's tokenizer.

Only the 135M default model ships offline, so this is how bench_generate's memory case sees how resident
memory scales with the file: the same tokenizer, metadata and block types (Q4_1 layers, a Q8_0
embedding, F32 norms) as SmolLM2-135M-Instruct.Q4_1.gguf, at SmolLM2-360M's or 1.7B's sizes. The text
it generates is noise; the bytes each step reads are those of a real model of that shape.

    python benchmarks/synthetic_gguf.py --shape smollm2-360m --out /tmp/smollm2-360m-random.Q4_1.gguf
    python benchmarks/bench_generate.py --model /tmp/smollm2-360m-random.Q4_1.gguf --cases memory ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

from plm_engine.models.registry import resolve

# Hugging Face's published configurations (hidden, intermediate, layers, heads, KV heads).
SHAPES = {
    "smollm2-360m": dict(hidden=960, inter=2560, layers=32, heads=15, kv_heads=5),
    "smollm2-1.7b": dict(hidden=2048, inter=8192, layers=24, heads=32, kv_heads=32),
}
# The metadata that follows from the shape; every other key (the tokenizer above all) is copied.
SHAPE_KEYS = {
    "llama.embedding_length": "hidden",
    "llama.feed_forward_length": "inter",
    "llama.block_count": "layers",
    "llama.attention.head_count": "heads",
    "llama.attention.head_count_kv": "kv_heads",
}
Q = gguf.GGMLQuantizationType


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row bytes) of valid Q4_1 / Q8_0 blocks: random quants, fp16 scales the size of a trained
    model's (|w| up to ~0.03), so activations stay finite through every layer."""
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // values, nbytes), dtype=np.uint8)
    if qtype == Q.Q4_1:  # d, m, 16 bytes of nibbles: w = d * q + m, q in 0..15
        d = np.full(len(raw), 0.004, np.float16)
        raw[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
        raw[:, 2:4] = (-8 * d).view(np.uint8).reshape(-1, 2)
    elif qtype == Q.Q8_0:  # d, 32 int8: w = d * q
        raw[:, 0:2] = np.full(len(raw), 0.0002, np.float16).view(np.uint8).reshape(-1, 2)
    else:
        raise ValueError(f"random_blocks: Q4_1 or Q8_0, got {qtype.name}")
    return raw.reshape(rows, -1)


def write(shape: str, out: Path, seed: int = 0) -> None:
    s = SHAPES[shape]
    src = gguf.GGUFReader(resolve("smollm2-135m").path)
    w = gguf.GGUFWriter(str(out), "llama")
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue  # the writer's own header fields
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = s[SHAPE_KEYS[name]] if name in SHAPE_KEYS else field.contents()
        if name in ("general.name", "general.size_label"):
            value = f"{shape} (random weights)"
        w.add_key_value(name, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    d, head = s["hidden"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head
    vocab = int(src.fields["llama.vocab_size"].contents())
    # (rows, row bytes) uint8 with a block raw_dtype: gguf derives the (out, in) shape from the bytes.
    w.add_tensor("token_embd.weight", random_blocks(Q.Q8_0, vocab, d, rng), raw_dtype=Q.Q8_0)
    for i in range(s["layers"]):
        for name, (rows, cols) in {
            "attn_q": (d, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, d),
            "ffn_gate": (s["inter"], d),
            "ffn_up": (s["inter"], d),
            "ffn_down": (d, s["inter"]),
        }.items():
            blocks = random_blocks(Q.Q4_1, rows, cols, rng)
            w.add_tensor(f"blk.{i}.{name}.weight", blocks, raw_dtype=Q.Q4_1)
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(d, np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-360m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write(args.shape, args.out, args.seed)
    print(f"{args.out}: {args.out.stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
