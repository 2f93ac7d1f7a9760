"""Read a llama.cpp GGUF file into HF-named torch tensors, a HF config dict and tokenizer metadata.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    ckpt.hf_config            # config.json-style dict: {"model_type": "llama", "hidden_size": 576, ...}
    ckpt.tensors              # {"model.embed_tokens.weight": (49152, 576) fp32, ...} in HF layout
    ckpt.tokenizer            # GGUFTokenizerInfo (tokens, merges, special ids, chat template) or None

Supported architectures: "llama" (Llama 2/3, SmolLM2, Mistral), "qwen2" (q/k/v biases) and "gpt2".
Tensors are dequantized one at a time (F32, F16, BF16, Q8_0, Q4_0, Q4_1, and whatever else
`gguf.quants.dequantize` implements), so memory stays near one copy of the weights beyond the mmap.

Reading a GGUF costs seconds in Python (gguf's reader parses every vocabulary entry; its numpy
dequantization makes several passes per block), so what read_gguf returns for a large file is cached on
disk: the metadata as JSON and the tensors per dtype as safetensors, keyed by the file's SHA-256 (see
"on-disk cache" below; PLM_ENGINE_GGUF_CACHE=0 turns it off). A warm read maps the safetensors file.
Layout differences from HF checkpoints undone here:
  - GGUF lists dims in ggml's ne order (fastest first); torch shapes are the reverse;
  - llama.cpp's converter permutes the rows of Llama q_proj/k_proj (weights and biases) so that HF's
    NeoX-style half rotation becomes ggml's interleaved-pairs rotation; `_unpermute_qk` inverts it.
  - GPT-2 is stored as nn.Linear (out, in); HF's GPT-2 uses Conv1D (in, out), so those are transposed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gpt2")
# ggml token types (llama.cpp's llama_token_type).
TOKEN_TYPE_NORMAL, TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL = 1, 2, 3
TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_UNUSED, TOKEN_TYPE_BYTE = 4, 5, 6

# Metadata arrays too big to keep as plain metadata (they live in GGUFTokenizerInfo instead).
_BIG_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


@dataclass
class GGUFTokenizerInfo:
    """What a GGUF says about its tokenizer (llama.cpp's `tokenizer.*` keys).

    model: tokenizer.ggml.model — "gpt2" (byte-level BPE) or "llama" (sentencepiece BPE), ...
    pre: tokenizer.ggml.pre — the pre-tokenizer (split regex) name, e.g. "smollm", "llama-bpe", "qwen2".
    tokens[i] / token_types[i] / scores[i]: the vocabulary entry of id i; merges: "a b" strings, best first.
    """

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool
    chat_template: str | None
    path: str = ""


@dataclass
class GGUFCheckpoint:
    """A GGUF file read into HF terms. `tensors` is empty when read with `with_tensors=False`."""

    path: Path
    architecture: str
    hf_config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: GGUFTokenizerInfo | None
    chat_template: str | None
    metadata: dict = field(default_factory=dict)


# Block types kept in their blocks when read with quantized=True (ops.linear_q multiplies them).
NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")


@dataclass
class QuantTensor:
    """A 2-D weight kept in GGUF blocks: data (rows, row_bytes) uint8 holds `shape` = (rows, K) values of
    ggml type `qtype` (an id of ops.contracts.linear.GGUF_TYPES), each row its own run of blocks."""

    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def to(self, device=None, dtype=None) -> QuantTensor:
        """On `device`; the blocks keep their type whatever `dtype` (the model's compute dtype) is."""
        return QuantTensor(self.data.to(device) if device is not None else self.data, self.qtype, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from plm_engine.ops.reference import dequantize_gguf_ref

        return dequantize_gguf_ref(self.data, self.qtype).to(dtype)


def read_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, with_tensors: bool = True, quantized: bool = False
) -> GGUFCheckpoint:
    """Read `path` (a .gguf file). Tensors are dequantized to `dtype` on CPU and renamed to HF names.

    Raises FileNotFoundError for a missing file and ValueError (naming the file, and the tensor when
    one is at fault) for a non-GGUF or truncated file, an unsupported architecture or quantization,
    and tensors that are missing, unexpected or of the wrong shape. Files of CACHE_MIN_BYTES or more go
    through the on-disk cache (cached tensors are copy-on-write maps of the cache file).

    quantized: 2-D weights of a NATIVE_TYPES block type stay in their blocks, as QuantTensor (GPT-2's
    transposed weights excepted); other quantized types are dequantized with a warning naming the
    tensor. The cache keeps the blocks as they are (one file per dtype for the plain tensors).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"read_gguf: dtype must be a floating torch.dtype, got {dtype!r}")
    path = Path(path)
    quantized = quantized and with_tensors
    entry = _CacheEntry.of(path)
    if entry is not None:
        ckpt = entry.load(path, dtype, with_tensors, quantized)
        if ckpt is not None:
            return ckpt
    ckpt = _read_gguf(path, dtype, with_tensors, quantized)
    if entry is not None:
        entry.store(ckpt, dtype, with_tensors, quantized)
    return ckpt


def _read_gguf(path: Path, dtype: torch.dtype, with_tensors: bool, quantized: bool = False) -> GGUFCheckpoint:
    reader = open_reader(path)
    meta = _scalar_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    tokenizer = _tokenizer_info(reader, meta, path)
    names = {t.name for t in reader.tensors}
    hf_config = _hf_config(arch, meta, names, reader, tokenizer, dtype, path)
    tensors = _load_tensors(reader, arch, hf_config, dtype, path, quantized) if with_tensors else {}
    return GGUFCheckpoint(
        path=path,
        architecture=arch,
        hf_config=hf_config,
        tensors=tensors,
        tokenizer=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=meta,
    )


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizerInfo:
    """Only the tokenizer metadata of a GGUF file (no tensors are read); ValueError if it has none."""
    path = Path(path)
    entry = _CacheEntry.of(path)
    if entry is not None:
        ckpt = entry.load(path, torch.float32, with_tensors=False)
        if ckpt is None:
            ckpt = _read_gguf(path, torch.float32, with_tensors=False)
            entry.store(ckpt, torch.float32, with_tensors=False)
        info = ckpt.tokenizer
    else:
        reader = open_reader(path)
        info = _tokenizer_info(reader, _scalar_metadata(reader), path)
    if info is None:
        raise ValueError(f"{path}: the GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokens)")
    return info


# ---- opening and metadata ---------------------------------------------------------------------------


def open_reader(path: Path):
    """A gguf.GGUFReader over `path`, with the file-level errors turned into clear ones."""
    from gguf import GGUFReader

    class _Reader(GGUFReader):
        # GGUFReader parses metadata through np.memmap slices; every slice of a memmap subclass runs
        # Python-level __array_finalize__, which makes a 100k-entry vocabulary take seconds. A plain
        # ndarray view of the same mapping (it keeps the mmap alive through .base) parses much faster.
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a file (expected a .gguf file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = _Reader(path)
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: truncated or corrupt GGUF file ({size} bytes): {e}") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ValueError(f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {end} > file size {size}")
    return reader


def _scalar_metadata(reader) -> dict:
    """Every metadata key except the big tokenizer arrays, as plain Python values."""
    meta = {}
    for key, fld in reader.fields.items():
        if key in _BIG_ARRAYS:
            continue
        try:
            meta[key] = fld.contents()
        except Exception as e:
            raise ValueError(f"GGUF metadata key {key!r} cannot be read: {e}") from e
    return meta


def _tokenizer_info(reader, meta: dict, path: Path) -> GGUFTokenizerInfo | None:
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in reader.fields:
        return None

    def array(key):
        fld = reader.fields.get(key)
        return fld.contents() if fld is not None else None

    def opt_int(key):
        value = meta.get(key)
        return None if value is None else int(value)

    tokens = array("tokenizer.ggml.tokens")
    token_types = array("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * len(tokens)
    return GGUFTokenizerInfo(
        model=model,
        pre=meta.get("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=[int(t) for t in token_types],
        merges=array("tokenizer.ggml.merges") or [],
        scores=array("tokenizer.ggml.scores"),
        bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
        unk_token_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
        # llama.cpp adds BOS for a sentencepiece vocabulary unless the file says otherwise.
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
        path=str(path),
    )


# ---- config -----------------------------------------------------------------------------------------


def _hf_config(arch, meta, names, reader, tokenizer, dtype, path) -> dict:
    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in meta:
            if required:
                raise ValueError(f"{path}: GGUF metadata key {full!r} is missing")
            return default
        return meta[full]

    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_size = get("vocab_size")
    if vocab_size is None:
        vocab_size = len(tokenizer.tokens) if tokenizer else (int(embd.shape[1]) if embd is not None else None)
    if vocab_size is None:
        raise ValueError(f"{path}: cannot tell the vocabulary size (no {arch}.vocab_size, tokens or token_embd)")
    hidden = int(get("embedding_length", required=True))
    n_layers = int(get("block_count", required=True))
    n_heads = int(get("attention.head_count", required=True))
    n_kv_heads = int(get("attention.head_count_kv", n_heads))
    if isinstance(get("attention.head_count_kv"), list):
        raise ValueError(f"{path}: per-layer attention.head_count_kv is not supported")
    tied = "output.weight" not in names
    special = {}
    if tokenizer is not None:
        special = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    dtype_name = str(dtype).removeprefix("torch.")

    if arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": int(vocab_size),
            "n_embd": hidden,
            "n_layer": n_layers,
            "n_head": n_heads,
            "n_positions": int(get("context_length", required=True)),
            "n_inner": int(get("feed_forward_length", 4 * hidden)),
            "layer_norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5)),
            "activation_function": "gelu_new",
            "tie_word_embeddings": tied,
            **special,
            "torch_dtype": dtype_name,
        }

    if hidden % n_heads:
        raise ValueError(f"{path}: embedding_length {hidden} is not a multiple of head_count {n_heads}")
    head_dim = int(
        get("attention.key_length", 0)
        or (get("rope.dimension_count", 0) if arch == "llama" else 0)
        or hidden // n_heads
    )
    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", required=True)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(arch, meta, reader, head_dim, path),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        **special,
        "torch_dtype": dtype_name,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    return config


def _rope_scaling(arch, meta, reader, head_dim, path) -> dict | None:
    """HF rope_scaling from `{arch}.rope.scaling.*` metadata, or Llama 3's rope_freqs tensor.

    llama.cpp's converter writes Llama 3.x's frequency-dependent scaling as a `rope_freqs.weight` tensor
    (one divisor per frequency) instead of metadata; the HF parameters are recovered by matching that
    tensor against the llama3 formula with Meta's published band (low 1, high 4, original 8192).
    """
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
        return None if freqs is None else _llama3_scaling_from_freqs(freqs, meta, arch, head_dim, path)
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length", 0)),
        }
    raise ValueError(f"{path}: unsupported rope scaling type {kind!r} in {arch}.rope.scaling.type")


def _llama3_scaling_from_freqs(tensor, meta, arch, head_dim, path) -> dict:
    from gguf import dequantize

    divisors = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if divisors.size != rot // 2:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' has {divisors.size} entries, expected {rot // 2}")
    factor, low, high = float(divisors.max()), 1.0, 4.0
    original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    # The llama3 rule as llama.cpp's converter applies it (and HF's _compute_llama3_parameters).
    expected = []
    for i in range(rot // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / rot)
        if wavelen < original / high:
            expected.append(1.0)
        elif wavelen > original / low:
            expected.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if not np.allclose(divisors, expected, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"{path}: tensor 'rope_freqs.weight' does not match Llama 3 rope scaling "
            f"(factor {factor}, low_freq_factor 1, high_freq_factor 4, original {original})"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


# ---- tensors ----------------------------------------------------------------------------------------

_LLAMA_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LLAMA_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GPT2_BLOCK = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight",
    "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight",
    "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight",
    "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight",
    "ffn_down.bias": "mlp.c_proj.bias",
}
_GPT2_TOP = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
# GPT-2's HF Conv1D weights are (in, out): these GGUF (out, in) matrices are transposed back.
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The HF state-dict name of GGUF tensor `gguf_name`, or None if the architecture has no such tensor."""
    top, block, prefix = (
        (_GPT2_TOP, _GPT2_BLOCK, "transformer.h") if arch == "gpt2" else (_LLAMA_TOP, _LLAMA_BLOCK, "model.layers")
    )
    if gguf_name in top:
        return top[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in block:
        return f"{prefix}.{m.group(1)}.{block[m.group(2)]}"
    return None


def expected_shapes(hf_config: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> torch shape for every tensor a checkpoint of this config may hold: our model's tensors
    under transformers' names (hf_checkpoint.param_map is the one place that knows them), from a copy on
    the meta device with the optional ones switched on: an untied lm_head, and the biases (GPT-2 has them
    all; a llama GGUF has q/k/v biases at most, Qwen2-style, never o_proj or MLP ones)."""
    from plm_engine.models.config import ModelConfig
    from plm_engine.models.hf_checkpoint import hf_state_dict
    from plm_engine.models.meta import meta_device
    from plm_engine.models.transformer import Transformer

    c = ModelConfig.from_hf(hf_config)
    gpt2 = c.arch == "gpt2"
    c = dataclasses.replace(c, qkv_bias=True, out_bias=gpt2, mlp_bias=gpt2, tie_word_embeddings=False)
    with meta_device():
        model = Transformer(c)
    return {name: tuple(t.shape) for name, t in hf_state_dict(model).items()}


def _required(hf_config: dict) -> set[str]:
    """The HF tensors a checkpoint must have (biases only where the architecture always has them)."""
    shapes = expected_shapes(hf_config)
    optional = {"lm_head.weight"} if hf_config["tie_word_embeddings"] else set()
    if hf_config["model_type"] == "llama" and not hf_config.get("attention_bias"):
        optional |= {k for k in shapes if k.endswith("_proj.bias")}
    return set(shapes) - optional


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's `permute` of q/k rows: (n_head, 2, hd/2) -> (n_head, hd/2, 2) was applied
    to each head's rows; reading them back as (n_head, hd/2, 2) and swapping gives HF's order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"q/k rows {rows} are not a multiple of 2 x {n_head} heads")
    # w: (n_head * head_dim, ...) -> (n_head, head_dim / 2, 2, ...) -> swap -> (n_head * head_dim, ...)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _dequantize(t, dtype: torch.dtype, path: Path) -> torch.Tensor:
    """One GGUF tensor as a torch tensor of `dtype` in torch (reversed-ne) shape, owning its memory."""
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType(int(t.tensor_type))
    shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
    # F32/F16/BF16 data are read-only views of the mmap: copy them so the tensors own their memory.
    if qtype == GGMLQuantizationType.F32:
        out = torch.from_numpy(np.array(t.data, copy=True).view(np.float32))
    elif qtype == GGMLQuantizationType.F16:
        out = torch.from_numpy(np.array(t.data, copy=True).view(np.float16))
    elif qtype == GGMLQuantizationType.BF16:
        out = torch.from_numpy(np.array(t.data, copy=True).view(np.int16)).view(torch.bfloat16)
    else:
        try:
            out = torch.from_numpy(dequantize(t.data, qtype))
        except NotImplementedError as e:
            raise ValueError(
                f"{path}: tensor {t.name!r} has quantization type {qtype.name}, which the "
                f"gguf package cannot dequantize ({e})"
            ) from e
    if out.numel() != math.prod(shape):
        raise ValueError(f"{path}: tensor {t.name!r} holds {out.numel()} values, expected {shape}")
    return out.reshape(shape).to(dtype)


def _native(t, shape: tuple[int, ...], path: Path) -> QuantTensor | None:
    """Tensor t kept in its blocks, or None to dequantize it (warning for a quantized type we do not run)."""
    from gguf import GGMLQuantizationType

    from plm_engine.ops.reference import GGUF_BLOCKS

    qtype = GGMLQuantizationType(int(t.tensor_type))
    if qtype.name in ("F32", "F16", "BF16"):
        return None
    if qtype.name not in NATIVE_TYPES or len(shape) != 2 or shape[1] % GGUF_BLOCKS[int(qtype)][0]:
        warnings.warn(
            f"{path}: tensor {t.name!r} ({qtype.name}, shape {shape}) is dequantized: plm_engine runs "
            f"{', '.join(NATIVE_TYPES)} blocks of 2-D weights natively",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    values, nbytes = GGUF_BLOCKS[int(qtype)]
    data = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(shape[0], shape[1] // values * nbytes))
    return QuantTensor(data, int(qtype), (shape[0], shape[1]))


def _load_tensors(
    reader, arch: str, hf_config: dict, dtype: torch.dtype, path: Path, quantized: bool = False
) -> dict[str, torch.Tensor | QuantTensor]:
    shapes = expected_shapes(hf_config)
    tensors: dict[str, torch.Tensor | QuantTensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":  # folded into hf_config["rope_scaling"]
            continue
        name = hf_name(arch, t.name)
        if name is None or name not in shapes:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for a {arch} model")
        gguf_shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
        block = t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name
        transposed = arch == "gpt2" and block in _GPT2_TRANSPOSED
        hf_shape = gguf_shape[::-1] if transposed else gguf_shape
        if hf_shape != shapes[name]:
            raise ValueError(
                f"{path}: tensor {t.name!r} ({name}) has shape {hf_shape}, expected {shapes[name]} from the metadata"
            )
        q = _native(t, gguf_shape, path) if quantized and not transposed else None
        w = q.data if q is not None else _dequantize(t, dtype, path)  # blocks: one uint8 row per weight row
        if arch == "llama" and block.startswith(("attn_q.", "attn_k.")):
            heads = (
                hf_config["num_attention_heads"] if block.startswith("attn_q.") else hf_config["num_key_value_heads"]
            )
            w = _unpermute_qk(w, heads)  # a permutation of whole rows: the same for blocks and values
        elif transposed:
            w = w.t().contiguous()
        tensors[name] = w if q is None else QuantTensor(w.contiguous(), q.qtype, q.shape)
    missing = sorted(_required(hf_config) - set(tensors))
    if missing:
        raise ValueError(
            f"{path}: GGUF file lacks tensor(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} missing)"
        )
    return tensors


# ---- on-disk cache ----------------------------------------------------------------------------------
# <root>/gguf/<sha256 of the file>/meta.json          architecture, HF config, metadata, tokenizer
# <root>/gguf/<sha256 of the file>/<dtype>.safetensors the HF-named tensors read_gguf returns
# <root>/gguf/by-stat/<key of path, size, mtime, inode> the file's SHA-256, so a warm read hashes nothing
# root: PLM_ENGINE_CACHE_DIR, else $XDG_CACHE_HOME/plm_engine, else ~/.cache/plm_engine. Every file is
# written to a temporary name and renamed into place, so concurrent readers never see a partial file
# (and a mapped cache file is never rewritten in place). An unreadable entry is rebuilt; a cache that
# cannot be written is skipped with a warning.

CACHE_VERSION = 2
CACHE_MIN_BYTES = 16 << 20  # smaller files read in well under a second: not worth the disk space


def cache_root() -> Path | None:
    """The cache directory, or None when PLM_ENGINE_GGUF_CACHE is "0" (off)."""
    if os.environ.get("PLM_ENGINE_GGUF_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("PLM_ENGINE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "plm_engine"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(dest: Path, write) -> None:
    """write(tmp_path) into dest's folder, then rename onto dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _warn(msg: str) -> None:
    print(f"plm_engine: {msg}", file=sys.stderr)


# Tensors the model concatenates into one parameter (loading.build_from_tensors: q/k/v into qkv,
# gate/up into up) are stored concatenated, and read back as row views of that one block: the model's
# parameter is then the mapped block itself, with no copy at load.
_FUSED_GROUPS = (
    ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
)


def _fuse(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """(tensors to store, {stored name: [[HF name, rows], ...]}) with each complete group concatenated."""
    out = {k: v.contiguous() for k, v in tensors.items()}
    fused = {}
    for name in list(out):
        m = re.fullmatch(r"(.*\.)([a-z_]+\.[a-z_]+)\.(weight|bias)", name)
        if m is None:
            continue
        prefix, module, kind = m.groups()
        for fused_module, parts in _FUSED_GROUPS:
            if module != parts[0]:
                continue
            names = [f"{prefix}{p}.{kind}" for p in parts]
            if all(n in out for n in names) and len({(out[n].dtype, out[n].shape[1:]) for n in names}) == 1:
                key = f"{prefix}{fused_module}.{kind}"
                fused[key] = [[n, out[n].shape[0]] for n in names]
                out[key] = torch.cat([out.pop(n) for n in names])
    return out, fused


def _unfuse(stored: dict[str, torch.Tensor], fused: dict[str, list]) -> dict[str, torch.Tensor]:
    out = dict(stored)
    for key, parts in fused.items():
        block, start = out.pop(key), 0
        for name, rows in parts:
            out[name] = block.narrow(0, start, rows)
            start += rows
        if start != block.shape[0]:
            raise ValueError(f"cached block {key} has {block.shape[0]} rows, its parts {start}")
    return out


class _CacheEntry:
    """One GGUF file's cache folder."""

    def __init__(self, folder: Path, digest: str):
        self.folder, self.digest = folder, digest

    @classmethod
    def of(cls, path: Path) -> _CacheEntry | None:
        """The entry of a GGUF file, or None (cache off, file small, missing or not a GGUF: read_gguf
        then reads it directly and reports any error)."""
        root = cache_root()
        if root is None:
            return None
        try:
            st = path.stat()
            if not path.is_file() or st.st_size < CACHE_MIN_BYTES:
                return None
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    return None
        except OSError:
            return None
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_dev}"
        stat_file = root / "gguf" / "by-stat" / hashlib.sha256(ident.encode()).hexdigest()
        digest = None
        try:
            digest = stat_file.read_text().strip()
        except OSError:
            pass
        if not digest or not re.fullmatch(r"[0-9a-f]{64}", digest):
            digest = file_sha256(path)
            try:
                _atomic_write(stat_file, lambda tmp: Path(tmp).write_text(digest))
            except OSError as e:
                _warn(f"GGUF cache disabled: cannot write {stat_file.parent} ({e})")
                return None
        return cls(root / "gguf" / digest, digest)

    def _tensor_file(self, dtype: torch.dtype, quantized: bool = False) -> Path:
        return self.folder / f"{str(dtype).removeprefix('torch.')}{'-blocks' if quantized else ''}.safetensors"

    def load(
        self, path: Path, dtype: torch.dtype, with_tensors: bool, quantized: bool = False
    ) -> GGUFCheckpoint | None:
        """What _read_gguf(path, dtype, with_tensors, quantized) returns, from the cache; None on a miss."""
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
            if meta.get("version") != CACHE_VERSION or meta.get("sha256") != self.digest:
                return None
            tensors = {}
            if with_tensors:
                from safetensors import safe_open

                tfile = self._tensor_file(dtype, quantized)
                if not tfile.exists():
                    return None
                with safe_open(str(tfile), framework="pt") as f:
                    info = f.metadata() or {}
                    # The version too: a tensor file of an older layout (q/k/v not yet stored as one
                    # block) would still load, but with a copy of every fused block at each load.
                    if info.get("sha256") != self.digest or info.get("version") != str(CACHE_VERSION):
                        return None
                    stored = {k: f.get_tensor(k) for k in f.keys()}
                tensors = _unfuse(stored, json.loads(info.get("fused", "{}")))
                for name, (qtype, rows, k) in json.loads(info.get("blocks", "{}")).items():
                    tensors[name] = QuantTensor(tensors[name], qtype, (rows, k))
            tok = meta["tokenizer"]
            return GGUFCheckpoint(
                path=path,
                architecture=meta["architecture"],
                hf_config={**meta["hf_config"], "torch_dtype": str(dtype).removeprefix("torch.")},
                tensors=tensors,
                tokenizer=None if tok is None else GGUFTokenizerInfo(**{**tok, "path": str(path)}),
                chat_template=meta["chat_template"],
                metadata=meta["metadata"],
            )
        except Exception:  # a missing, partial or foreign entry is a miss: it gets rebuilt
            return None

    def store(self, ckpt: GGUFCheckpoint, dtype: torch.dtype, with_tensors: bool, quantized: bool = False) -> None:
        """Writes the entry after a miss (whatever was there was absent, stale or damaged)."""
        try:
            meta = {
                "version": CACHE_VERSION,
                "sha256": self.digest,
                "architecture": ckpt.architecture,
                "hf_config": ckpt.hf_config,
                "chat_template": ckpt.chat_template,
                "metadata": ckpt.metadata,
                "tokenizer": None if ckpt.tokenizer is None else dataclasses.asdict(ckpt.tokenizer),
            }
            text = json.dumps(meta)
            _atomic_write(self.folder / "meta.json", lambda tmp: Path(tmp).write_text(text))
            if with_tensors:
                from safetensors.torch import save_file

                blocks = {k: [v.qtype, *v.shape] for k, v in ckpt.tensors.items() if isinstance(v, QuantTensor)}
                plain = {k: v.data if isinstance(v, QuantTensor) else v for k, v in ckpt.tensors.items()}
                tensors, fused = _fuse(plain)
                info = {
                    "version": str(CACHE_VERSION),
                    "sha256": self.digest,
                    "source": str(ckpt.path),
                    "fused": json.dumps(fused),
                    "blocks": json.dumps(blocks),
                }
                tfile = self._tensor_file(dtype, quantized)
                _atomic_write(tfile, lambda tmp: save_file(tensors, tmp, metadata=info))
        except (OSError, TypeError, ValueError) as e:  # disk full, read-only, metadata JSON cannot hold
            _warn(f"could not cache {ckpt.path} under {self.folder} ({e}); it will be read directly")
