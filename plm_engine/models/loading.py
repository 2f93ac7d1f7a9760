"""Checkpoints in and out: HF folders (safetensors, sharded or not; pytorch_model.bin with weights_only),
GGUF files, and the named default models; save_pretrained writes what transformers loads back.

The model is built on the meta device and its parameters are assigned the loaded tensors, so memory
stays near one copy of the weights. Our parameter names differ from HF's where we fuse projections
(q/k/v into attn.qkv, gate/up into mlp.up) or where GPT-2 stores Conv1D (transposed) weights; the map
below is the one place that knows both naming schemes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from plm_engine.models.config import ModelConfig
from plm_engine.models.transformer import Transformer

# Buffers and heads HF checkpoints carry that this model does not use.
_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias", "position_ids", "rotary_emb.inv_freq")
_PREFIXES = ("model.", "transformer.", "bert.")


def _param_map(c: ModelConfig) -> list[tuple[str, list[str], str]]:
    """(our name, HF names without the model prefix, how to combine: "copy" | "T" | "cat") per tensor."""
    m: list[tuple[str, list[str], str]] = []
    add = lambda ours, hf, mode="copy": m.append((ours, hf if isinstance(hf, list) else [hf], mode))
    wb = ("weight", "bias")
    if c.arch == "llama":
        add("tok_embed.weight", "embed_tokens.weight")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"layers.{i}."
            add(p + "attn_norm.weight", h + "input_layernorm.weight")
            add(p + "mlp_norm.weight", h + "post_attention_layernorm.weight")
            for s in wb[: 1 + c.qkv_bias]:
                add(p + f"attn.qkv.{s}", [h + f"self_attn.{x}_proj.{s}" for x in "qkv"], "cat")
            for s in wb[: 1 + c.out_bias]:
                add(p + f"attn.out.{s}", h + f"self_attn.o_proj.{s}")
            for s in wb[: 1 + c.mlp_bias]:
                add(p + f"mlp.up.{s}", [h + f"mlp.gate_proj.{s}", h + f"mlp.up_proj.{s}"], "cat")
                add(p + f"mlp.down.{s}", h + f"mlp.down_proj.{s}")
        add("final_norm.weight", "norm.weight")
        if not c.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight")
        if c.num_labels:
            add("classifier.weight", "score.weight")
    elif c.arch == "gpt2":
        add("tok_embed.weight", "wte.weight")
        add("pos_embed.weight", "wpe.weight")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"h.{i}."
            for s in wb:  # Conv1D stores (in, out): transpose the weights
                mode = "T" if s == "weight" else "copy"
                add(p + f"attn_norm.{s}", h + f"ln_1.{s}")
                add(p + f"mlp_norm.{s}", h + f"ln_2.{s}")
                add(p + f"attn.qkv.{s}", h + f"attn.c_attn.{s}", mode)
                add(p + f"attn.out.{s}", h + f"attn.c_proj.{s}", mode)
                add(p + f"mlp.up.{s}", h + f"mlp.c_fc.{s}", mode)
                add(p + f"mlp.down.{s}", h + f"mlp.c_proj.{s}", mode)
        for s in wb:
            add(f"final_norm.{s}", f"ln_f.{s}")
        if not c.tie_word_embeddings:
            add("lm_head.weight", "lm_head.weight")
        if c.num_labels:
            add("classifier.weight", "score.weight")
    else:  # bert
        e = "embeddings."
        add("tok_embed.weight", e + "word_embeddings.weight")
        add("pos_embed.weight", e + "position_embeddings.weight")
        if c.type_vocab_size:
            add("type_embed.weight", e + "token_type_embeddings.weight")
        for s in wb:
            add(f"embed_norm.{s}", e + f"LayerNorm.{s}")
        for i in range(c.n_layers):
            p, h = f"layers.{i}.", f"encoder.layer.{i}."
            for s in wb:
                add(p + f"attn.qkv.{s}", [h + f"attention.self.{x}.{s}" for x in ("query", "key", "value")], "cat")
                add(p + f"attn.out.{s}", h + f"attention.output.dense.{s}")
                add(p + f"attn_norm.{s}", h + f"attention.output.LayerNorm.{s}")
                add(p + f"mlp.up.{s}", h + f"intermediate.dense.{s}")
                add(p + f"mlp.down.{s}", h + f"output.dense.{s}")
                add(p + f"mlp_norm.{s}", h + f"output.LayerNorm.{s}")
        if c.pooler:
            for s in wb:
                add(f"pooler.{s}", f"pooler.dense.{s}")
        if c.mlm_head:
            t = "cls.predictions."
            for s in wb:
                add(f"mlm_dense.{s}", t + f"transform.dense.{s}")
                add(f"mlm_norm.{s}", t + f"transform.LayerNorm.{s}")
            add("mlm_bias", t + "bias")
            if not c.tie_word_embeddings:
                add("lm_head.weight", t + "decoder.weight")
        if c.num_labels:
            for s in wb:
                add(f"classifier.{s}", f"classifier.{s}")
    return m


def _hf_prefix(c: ModelConfig) -> str:
    """The prefix transformers' model class for this config puts on the trunk's tensor names."""
    arch = c.hf_architecture()
    if c.arch == "bert":
        return "" if arch == "BertModel" else "bert."
    return "transformer." if c.arch == "gpt2" else "model."


def _strip(name: str) -> str:
    """An HF tensor name without the model-class prefix (old BERT checkpoints say gamma/beta)."""
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    if "LayerNorm" in name:
        name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
    return name


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts, 0), without a copy when the parts are consecutive row blocks of one tensor (as a
    cached GGUF returns q/k/v and gate/up: models/gguf.py)."""
    first = parts[0]
    adjacent = all(
        p.is_contiguous()
        and p.dtype == first.dtype
        and p.device == first.device
        and p.shape[1:] == first.shape[1:]
        and p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for p in parts
    ) and all(b.data_ptr() == a.data_ptr() + a.nbytes for a, b in zip(parts, parts[1:]))
    if not adjacent:
        return torch.cat(parts, 0)
    return first.as_strided((sum(p.shape[0] for p in parts), *first.shape[1:]), first.stride())


def build_from_tensors(config: ModelConfig, tensors, dtype: torch.dtype, device, source: str) -> Transformer:
    """A Transformer whose parameters are the HF-named tensors (a mapping name -> tensor, read lazily),
    built on the meta device and assigned in place. source names the file(s) in errors."""
    names = {_strip(k): k for k in tensors.keys()}
    if config.arch == "bert":  # BertModel has a pooler and no MLM head, BertForMaskedLM the reverse
        config = config.replace(
            pooler="pooler.dense.weight" in names, mlm_head="cls.predictions.transform.dense.weight" in names
        )
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for ours, hf_names, mode in _param_map(config):
        missing = [n for n in hf_names if n not in names]
        if missing:
            raise ValueError(
                f"{source}: checkpoint has no tensor {missing[0]!r} (needed for {ours}) for a "
                f"{config.hf_architecture()} with {config.n_layers} layers"
            )
        parts = [tensors[names[n]] for n in hf_names]
        t = parts[0].t() if mode == "T" else _cat_rows(parts) if mode == "cat" else parts[0]
        if tuple(t.shape) != shapes[ours]:
            raise ValueError(
                f"{source}: tensor {', '.join(names[n] for n in hf_names)} has shape "
                f"{tuple(parts[0].shape)}, which does not fit the config (expected {ours} "
                f"{shapes[ours]})"
            )
        state[ours] = t.to(device=device, dtype=dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _SafetensorsFolder:
    """HF-named tensors of a folder's *.safetensors shards, opened lazily (mmap) by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        self._handles, self._where = {}, {}
        for f in files:
            path = folder / f
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in model.safetensors.index.json is missing")
            try:
                h = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for truncated/corrupt files
                raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
            self._handles[f] = h
            for k in h.keys():
                self._where[k] = f
        self.files = files

    def keys(self):
        return self._where.keys()

    def __getitem__(self, name):
        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{f}: tensor {name!r} could not be read ({e})") from e


def _default_dtype(config: ModelConfig, device) -> torch.dtype:
    """The checkpoint's 16-bit dtype on a GPU; float32 on CPU (fp16 matmuls are slow there)."""
    if torch.device(device or "cpu").type == "cuda" and config.torch_dtype in ("bfloat16", "float16"):
        return getattr(torch, config.torch_dtype)
    return torch.float32


def load_hf_folder(folder, dtype=None, device=None) -> Transformer:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a HF model folder)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    config = ModelConfig.from_hf(hf)
    dtype = dtype or _default_dtype(config, device)
    if any(folder.glob("*.safetensors")):
        tensors = _SafetensorsFolder(folder)
        source = f"{folder}/{tensors.files[0] if len(tensors.files) == 1 else '*.safetensors'}"
    elif (folder / "pytorch_model.bin").exists():
        source = str(folder / "pytorch_model.bin")
        try:  # never unpickle arbitrary objects
            tensors = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ValueError(f"{source}: could not be read as a weights-only checkpoint ({e})") from e
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, *.safetensors shards or pytorch_model.bin")
    return build_from_tensors(config, tensors, dtype, device, source)


def load_gguf(path, dtype=None, device=None) -> Transformer:
    from plm_engine.models.gguf import read_gguf

    dtype = dtype or torch.float32
    ckpt = read_gguf(path, dtype=dtype)
    config = ModelConfig.from_hf(ckpt.hf_config)
    return build_from_tensors(config, ckpt.tensors, dtype, device, str(path))


def load_model(name_or_path, dtype=None, device=None) -> Transformer:
    """A model from a named default ("smollm2-135m", "minilm-l6"), a HF folder or a .gguf file, in eval mode.

    dtype: None -> float32 on CPU, the checkpoint's 16-bit dtype on CUDA. load_model.last_load_seconds
    records how long the last load took.
    """
    from plm_engine.models.registry import resolve

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    found = resolve(name_or_path)
    model = load_gguf(found.path, dtype, device) if found.kind == "gguf" else load_hf_folder(found.path, dtype, device)
    load_model.last_load_seconds = time.perf_counter() - t0
    return model


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under transformers' names (q/k/v and gate/up split, GPT-2 Conv1D transposed)."""
    c = model.config
    ours = model.state_dict()
    prefix = _hf_prefix(c)
    out = {}
    for name, hf_names, mode in _param_map(c):
        t = ours[name]
        if mode == "T":
            parts = [t.t()]
        elif mode == "cat":
            if name.startswith("layers.") and ".attn.qkv." in name:
                sizes = [c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim]
            else:
                sizes = [t.shape[0] // len(hf_names)] * len(hf_names)
            parts = list(t.split(sizes, 0))
        else:
            parts = [t]
        for n, p in zip(hf_names, parts, strict=True):
            top = n.startswith(("lm_head.", "score.", "cls.", "classifier."))
            out[("" if top else prefix) + n] = p.detach().contiguous()
    return out


def save_pretrained(model: Transformer, path) -> Path:
    """Writes config.json + model.safetensors under HF names (loadable by transformers and load_model).
    Each file is written to a temporary name and renamed, so a crash never leaves a partial file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf = c.to_hf()
    hf["torch_dtype"] = str(model.tok_embed.weight.dtype).removeprefix("torch.")
    tensors = {k: v.cpu() for k, v in hf_state_dict(model).items()}
    for name, write in (
        ("model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"})),
        ("config.json", lambda p: Path(p).write_text(json.dumps(hf, indent=2) + "\n")),
    ):
        tmp = path / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, path / name)
    return path
