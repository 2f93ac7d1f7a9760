"""The native CPU decode step (plm_engine._C.DecodeStep, generation/native_decode.py) against the eager
forward: the same kernels in the same order, so the same logits bit for bit (fp32 and bf16 alike: the
bound is 0), on every ISA build of the kernels (cpu_isa), both model families, and batches on either
side of the linear kernel's row limit; an Engine decodes the same tokens with it on and off; bad step
input is an error; a model the plan does not know falls back to the eager step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from plm_engine.generation import Engine, SamplingParams
from plm_engine.generation.native_decode import NativeDecode, unsupported_reason
from plm_engine.layers.kv_cache import PagedBatch
from plm_engine.models.config import ModelConfig
from plm_engine.models.transformer import Transformer
from plm_engine.ops import extension
from plm_engine.ops.linear import kernel_max_rows
from tests.tiny_models import randomize

pytestmark = pytest.mark.skipif(
    not hasattr(extension.load()[0], "DecodeStep"), reason="plm_engine._C with DecodeStep is not built"
)

BLOCK = 16
# llama: GQA, untied head; Qwen2-like: qkv bias, tied head; Llama 3 rope scaling; gpt2: LayerNorm, learned
# positions, GELU-tanh, every bias.
MODELS = {
    "llama_gqa": ("llama-tiny", {}),
    "qwen2_bias_tied": ("llama-tiny", {"qkv_bias": True, "tie_word_embeddings": True, "n_kv_heads": 1}),
    "llama3_rope": (
        "llama-tiny",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "gpt2": ("gpt2-tiny", {}),
    # Weights in GGUF blocks (load_model's default for a GGUF): every linear and the embedding, tied
    # (Q4_1) or not (Q8_0, a separate Q8_0 head).
    "gguf_q4_1_tied": ("Q4_1", {"tied": True}),
    "gguf_q8_0": ("Q8_0", {"tied": False}),
}


def _gguf_model(qtype: str, tied: bool, dtype: torch.dtype) -> Transformer:
    import tempfile

    gguf = pytest.importorskip("gguf")
    from plm_engine.layers.linear import QuantEmbedding
    from plm_engine.models.loading import load_gguf
    from tests.models.test_gguf import tiny_llama, write_llama_gguf

    sd, sizes = tiny_llama(tied=tied, vocab=512)
    with tempfile.TemporaryDirectory() as d:
        path = write_llama_gguf(f"{d}/tiny.gguf", sd, sizes, gguf.GGMLQuantizationType[qtype])
        model = load_gguf(path, dtype=dtype, dequantize=False)
    assert isinstance(model.tok_embed, QuantEmbedding)
    return model


def _model(name: str, dtype: torch.dtype) -> Transformer:
    preset, overrides = MODELS[name]
    if preset.startswith("Q"):
        return _gguf_model(preset, overrides["tied"], dtype)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, **overrides)).eval()
    randomize(model)  # biases and norm weights away from 0 and 1, so a missed one shows
    return model.to(dtype)


def _decode_batch(n: int, num_blocks: int):
    """n sequences, one new token each, with cache lengths around block boundaries (1, 16, 17, 32, 33,
    ...) and scattered block ids; the tensors a PagedBatch holds."""
    g = torch.Generator().manual_seed(n)
    lens = [(1, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 1, 7, 3 * BLOCK - 1)[i % 7] for i in range(n)]
    width = max(-(-L // BLOCK) for L in lens)
    table = torch.randperm(num_blocks, generator=g)[: n * width].view(n, width).to(torch.int32)
    slots = torch.tensor([int(table[i, (L - 1) // BLOCK]) * BLOCK + (L - 1) % BLOCK for i, L in enumerate(lens)])
    ids = torch.randint(0, 512, (n,), generator=g)
    return ids, torch.tensor(lens) - 1, slots, table, torch.tensor(lens, dtype=torch.int32)


def _filled_caches(model, num_blocks: int):
    """Two KV caches with the same random content (one for each path)."""
    a, b = model.allocate_kv_cache(num_blocks, BLOCK), model.allocate_kv_cache(num_blocks, BLOCK)
    g = torch.Generator().manual_seed(7)
    for x, y in zip(a.k + a.v, b.k + b.v):
        x.copy_(torch.randn(x.shape, generator=g))
        y.copy_(x)
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MODELS))
def test_native_step_equals_eager_forward(cpu_isa, name, dtype):
    model = _model(name, dtype)
    # 1, 3, and one row past the linear kernel's limit here (F.linear then, in both paths).
    for n in sorted({1, 3, kernel_max_rows(dtype) + 1}):
        num_blocks = 3 * n + 2
        native_cache, eager_cache = _filled_caches(model, num_blocks)
        step = NativeDecode(model, native_cache)
        ids, pos, slots, table, lens = _decode_batch(n, num_blocks)
        batch = PagedBatch(torch.arange(n + 1, dtype=torch.int32), 1, slots, table, lens, True, False)
        with torch.no_grad():
            want = model.forward_tokens(ids, pos, eager_cache, batch)
        got = step.step(ids, pos, slots, table, lens)
        assert got.shape == (n, model.config.vocab_size) and got.dtype == dtype and not got.requires_grad
        assert torch.equal(got, want), f"{name} {dtype} n={n}: max diff {(got.float() - want.float()).abs().max()}"
        for x, y in zip(native_cache.k + native_cache.v, eager_cache.k + eager_cache.v):
            assert torch.equal(x, y)  # the same keys/values written, at the same slots


class _CountDecodeForwards:
    def __init__(self, monkeypatch):
        self.decode = 0
        forward = Transformer.forward_tokens

        def counted(model, input_ids, positions, kv_cache, batch, *args, **kwargs):
            self.decode += batch.is_decode
            return forward(model, input_ids, positions, kv_cache, batch, *args, **kwargs)

        monkeypatch.setattr(Transformer, "forward_tokens", counted)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2", "gguf_q4_1_tied"])
def test_engine_greedy_same_with_native_on_and_off(name, monkeypatch):
    model = _model(name, torch.float32)
    prompts = [[3, 4, 5, 6], [7] * 20, [9, 1]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 5, 7)]
    calls = _CountDecodeForwards(monkeypatch)

    monkeypatch.setenv("PLM_ENGINE_NATIVE_DECODE", "0")
    off = Engine(model, kv_cache_tokens=512, max_num_seqs=4, compile=False)
    assert off.runner.decode_path == "eager" and off.runner.native is None
    ref = off.generate(prompts, params)
    assert calls.decode > 0

    monkeypatch.delenv("PLM_ENGINE_NATIVE_DECODE")
    on = Engine(model, kv_cache_tokens=512, max_num_seqs=4, compile=False)
    assert on.runner.decode_path == "native"
    calls.decode = 0
    got = on.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert calls.decode == 0  # every decode step was the C++ one

    # Under a dispatch mode (a hot-path detector, FakeTensorMode) the ops must be seen: eager then.
    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        again = on.generate(prompts[:1], params[:1])
    assert again[0].token_ids == ref[0].token_ids and calls.decode > 0
    # A forward_tokens replaced on the model (wrapped, instrumented) is honoured: eager then too.
    seen = []
    monkeypatch.setattr(
        model, "forward_tokens", lambda *a, **k: seen.append(1) or Transformer.forward_tokens(model, *a, **k)
    )
    assert on.generate(prompts[:1], params[:1])[0].token_ids == ref[0].token_ids
    assert len(seen) == params[0].max_tokens  # the prefill and every decode step
    monkeypatch.delattr(model, "forward_tokens")

    # compile=True still selects the compiled step (built lazily: nothing compiles here).
    assert Engine(model, kv_cache_tokens=512, max_num_seqs=4, compile=True).runner.decode_path == "compiled"


def test_bad_step_input_is_an_error_and_loses_nothing():
    model = _model("llama_gqa", torch.float32)
    cache, eager_cache = _filled_caches(model, 8)
    step = NativeDecode(model, cache)
    ids, pos, slots, table, lens = _decode_batch(3, 8)
    good = step.step(ids, pos, slots, table, lens)
    bad = [
        (dict(input_ids=ids.int()), "input_ids must be a contiguous Long tensor"),
        (dict(input_ids=ids[:2]), "positions must be a contiguous Long tensor \\[2\\]"),
        (dict(block_table=table.long()), "block_table must be a contiguous Int tensor"),
        (dict(block_table=table[:, :0]), "at least one column"),
        (dict(cache_seqlens=lens[:2]), "cache_seqlens must be"),
        (dict(input_ids=ids.new_empty(0)), "non-empty"),
        (dict(positions=pos.view(3, 1)), "positions must be"),
        (dict(input_ids=ids + 10_000), "index out of range|out of range"),
        (dict(positions=pos + 10_000), "position"),
        (dict(slot_mapping=slots + 10_000), "slot"),
        (dict(block_table=table + 10_000), "block"),
    ]
    args = dict(input_ids=ids, positions=pos, slot_mapping=slots, block_table=table, cache_seqlens=lens)
    for change, message in bad:
        with pytest.raises((RuntimeError, IndexError), match=message):
            step.step(**{**args, **change})
    with pytest.raises(TypeError):
        step.step(ids.tolist(), pos, slots, table, lens)
    # The plan is intact: the same step gives the same logits.
    assert torch.equal(step.step(ids, pos, slots, table, lens), good)


def test_unplanned_models_fall_back_to_the_eager_step(monkeypatch):
    model = _model("llama_gqa", torch.float32)
    model.layers[1].mlp.up = torch.nn.Linear(64, 320, bias=False)  # a module the plan does not know
    why = unsupported_reason(model, model.allocate_kv_cache(4))
    assert why is not None and "layers.1.mlp.up" in why
    calls = _CountDecodeForwards(monkeypatch)
    eng = Engine(model, kv_cache_tokens=256, max_num_seqs=2, compile=False)
    assert eng.runner.decode_path.startswith("eager (native step: module layers.1.mlp.up")
    out = eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and calls.decode == 3
    with pytest.raises(ValueError, match="NativeDecode: module layers.1.mlp.up"):
        NativeDecode(model, model.allocate_kv_cache(4))

    relu = Transformer(ModelConfig.preset("gpt2-tiny", activation="relu")).eval()
    assert "activation 'relu'" in unsupported_reason(relu, relu.allocate_kv_cache(4))
    from plm_engine.models.seq2seq import Seq2SeqTransformer

    bart = Seq2SeqTransformer(ModelConfig.preset("bart-tiny")).eval()
    assert Engine(bart, kv_cache_tokens=256, max_num_seqs=2).runner.decode_path == "eager"
    monkeypatch.setenv("PLM_ENGINE_BACKEND", "torch")
    assert "PLM_ENGINE_BACKEND" in unsupported_reason(_model("gpt2", torch.float32), model.allocate_kv_cache(4))
