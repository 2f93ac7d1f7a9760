"""read_gguf's on-disk cache: a warm read parses and dequantizes nothing and returns the same checkpoint;
another file content, a damaged entry or the switch turn it off or rebuild it."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("gguf")

from plm_engine.models import gguf as G  # noqa: E402
from tests.models.test_gguf import Q, smollm2_path, tiny_llama, write_llama_gguf  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PLM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PLM_ENGINE_GGUF_CACHE", raising=False)
    monkeypatch.setattr(G, "CACHE_MIN_BYTES", 0)  # the tiny files here are cached too
    return tmp_path / "cache" / "gguf"


def _no_parse(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the GGUF was parsed: cache miss")

    monkeypatch.setattr(G, "_read_gguf", fail)
    monkeypatch.setattr(G, "open_reader", fail)


def _same(a: G.GGUFCheckpoint, b: G.GGUFCheckpoint):
    assert a.hf_config == b.hf_config and a.architecture == b.architecture
    assert a.metadata == b.metadata and a.chat_template == b.chat_template
    assert a.tokenizer == b.tokenizer
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warm_read_comes_from_the_cache(tmp_path, cache, monkeypatch, dtype):
    sd, sizes = tiny_llama(tied=False)
    path = write_llama_gguf(tmp_path / "tiny.gguf", sd, sizes, Q.Q4_1, extra={"general.name": "tiny"})
    cold = G.read_gguf(path, dtype=dtype)
    digest = G.file_sha256(path)
    assert (cache / digest / "meta.json").exists()
    assert (cache / digest / f"{str(dtype).removeprefix('torch.')}.safetensors").exists()
    with monkeypatch.context() as m:
        _no_parse(m)
        warm = G.read_gguf(path, dtype=dtype)
        _same(cold, warm)
        assert warm.hf_config["torch_dtype"] == str(dtype).removeprefix("torch.")
        # The tensors are private (copy-on-write) maps: writing one leaves the cache file as it was.
        warm.tensors["model.norm.weight"].add_(1)
        again = G.read_gguf(path, dtype=dtype)
        assert torch.equal(again.tensors["model.norm.weight"], cold.tensors["model.norm.weight"])
        meta_only = G.read_gguf(path, dtype=dtype, with_tensors=False)
        assert meta_only.tensors == {} and meta_only.hf_config == cold.hf_config
    # q/k/v (and gate/up) come back as consecutive rows of one stored block, which the model takes as
    # its fused parameter without a copy.
    from plm_engine.models.loading import _cat_rows

    parts = [warm.tensors[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]
    fused = _cat_rows(parts)
    assert fused.data_ptr() == parts[0].data_ptr() and torch.equal(fused, torch.cat(parts))
    gate_up = [warm.tensors[f"model.layers.0.mlp.{x}_proj.weight"] for x in ("gate", "up")]
    assert _cat_rows(gate_up).data_ptr() == gate_up[0].data_ptr()
    apart = [cold.tensors["model.layers.0.mlp.up_proj.weight"], cold.tensors["model.layers.0.mlp.gate_proj.weight"]]
    assert torch.equal(_cat_rows(apart), torch.cat(apart))


def test_new_content_damaged_entry_and_switch(tmp_path, cache, monkeypatch):
    sd, sizes = tiny_llama()
    path = write_llama_gguf(tmp_path / "m.gguf", sd, sizes, Q.Q8_0)
    first = G.read_gguf(path)
    # Same path, other weights: another hash, so another entry (never the stale tensors).
    sd2 = {k: v + 1 for k, v in sd.items()}
    time.sleep(0.01)
    write_llama_gguf(path, sd2, sizes, Q.Q8_0)
    second = G.read_gguf(path)
    assert not torch.equal(first.tensors["model.norm.weight"], second.tensors["model.norm.weight"])
    assert len([p for p in cache.iterdir() if p.name != "by-stat"]) == 2
    # A damaged tensor file or metadata is a miss, rebuilt from the GGUF.
    entry = cache / G.file_sha256(path)
    (entry / "float32.safetensors").write_bytes(b"garbage")
    _same(G.read_gguf(path), second)
    # A tensor file of another cache version (an older layout) is a miss too, and gets rewritten.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(entry / "float32.safetensors"), framework="pt") as f:
        info, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(stored, str(entry / "float32.safetensors"), metadata={**info, "version": "1"})
    _same(G.read_gguf(path), second)
    with safe_open(str(entry / "float32.safetensors"), framework="pt") as f:
        assert f.metadata()["version"] == str(G.CACHE_VERSION)
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "version": -1}))
    _same(G.read_gguf(path), second)
    # Switched off: nothing is read from or written to the cache.
    monkeypatch.setenv("PLM_ENGINE_GGUF_CACHE", "0")
    other = write_llama_gguf(tmp_path / "other.gguf", sd, sizes, Q.F16)
    G.read_gguf(other)
    assert not (cache / G.file_sha256(other)).exists()


def test_errors_are_not_cached(tmp_path, cache):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    for _ in range(2):
        with pytest.raises(ValueError, match="bad.gguf"):
            G.read_gguf(bad)
    assert [p.name for p in cache.iterdir()] == ["by-stat"]


def test_unwritable_cache_reads_directly(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PLM_ENGINE_CACHE_DIR", str(blocker))
    monkeypatch.setattr(G, "CACHE_MIN_BYTES", 0)
    sd, sizes = tiny_llama()
    ck = G.read_gguf(write_llama_gguf(tmp_path / "m.gguf", sd, sizes, Q.F32))
    assert len(ck.tensors) == len(sd)
    assert "GGUF cache disabled" in capsys.readouterr().err


def test_smollm2_warm_load_reads_no_gguf(monkeypatch, tmp_path):
    """The default model: once cached, load_model builds it without parsing or dequantizing the GGUF,
    with the same weights as a direct read."""
    from plm_engine.models import load_model

    path = smollm2_path()
    monkeypatch.setenv("PLM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    direct = G.read_gguf(path)  # a cold read: parsed and dequantized, and cached
    G.read_gguf(path, quantized=True)  # the blocks' entry (load_model's default), cached beside it
    with monkeypatch.context() as m:
        _no_parse(m)
        models = [load_model("smollm2-135m"), load_model("smollm2-135m", dequantize=True)]
    assert models[0].layers[3].mlp.down.type_name == "Q4_1"
    for model in models:  # the blocks dequantize to the direct read's values, bit for bit
        w = model.layers[3].mlp.down.weight
        assert torch.equal(w, direct.tensors["model.layers.3.mlp.down_proj.weight"])
        qkv = [direct.tensors[f"model.layers.3.self_attn.{x}_proj.weight"] for x in "qkv"]
        assert torch.equal(model.layers[3].attn.qkv.weight, torch.cat(qkv))
        assert torch.equal(model.tok_embed.weight, direct.tensors["model.embed_tokens.weight"])
