"""Checkpoints in: HF folders (safetensors, sharded or not; pytorch_model.bin with weights_only), GGUF
files, and the named default models. (Out: models/hf_checkpoint.py's save_pretrained.)

The model is built on the meta device and its parameters are assigned the loaded tensors, so memory
stays near one copy of the weights; models/hf_checkpoint.py maps HF's tensor names to ours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from plm_engine.layers.linear import QuantEmbedding, QuantLinear
from plm_engine.models import seq2seq_hf
from plm_engine.models.config import ModelConfig
from plm_engine.models.gguf import QuantTensor
from plm_engine.models.hf_checkpoint import BLOCKS_QUANT_METHOD, param_map, strip_prefix
from plm_engine.models.memory import release_freed_memory
from plm_engine.models.meta import meta_device
from plm_engine.models.seq2seq import Seq2SeqTransformer
from plm_engine.models.transformer import Transformer


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


# load_model(..., quantize=): the GGUF block type each scheme stores the linear weights in.
QUANTIZE_SCHEMES = {
    "int8": "Q8_0",  # symmetric int8, one fp16 scale per group of 32 weights of a row
    "int4": "Q4_1",  # int4 with a zero point: an fp16 scale and an fp16 minimum per group of 32
}


def build_from_tensors(
    config: ModelConfig, tensors, dtype: torch.dtype, device, source: str, quantize: str | None = None
) -> nn.Module:
    """The model whose parameters are the HF-named tensors (a mapping name -> tensor, read lazily): a
    Transformer, or a Seq2SeqTransformer for encoder-decoder configs. Built on the meta device and
    assigned in place; source names the file(s) in errors."""
    if config.is_encoder_decoder:
        names = {seq2seq_hf.strip_prefix(k): k for k in tensors.keys()}
        config = seq2seq_hf.tie_from_tensors(config, tensors, names)
        model_class, mapping = Seq2SeqTransformer, seq2seq_hf.param_map(config)
        layers = f"{config.n_layers} + {config.n_decoder_layers} layers"
    else:
        names = {strip_prefix(k): k for k in tensors.keys()}
        if config.arch == "bert":  # BertModel has a pooler and no MLM head, BertForMaskedLM the reverse
            config = config.replace(
                pooler="pooler.dense.weight" in names, mlm_head="cls.predictions.transform.dense.weight" in names
            )
        model_class, mapping = Transformer, param_map(config)
        layers = f"{config.n_layers} layers"
    with meta_device():
        model = model_class(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for ours, hf_names, mode in mapping:
        if mode == "first":  # one of several names (a shared embedding saved under either)
            hf_names = [next((n for n in hf_names if n in names), hf_names[0])]
        missing = [n for n in hf_names if n not in names]
        if missing and ours == "final_logits_bias":  # transformers treats a missing one as zeros
            state[ours] = torch.zeros(shapes[ours], dtype=dtype, device=device)
            continue
        if missing:
            raise ValueError(
                f"{source}: checkpoint has no tensor {missing[0]!r} (needed for {ours}) for a "
                f"{config.hf_architecture()} with {layers}"
            )
        parts = [tensors[names[n]] for n in hf_names]
        if any(isinstance(p, QuantTensor) for p in parts) and (
            mode in ("T", "row") or not all(isinstance(p, QuantTensor) and p.qtype == parts[0].qtype for p in parts)
        ):  # a layout the blocks cannot take (transposed, flattened, mixed types): plain values
            parts = [p.dequantize(dtype) if isinstance(p, QuantTensor) else p for p in parts]
        if mode == "T":
            t = parts[0].t()
        elif mode == "cat":
            t = _cat_blocks(parts) if isinstance(parts[0], QuantTensor) else _cat_rows(parts)
        else:
            t = parts[0].reshape(-1) if mode == "row" else parts[0]
        if tuple(t.shape) != shapes[ours]:
            raise ValueError(
                f"{source}: tensor {', '.join(names[n] for n in hf_names)} has shape "
                f"{tuple(parts[0].shape)}, which does not fit the config (expected {ours} "
                f"{shapes[ours]})"
            )
        state[ours] = (
            t.to(device=device, dtype=dtype)
            if isinstance(t, QuantTensor)
            else t.to(device=device, dtype=dtype).contiguous()
        )
    if quantize is not None:
        _quantize_linears(model, state, quantize)
    _keep_blocks(model, state, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _quantize_linears(model: nn.Module, state: dict, scheme: str) -> None:
    """Every nn.Linear weight of `state` (rows a multiple of 32 long) into the scheme's GGUF blocks,
    quantized by gguf's own quantizer (llama.cpp's reference rounding); embeddings and norms stay."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[QUANTIZE_SCHEMES[scheme]]
    for key, t in list(state.items()):
        path, _, leaf = key.rpartition(".")
        if leaf != "weight" or isinstance(t, QuantTensor) or t.dim() != 2 or t.shape[1] % 32:
            continue
        if not isinstance(model.get_submodule(path), nn.Linear):
            continue
        raw = quants.quantize(t.detach().float().cpu().numpy(), qtype)
        state[key] = QuantTensor(torch.from_numpy(raw).to(t.device), int(qtype), (t.shape[0], t.shape[1]))


def _cat_blocks(parts: list[QuantTensor]) -> QuantTensor:
    """The parts' rows stacked (q/k/v, gate/up: one type and K), without a copy where _cat_rows can."""
    data = _cat_rows([p.data for p in parts])
    return QuantTensor(data, parts[0].qtype, (data.shape[0], parts[0].shape[1]))


def _keep_blocks(model: nn.Module, state: dict, dtype: torch.dtype) -> None:
    """Swaps the Linear / Embedding of every QuantTensor in `state` for its quantized twin
    (layers/linear.py) and puts the blocks under the twin's qweight; other modules get the values."""
    for key in [k for k, v in state.items() if isinstance(v, QuantTensor)]:
        q = state.pop(key)
        path, _, leaf = key.rpartition(".")
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, child, None)
        with meta_device():
            if leaf == "weight" and isinstance(old, nn.Embedding):
                new: nn.Module = QuantEmbedding(q.shape[0], q.shape[1], q.qtype, dtype, q.data.device)
            elif leaf == "weight" and isinstance(old, nn.Linear):
                new = QuantLinear(q.shape[1], q.shape[0], q.qtype, old.bias is not None, dtype, q.data.device)
            else:
                state[key] = q.dequantize(dtype)
                continue
        setattr(parent, child, new)
        state[f"{path}.qweight"] = q.data


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


class _BlocksFolder:
    """A folder's tensors where the weights config.json lists in GGUF blocks (save_pretrained of a model
    that kept blocks) come as QuantTensor, or dequantized with dequantize=True."""

    def __init__(self, tensors, blocks: dict, dtype: torch.dtype, dequantize: bool, source: str):
        from plm_engine.ops.contracts.linear import GGUF_TYPES

        unknown = {n: t for n, t in blocks.items() if t not in GGUF_TYPES}
        if unknown:
            name, kind = next(iter(unknown.items()))
            raise ValueError(f"{source}: {name} is listed in blocks of {kind!r}, not one of {', '.join(GGUF_TYPES)}")
        self._tensors, self._dtype, self._dequantize, self._source = tensors, dtype, dequantize, source
        self._blocks = {n: GGUF_TYPES[t] for n, t in blocks.items()}

    def keys(self):
        return self._tensors.keys()

    def __getitem__(self, name):
        from plm_engine.ops.reference import GGUF_BLOCKS

        t = self._tensors[name]
        qtype = self._blocks.get(name)
        if qtype is None:
            return t
        values, nbytes = GGUF_BLOCKS[qtype]
        if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] % nbytes:
            raise ValueError(
                f"{self._source}: {name} should hold rows of {nbytes}-byte blocks (uint8), got {t.dtype} {tuple(t.shape)}"
            )
        q = QuantTensor(t, qtype, (t.shape[0], t.shape[1] // nbytes * values))
        return q.dequantize(self._dtype) if self._dequantize else q


def load_hf_folder(
    folder, dtype=None, device=None, quantize: str | None = None, dequantize: bool = False
) -> Transformer:
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
    qc = hf.get("quantization_config") or {}
    if qc.get("quant_method") == BLOCKS_QUANT_METHOD:
        tensors = _BlocksFolder(tensors, qc.get("blocks", {}), dtype, dequantize or quantize is not None, source)
    return build_from_tensors(config, tensors, dtype, device, source, quantize)


def load_gguf(path, dtype=None, device=None, dequantize: bool = True, quantize: str | None = None) -> Transformer:
    """dequantize=False keeps the quantized weights in their blocks (models.gguf.NATIVE_TYPES); quantize
    re-quantizes the dequantized weights (load_model)."""
    from plm_engine.models.gguf import read_gguf

    dtype = dtype or torch.float32
    ckpt = read_gguf(path, dtype=dtype, quantized=not dequantize and quantize is None)
    config = ModelConfig.from_hf(ckpt.hf_config)
    return build_from_tensors(config, ckpt.tensors, dtype, device, str(path), quantize)


def load_model(
    name_or_path, dtype=None, device=None, dequantize: bool = False, quantize: str | None = None
) -> Transformer:
    """A model, in eval mode, from a HF folder or a .gguf file, a packaged name ("smollm2-135m",
    "minilm-l6") or a Hugging Face Hub id ("HuggingFaceTB/SmolLM2-135M-Instruct"), tried in that order
    (models.registry.resolve); ModelNotFoundError when it names none of them. Encoder-decoder folders
    (BART, mBART, Marian, T5) give a Seq2SeqTransformer.

    dtype: None -> float32 on CPU, the checkpoint's 16-bit dtype on CUDA. load_model.last_load_seconds
    records how long the last load took.
    dequantize: by default a GGUF's Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K weights (and those a folder written
    by save_pretrained from such a model lists in its quantization_config) stay in their blocks
    (QuantLinear / QuantEmbedding run them through ops.linear_q; `dtype` is then the compute dtype of
    everything else; layers.linear.weight_format says what was kept); True turns every weight into a
    plain `dtype` tensor, as training and save_pretrained need.
    quantize: "int8" or "int4" stores every linear weight (not the embeddings) in GGUF blocks at load
    (QUANTIZE_SCHEMES: int8 symmetric per group of 32, int4 with a zero point per group of 32), from
    the checkpoint's weights (a GGUF's dequantized ones).
    """
    from plm_engine.models.registry import resolve

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"load_model: quantize must be one of {', '.join(QUANTIZE_SCHEMES)} or None, got {quantize!r}")
    found = resolve(name_or_path)
    if found.kind == "gguf":
        model = load_gguf(found.path, dtype, device, dequantize=dequantize, quantize=quantize)
    else:
        model = load_hf_folder(found.path, dtype, device, quantize=quantize, dequantize=dequantize)
    release_freed_memory()
    load_model.last_load_seconds = time.perf_counter() - t0
    return model
