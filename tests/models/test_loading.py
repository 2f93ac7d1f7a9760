"""Loading HF folders: shards, pytorch_model.bin, dtypes, meta-device build, and every bad-input error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from plm_engine.models import ModelConfig, Transformer, load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny"))
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path, model


def _same_weights(a: Transformer, b: Transformer):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y.to(x.dtype)), k


def test_sharded_safetensors_and_bin(llama_folder, tmp_path):
    path, model = llama_folder
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").exists()
    _same_weights(model, load_model(sharded))
    binary.mkdir()
    shutil.copy(path / "config.json", binary)
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    _same_weights(model, load_model(binary))


def test_dtype_and_no_meta_left(llama_folder):
    path, _ = llama_folder
    m = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in m.parameters())
    assert not m.training
    m = load_model(path, dtype="float32")
    assert m.tok_embed.weight.dtype == torch.float32


def test_missing_files(tmp_path, llama_folder):
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")
    shutil.copy(llama_folder[0] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": 10})
    )
    with pytest.raises(ValueError, match="unsupported architecture.*mamba"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "key,grow,error",
    [
        ("intermediate_size", 8, r"model.layers.0.mlp.gate_proj.weight.*does not fit"),  # a wrong shape
        ("num_hidden_layers", 1, r"no tensor 'layers.2.input_layernorm.weight'"),  # a missing tensor
    ],
)
def test_config_that_does_not_fit_the_checkpoint_names_the_tensor(llama_folder, tmp_path, key, grow, error):
    path, _ = llama_folder
    shutil.copy(path / "model.safetensors", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] += grow
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=error):
        load_model(tmp_path)


def test_truncated_safetensors(llama_folder, tmp_path):
    path, _ = llama_folder
    shutil.copy(path / "config.json", tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)


def test_corrupt_config(llama_folder, tmp_path):
    shutil.copy(llama_folder[0] / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_model(tmp_path)


def test_unsupported_rope_scaling_and_sliding_window(llama_folder, tmp_path):
    path, _ = llama_folder
    shutil.copy(path / "model.safetensors", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported RoPE scaling 'yarn'"):
        load_model(tmp_path)
    cfg.update(rope_scaling=None, model_type="mistral", sliding_window=64, architectures=["MistralForCausalLM"])
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_model(tmp_path).config.max_position_embeddings == 64  # capped at the window, not ignored


def test_meta_build_runs_no_initialiser(llama_folder):
    """Loading builds the model on the meta device without nn.init (whose meta decompositions import
    torch._dynamo: ~900 modules, most of a cold load); other tensors are still initialised inside."""
    import subprocess
    import sys

    from plm_engine.models.meta import meta_device

    with meta_device():
        meta = torch.empty(3)
        real = torch.empty(3, device="cpu")
        assert torch.nn.init.ones_(meta) is meta
        torch.nn.init.ones_(real)
    assert torch.equal(real, torch.ones(3))
    assert torch.nn.init.ones_.__module__ == "torch.nn.init"  # restored
    code = (
        "import sys, torch, plm_engine\n"
        "before = 'torch._dynamo' in sys.modules\n"
        f"plm_engine.load_model({str(llama_folder[0])!r})\n"
        "print(before, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = out.stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo at import time")
    assert after == "False", "load_model imported torch._dynamo"
