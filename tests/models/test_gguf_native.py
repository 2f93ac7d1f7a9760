"""GGUF weights kept in their blocks (load_model(..., dequantize=False)): the model runs ops.linear_q on
them and gives what the dequantized model gives; other quantized types are dequantized with a warning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from plm_engine.layers.linear import Linear, QuantEmbedding, QuantLinear  # noqa: E402
from plm_engine.models import gguf as G  # noqa: E402
from plm_engine.models.loading import load_gguf, load_model  # noqa: E402
from tests.models.test_gguf import smollm2_path, tiny_llama, write_llama_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType


@pytest.fixture(autouse=True)
def _exact_linear_q(monkeypatch):
    """These tests compare the blocks with the dequantized weights: linear_q's exact path. How many rows
    take the int8 path differs per ISA build (tests/ops/test_linear_q.py bounds that path)."""
    monkeypatch.setenv("PLM_ENGINE_LINEAR_Q", "exact")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_blocks_kept_and_logits_equal_the_dequantized_model(tmp_path, monkeypatch, qtype, tied):
    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    sd, sizes = tiny_llama(tied=tied, bias=False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", sd, sizes, qtype)
    native, plain = load_gguf(path, dequantize=False), load_gguf(path)
    assert isinstance(native.tok_embed, QuantEmbedding) and native.tok_embed.type_name == qtype.name
    qkv = native.layers[0].attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.out_features == (4 + 2 * 2) * 16
    assert isinstance(native.layers[1].mlp.down, QuantLinear)
    assert tied == (native.lm_head is None) and (tied or isinstance(native.lm_head, QuantLinear))
    assert not any(isinstance(m, QuantLinear) for m in plain.modules())
    # The blocks dequantize to exactly the plain model's weights (q/k rows un-permuted like them).
    assert torch.equal(qkv.weight, plain.layers[0].attn.qkv.weight)
    assert torch.equal(native.tok_embed.weight, plain.tok_embed.weight)
    ids = torch.tensor([[3, 17, 159, 0, 42, 42, 7], [1, 2, 3, 4, 5, 6, 100]])
    a, b = _logits(native, ids), _logits(plain, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # bf16 compute: the blocks stay, the norms and activations follow the dtype.
    n16 = load_gguf(path, dtype=torch.bfloat16, dequantize=False)
    assert n16.tok_embed(ids).dtype == torch.bfloat16 and _logits(n16, ids).dtype == torch.bfloat16


def test_plain_tensors_stay_plain_and_other_types_are_dequantized_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    sd, sizes = tiny_llama()
    f16 = write_llama_gguf(tmp_path / "f16.gguf", sd, sizes, Q.F16)
    model = load_gguf(f16, dequantize=False)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    assert isinstance(model.layers[0].attn.qkv, Linear)
    q5 = write_llama_gguf(tmp_path / "q5.gguf", sd, sizes, Q.Q5_0)
    with pytest.warns(RuntimeWarning, match=r"\(Q5_0, shape .* is dequantized"):
        model = load_gguf(q5, dequantize=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    torch.testing.assert_close(
        _logits(model, torch.tensor([[1, 2, 3]])), _logits(load_gguf(q5), torch.tensor([[1, 2, 3]]))
    )


def test_the_cache_keeps_the_blocks(tmp_path, monkeypatch):
    monkeypatch.setenv("PLM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PLM_ENGINE_GGUF_CACHE", raising=False)
    monkeypatch.setattr(G, "CACHE_MIN_BYTES", 0)
    sd, sizes = tiny_llama()
    path = write_llama_gguf(tmp_path / "tiny.gguf", sd, sizes, Q.Q4_1)
    cold = G.read_gguf(path, quantized=True)
    plain = G.read_gguf(path)  # the dequantized entry lives beside the blocks' one
    assert not any(isinstance(t, G.QuantTensor) for t in plain.tensors.values())

    def fail(*a, **k):
        raise AssertionError("a warm read parsed the GGUF file")

    monkeypatch.setattr(G, "_read_gguf", fail)
    warm = G.read_gguf(path, quantized=True)
    assert set(warm.tensors) == set(cold.tensors)
    for name, t in cold.tensors.items():
        w = warm.tensors[name]
        if isinstance(t, G.QuantTensor):
            assert isinstance(w, G.QuantTensor) and (w.qtype, w.shape) == (t.qtype, t.shape), name
            assert torch.equal(w.data, t.data), name
        else:
            assert torch.equal(w, t), name


def test_real_model_native_equals_dequantized():
    """SmolLM2-135M's Q4_1 file (Q8_0 embedding, tied head): same logits and greedy tokens either way, on
    linear_q's exact path (decode's int8 path quantizes x: tests/ops/test_linear_q.py bounds it)."""
    from plm_engine import Engine, SamplingParams

    path = smollm2_path()
    native, plain = load_model(path), load_model(path, dequantize=True)
    assert native.layers[0].mlp.down.type_name == "Q4_1" and native.tok_embed.type_name == "Q8_0"
    blocks = sum(b.numel() for b in native.buffers())
    assert blocks < 0.2 * sum(p.numel() * 4 for p in plain.parameters())  # ~96 MB against ~540 MB of fp32
    ids = torch.tensor([[1, 504, 3458, 282, 4909, 314, 260, 1345]])
    a, b = _logits(native, ids), _logits(plain, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = [
        Engine(m, max_num_seqs=2, kv_cache_tokens=256, compile=False).generate([ids[0].tolist()], params)[0].token_ids
        for m in (native, plain)
    ]
    assert outs[0] == outs[1]


def test_random_blocks_decode_like_gguf():
    """numpy's view of the blocks gguf writes is what QuantTensor holds (a row per weight row)."""
    a = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    raw = gguf.quants.quantize(a, Q.Q4_1)
    t = G.QuantTensor(torch.from_numpy(raw.copy()), int(Q.Q4_1), (3, 64))
    assert np.array_equal(t.dequantize().numpy(), gguf.quants.dequantize(raw, Q.Q4_1))


@pytest.mark.parametrize("scheme,qtype", [("int8", Q.Q8_0), ("int4", Q.Q4_1)])
def test_quantize_at_load_stores_every_linear_in_blocks(tmp_path, monkeypatch, scheme, qtype):
    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    sd, sizes = tiny_llama(tied=False, hidden=64, inter=96)
    path = write_llama_gguf(tmp_path / "f32.gguf", sd, sizes, Q.F32)
    model, plain = load_model(path, quantize=scheme), load_model(path)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1 and all(m.type_name == qtype.name for m in linears)  # 4 a layer + the head
    assert not isinstance(model.tok_embed, QuantEmbedding)  # embeddings stay as they are
    # The blocks are gguf's own quantization of the weights.
    w = plain.layers[0].mlp.down.weight.detach().numpy()
    assert np.array_equal(model.layers[0].mlp.down.qweight.numpy(), gguf.quants.quantize(w, qtype))
    # ...and the model computes with exactly those weights: the plain model given the round-tripped
    # weights gives its logits.
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.Linear):
                raw = gguf.quants.quantize(m.weight.numpy(), qtype)
                m.weight.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
    ids = torch.tensor([[3, 17, 159, 0, 42, 42, 7]])
    a, b = _logits(model, ids), _logits(plain, ids)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with pytest.raises(ValueError, match="quantize must be one of int8, int4"):
        load_model(path, quantize="int3")


def test_perplexity_of_each_weight_format_is_bounded():
    """bench_quant's perplexity on 256 tokens of Hamlet: the file's blocks run natively give the
    dequantized model's perplexity; int8 (Q8_0) re-quantized from those fp32 weights stays within 1%,
    int4 (Q4_1) within llama.cpp's own 4-bit difference (benchmarks/results/quant.csv has the full runs)."""
    import sys

    smollm2_path()
    sys.path.insert(0, "benchmarks")
    try:
        import bench_quant
    finally:
        sys.path.remove("benchmarks")
    from plm_engine.models import load_tokenizer

    ids = bench_quant.play_tokens(load_tokenizer("smollm2-135m"), "hamlet", 256)
    ppl = {
        name: bench_quant.perplexity(bench_quant.load("smollm2-135m", name), ids, 256)
        for name in ("float32", "gguf", "int8", "int4")
    }
    assert 2 < ppl["float32"] < 100, ppl
    assert abs(ppl["gguf"] / ppl["float32"] - 1) < 1e-4, ppl
    assert abs(ppl["int8"] / ppl["float32"] - 1) < 0.01, ppl
    # 4-bit: within what llama.cpp's own perplexity shows for this file (its Q4_1 1.0025x its F32 on 4096
    # tokens, measured once: benchmarks/results/NOTES.md).
    assert abs(ppl["int4"] / ppl["float32"] - 1) < 0.0025, ppl


@pytest.mark.parametrize("source", ["gguf", "int4"])
def test_blocks_save_and_load_back_as_blocks(tmp_path, monkeypatch, source):
    """save_pretrained writes kept blocks as blocks (config.json lists their types); load_model reads them
    back bit for bit, without re-quantizing; dequantize=True gives the plain weights."""
    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    sd, sizes = tiny_llama(tied=source == "gguf", bias=False)
    if source == "gguf":
        model = load_gguf(write_llama_gguf(tmp_path / "q.gguf", sd, sizes, Q.Q4_1), dequantize=False)
    else:
        model = load_model(write_llama_gguf(tmp_path / "f32.gguf", sd, sizes, Q.F32), quantize="int4")
    folder = model.save_pretrained(tmp_path / "saved")
    back = load_model(folder)
    before = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    after = {n: m for n, m in back.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert before.keys() == after.keys() and len(before) >= 9
    for n, m in before.items():
        assert after[n].qtype == m.qtype and torch.equal(after[n].qweight, m.qweight), n
    ids = torch.tensor([[3, 17, 159, 0, 42, 42, 7]])
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    plain = load_model(folder, dequantize=True)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in plain.modules())
    assert torch.equal(plain.layers[0].attn.qkv.weight, model.layers[0].attn.qkv.weight)
    import json

    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "plm_engine_gguf_blocks" and "model.layers.0.self_attn.q_proj.weight" in qc["blocks"]
    # A damaged listing is a clear error, not a crash.
    qc["blocks"]["model.layers.0.self_attn.q_proj.weight"] = "Q3_X"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Q3_X"):
        load_model(folder)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_blocks_on_cuda_match_the_cpu_model_and_decode_under_cuda_graphs(tmp_path, monkeypatch, qtype):
    """The same blocks on a GPU (the Triton kernels) give the CPU model's logits, and
    the engine's CUDA-graph decode runs them (greedy tokens = its eager forward's)."""
    from plm_engine.generation import Engine, SamplingParams

    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    sd, sizes = tiny_llama(tied=False, hidden=256, inter=512)
    path = write_llama_gguf(tmp_path / "q.gguf", sd, sizes, qtype)
    cpu, gpu = load_gguf(path, dequantize=False), load_gguf(path, dequantize=False, device="cuda")
    assert isinstance(gpu.layers[0].mlp.down, QuantLinear) and gpu.layers[0].mlp.down.qweight.is_cuda
    ids = torch.tensor([[3, 17, 159, 0, 42, 42, 7]])
    a, b = _logits(gpu, ids.cuda()).cpu(), _logits(cpu, ids)
    assert (a - b).norm() / b.norm() < 1e-4
    eng = Engine(gpu, kv_cache_tokens=512, max_num_seqs=2)
    assert eng.runner.decode_path == "cuda_graphs"
    out = eng.generate([[3, 17, 159, 0]], SamplingParams(max_tokens=8, temperature=0.0))[0].token_ids
    seq = [3, 17, 159, 0]
    for _ in range(8):  # greedy by the model's own full forward
        seq.append(int(_logits(gpu, torch.tensor([seq], device="cuda"))[0, -1].argmax()))
    assert out == seq[4:]
