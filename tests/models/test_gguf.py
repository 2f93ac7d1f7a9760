"""read_gguf: config, tensor names/layout, dequantization and errors, against transformers' GGUF loader.

Tiny random GGUFs are written here with gguf.GGUFWriter the way llama.cpp's converter writes them (q/k
rows permuted for llama, GPT-2 matrices as (out, in)); the real SmolLM2 Q4_1 file is compared with
transformers' own GGUF loading.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from plm_engine.models.gguf import read_gguf  # noqa: E402
from plm_engine.models.registry import default_model_path  # noqa: E402

Q = gguf.GGMLQuantizationType
# Worst-case absolute dequantization error per unit of |w|max in a 32-block (half a quantization step).
QUANT_TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 15}


def smollm2_path():
    try:
        return default_model_path("smollm2-135m")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"default model not installed: {e}")


# ---- writing tiny GGUFs like llama.cpp ------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute (HF NeoX rows -> ggml interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(arch="llama", layers=2, hidden=64, heads=4, kv_heads=2, inter=96, vocab=160, bias=False, tied=True):
    """HF-named random fp32 weights of a tiny llama/qwen2 model, and its sizes."""
    g = torch.Generator().manual_seed(1)
    hd = hidden // heads
    sd = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tied:
        sd["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * hd, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * hd),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
        if bias:
            sd.update(
                {
                    p + "self_attn.q_proj.bias": (heads * hd,),
                    p + "self_attn.k_proj.bias": (kv_heads * hd,),
                    p + "self_attn.v_proj.bias": (kv_heads * hd,),
                }
            )
    sd = {k: torch.randn(s, generator=g) * 0.5 for k, s in sd.items()}
    return sd, dict(arch=arch, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, inter=inter, vocab=vocab)


_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_llama_gguf(path, sd, sizes, qtype=Q.F32, extra=None, rope_freqs=None, skip=(), override=None, add=None):
    arch = sizes["arch"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(sizes["layers"])
    w.add_context_length(256)
    w.add_embedding_length(sizes["hidden"])
    w.add_feed_forward_length(sizes["inter"])
    w.add_head_count(sizes["heads"])
    w.add_head_count_kv(sizes["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(50000.0)
    w.add_rope_dimension_count(sizes["hidden"] // sizes["heads"])
    w.add_vocab_size(sizes["vocab"])
    for key, value in (extra or {}).items():
        w.add_string(key, value)
    for name, t in sd.items():
        if name in skip:
            continue
        a = t.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{_TO_GGUF[mod]}.{kind}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                a = llama_cpp_permute(a, sizes["heads"] if mod == "self_attn.q_proj" else sizes["kv_heads"])
        if override and gname in override:
            a = override[gname]
        if a.dtype == np.float64:
            w.add_tensor(gname, a)  # written as F64, which gguf cannot dequantize
            continue
        # llama.cpp keeps norms and biases (1-D) in F32 whatever the file type.
        t_q = qtype if a.ndim == 2 else Q.F32
        w.add_tensor(gname, gguf.quants.quantize(a, t_q), raw_dtype=t_q)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for gname, a in (add or {}).items():
        w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_gguf_tensors(path, names=None):
    """transformers' reading of a GGUF: its config dict and its dequantized, processed (q/k un-permuted,
    GPT-2 transposed) tensors, named through gguf-py's own HF -> GGUF name map."""
    tr = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint

    from plm_engine.models.gguf import open_reader

    config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    arch = config["model_type"]
    cls = {"llama": tr.LlamaForCausalLM, "qwen2": tr.Qwen2ForCausalLM}[arch]
    cfg_cls = {"llama": tr.LlamaConfig, "qwen2": tr.Qwen2Config}[arch]
    with torch.device("meta"):
        hf_names = list(cls(cfg_cls(**{k: v for k, v in config.items() if k != "model_type"})).state_dict())
    # transformers' get_gguf_hf_weights_map, without its slow per-submodule recursion.
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    name_map = {}
    for hf in hf_names:
        base, suffix = hf.rsplit(".", 1)
        if (g := tmap.get_name(base)) is not None:
            name_map[f"{g}.{suffix}"] = hf
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    tensors = {}
    for t in open_reader(path).tensors:
        if names is not None and t.name not in names:
            continue
        res = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name)
        tensors[name_map[res.name]] = torch.from_numpy(np.array(res.weights))
    return config, tensors


# ---- the real default model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return read_gguf(smollm2_path())


def test_smollm2_config_and_tensors_match_transformers(smollm2):
    path = smollm2_path()
    layers = smollm2.hf_config["num_hidden_layers"]
    subset = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight"
        for i in (0, layers - 1)
        for n in (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "attn_norm",
            "ffn_norm",
        )
    }
    config, ref = hf_gguf_tensors(path, subset)
    ours = smollm2.hf_config
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "model_type",
    ):
        assert ours[key] == config[key], key
    assert (ours["hidden_size"], ours["num_attention_heads"], ours["num_key_value_heads"]) == (576, 9, 3)
    assert ours["architectures"] == ["LlamaForCausalLM"] and ours["rope_scaling"] is None
    assert len(ref) == len(subset)
    for name, ref_t in ref.items():
        assert smollm2.tensors[name].dtype == torch.float32
        assert torch.equal(smollm2.tensors[name], ref_t), name
    # Whole model: every tensor present, once, and tied (no lm_head).
    assert len(smollm2.tensors) == 2 + 9 * layers and "lm_head.weight" not in smollm2.tensors
    assert sum(t.numel() for t in smollm2.tensors.values()) == 134_515_008
    assert smollm2.tokenizer.model == "gpt2" and len(smollm2.tokenizer.tokens) == 49152
    assert "<|im_start|>" in smollm2.chat_template


def test_truncated_real_file(tmp_path):
    src = smollm2_path()
    dst = tmp_path / "half.gguf"
    with open(src, "rb") as f:
        dst.write_bytes(f.read(src.stat().st_size // 2))
    with pytest.raises(ValueError, match=r"half\.gguf.*truncated"):
        read_gguf(dst)


# ---- tiny synthetic files: layout and every quantization ------------------------------------------


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_llama_quant_types_and_unpermute(tmp_path, qtype):
    sd, sizes = tiny_llama(tied=False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", sd, sizes, qtype)
    ck = read_gguf(path)
    assert set(ck.tensors) == set(sd)
    assert ck.hf_config["tie_word_embeddings"] is False and ck.hf_config["head_dim"] == 16
    _, ref = hf_gguf_tensors(path)
    for name, w in sd.items():
        got = ck.tensors[name]
        assert got.shape == w.shape and got.dtype == torch.float32, name
        assert torch.equal(got, ref[name]), name  # bit-identical to transformers
        # ...and close to the original weights: a wrong q/k row order would be off by O(|w|).
        tol = QUANT_TOL[qtype if w.dim() == 2 else Q.F32] * w.abs().max().item() * 1.01
        assert (got - w).abs().max().item() <= tol, name
    ck16 = read_gguf(path, dtype=torch.bfloat16)
    assert ck16.hf_config["torch_dtype"] == "bfloat16"
    for name, t in ck16.tensors.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, ck.tensors[name].to(torch.bfloat16)), name


def test_qwen2_biases_not_permuted(tmp_path):
    sd, sizes = tiny_llama(arch="qwen2", bias=True, kv_heads=4)
    ck = read_gguf(write_llama_gguf(tmp_path / "qwen.gguf", sd, sizes))
    assert ck.hf_config["model_type"] == "qwen2" and ck.hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert ck.hf_config["tie_word_embeddings"] is True
    assert set(ck.tensors) == set(sd)
    for name, w in sd.items():
        assert torch.equal(ck.tensors[name], w), name


def test_llama_bias_rows_unpermuted(tmp_path):
    sd, sizes = tiny_llama(bias=True)
    ck = read_gguf(write_llama_gguf(tmp_path / "b.gguf", sd, sizes))
    assert ck.hf_config["attention_bias"] is True
    for name, w in sd.items():
        assert torch.equal(ck.tensors[name], w), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from plm_engine.ops.rope import rope_inv_freq

    sd, sizes = tiny_llama(hidden=256, heads=2, kv_heads=1, layers=1)
    hd, theta = 128, 50000.0
    base = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    # llama.cpp convert_hf_to_gguf for Llama 3.1: factor 8, low 1, high 4, original context 8192.
    factors = []
    for f in base:
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(8.0)
        else:
            s = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - s) / 8 + s))
    ck = read_gguf(write_llama_gguf(tmp_path / "l3.gguf", sd, sizes, rope_freqs=np.array(factors)))
    scaling = ck.hf_config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    ours = rope_inv_freq(hd, theta, scaling)
    torch.testing.assert_close(ours, torch.from_numpy(base / np.array(factors, dtype=np.float32)), rtol=1e-6, atol=0)
    bad = np.array(factors)
    bad[5] *= 1.5
    with pytest.raises(ValueError, match="rope_freqs"):
        read_gguf(write_llama_gguf(tmp_path / "bad.gguf", sd, sizes, rope_freqs=bad))


def test_gpt2_matches_transformers(tmp_path):
    tr = pytest.importorskip("transformers")
    cfg = tr.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = tr.GPT2LMHeadModel(cfg)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(".attn.bias") and k != "lm_head.weight"}
    top = {
        "transformer.wte.weight": "token_embd.weight",
        "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight",
        "transformer.ln_f.bias": "output_norm.bias",
    }
    block = {
        "ln_1": "attn_norm",
        "attn.c_attn": "attn_qkv",
        "attn.c_proj": "attn_output",
        "ln_2": "ffn_norm",
        "mlp.c_fc": "ffn_up",
        "mlp.c_proj": "ffn_down",
    }
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(2)
    w.add_context_length(32)
    w.add_embedding_length(64)
    w.add_feed_forward_length(256)
    w.add_head_count(4)
    w.add_layer_norm_eps(1e-5)
    for name, t in sd.items():
        a = t.numpy()
        if name in top:
            gname = top[name]
        else:
            i, rest = name.removeprefix("transformer.h.").split(".", 1)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{block[mod]}.{kind}"
            if kind == "weight" and a.ndim == 2:
                a = a.T.copy()  # llama.cpp stores Conv1D weights as (out, in)
        w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = read_gguf(tmp_path / "gpt2.gguf")
    assert ck.hf_config["model_type"] == "gpt2" and ck.hf_config["tie_word_embeddings"] is True
    assert (ck.hf_config["n_embd"], ck.hf_config["n_layer"], ck.hf_config["n_inner"]) == (64, 2, 256)
    assert set(ck.tensors) == set(sd)
    for name, t in sd.items():
        assert torch.equal(ck.tensors[name], t), name
    loaded = tr.GPT2LMHeadModel(tr.GPT2Config(**{k: v for k, v in ck.hf_config.items() if k != "torch_dtype"}))
    missing, unexpected = loaded.load_state_dict(ck.tensors, strict=False)
    assert not unexpected and all(m.endswith(".attn.bias") or m == "lm_head.weight" for m in missing)


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_and_not_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(tmp_path / "nope.gguf")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"model\.gguf.*not a GGUF file"):
        read_gguf(bad)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.gguf"):
        read_gguf(empty)


def test_truncated_small_file(tmp_path):
    sd, sizes = tiny_llama()
    data = write_llama_gguf(tmp_path / "t.gguf", sd, sizes).read_bytes()
    for n in (6, 200, len(data) - 10):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(data[:n])
        with pytest.raises(ValueError, match=f"cut{n}.gguf.*truncated"):
            read_gguf(cut)


def test_unsupported_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"bert\.gguf.*architecture 'bert'"):
        read_gguf(tmp_path / "bert.gguf")


def test_wrong_shape_missing_and_unknown_tensors(tmp_path):
    sd, sizes = tiny_llama()
    wrong = np.random.default_rng(0).standard_normal((48, 64)).astype(np.float32)  # k_proj needs (32, 64)
    path = write_llama_gguf(tmp_path / "w.gguf", sd, sizes, override={"blk.1.attn_k.weight": wrong})
    with pytest.raises(ValueError, match=r"w\.gguf.*'blk\.1\.attn_k\.weight'.*\(48, 64\).*\(32, 64\)"):
        read_gguf(path)
    path = write_llama_gguf(tmp_path / "m.gguf", sd, sizes, skip={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"m\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        read_gguf(path)
    path = write_llama_gguf(
        tmp_path / "x.gguf", sd, sizes, add={"blk.0.attn_weird.weight": np.ones((4, 64), np.float32)}
    )
    with pytest.raises(ValueError, match=r"x\.gguf.*unexpected tensor 'blk\.0\.attn_weird\.weight'"):
        read_gguf(path)
    # Metadata-only reads skip the tensors (and so their checks).
    assert read_gguf(path, with_tensors=False).tensors == {}


def test_unsupported_quant_type_names_tensor(tmp_path):
    sd, sizes = tiny_llama()
    w64 = sd["model.layers.0.mlp.up_proj.weight"].numpy().astype(np.float64)
    path = write_llama_gguf(tmp_path / "f64.gguf", sd, sizes, override={"blk.0.ffn_up.weight": w64})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight'.*F64"):
        read_gguf(path)
    with pytest.raises(ValueError, match="dtype"):
        read_gguf(path, dtype=torch.int8)
