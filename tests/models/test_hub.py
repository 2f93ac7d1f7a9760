"""Hugging Face Hub ids as model arguments, offline: a cache folder laid out as huggingface_hub lays it
(models--org--name/refs/main, snapshots/<commit>/ of links into blobs/) holding a tiny random model.
No test here reaches the network: the Hub API is replaced by a function that fails the test."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import SamplingParams
from plm_engine.models import ModelConfig, Transformer, hub, load_model, save_pretrained
from plm_engine.models.registry import ModelNotFoundError, ResolvedModel, resolve
from plm_engine.models.tokenizer import Tokenizer

REPO = "plm-test/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["<unk>", "</s>", *(f"w{i}" for i in range(62))]


def tiny_repo(folder: Path) -> tuple[Path, Transformer]:
    """A tiny random-init Llama as a Hub repository holds it: config, safetensors, tokenizer, a README."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(WORDS), eos_token_id=1)).eval()
    save_pretrained(model, folder)
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "README.md").write_text("# tiny\n")
    return folder, model


def lay_out_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """`files` (name -> content) in huggingface_hub's cache layout; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tiny_repo(tmp_path_factory.mktemp("tiny-repo"))


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty hub cache, offline; any Hub API call fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("a test reached for the network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    return cache


def test_hub_id_loads_from_the_cache_offline(cache, repo):
    folder, model = repo
    snapshot = lay_out_cache(cache, REPO, folder_files(folder))
    assert resolve(REPO) == ResolvedModel("hf_folder", snapshot, REPO)
    loaded = load_model(REPO)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    # Engine(hub id) loads the model and its tokenizer and generates what the same model does in memory.
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    by_id = Engine(REPO, device="cpu", kv_cache_tokens=256, cuda_graphs=False)
    assert by_id.tokenizer is not None and by_id.tokenizer.eos_token_id == 1
    in_memory = Engine(model, tokenizer=Tokenizer.from_folder(folder), kv_cache_tokens=256, cuda_graphs=False)
    [a] = by_id.generate("w1 w2 w3 w4", params)
    [b] = in_memory.generate("w1 w2 w3 w4", params)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 6 and a.text == b.text


def test_a_gguf_repository_resolves_to_its_file(cache):
    snapshot = lay_out_cache(cache, "plm-test/tiny-gguf", {"tiny.Q8_0.gguf": b"GGUF" + bytes(16), "README.md": b""})
    assert resolve("plm-test/tiny-gguf") == ResolvedModel("gguf", snapshot / "tiny.Q8_0.gguf", "plm-test/tiny-gguf")


def test_offline_and_not_cached_says_how_to_get_it(cache):
    with pytest.raises(ModelNotFoundError) as err:
        load_model("plm-test/not-downloaded")
    msg = str(err.value)
    assert "'plm-test/not-downloaded'" in msg and str(cache) in msg and "HF_HUB_OFFLINE" in msg
    assert "hf download plm-test/not-downloaded" in msg and "\n" not in msg
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)


def test_a_partial_snapshot_with_a_recorded_file_list(cache, repo):
    """After an online download the cache records the repository's whole file list and the hub checks a
    snapshot against it: offline, the files we fetch must be exactly the ones we ask for."""
    write_tree_cache = pytest.importorskip("huggingface_hub._tree_cache").write_tree_cache
    TreeCacheEntry = pytest.importorskip("huggingface_hub._tree_cache").TreeCacheEntry
    folder, _ = repo
    files = folder_files(folder)
    needed = hub.files_to_fetch(REPO, [*files, "onnx/model.onnx", "model.Q4_0.gguf"])
    assert "README.md" not in needed and "model.safetensors" in needed and "tokenizer.json" in needed
    snapshot = lay_out_cache(cache, REPO, {n: files[n] for n in needed})
    storage = cache / ("models--" + REPO.replace("/", "--"))
    listing = {n: TreeCacheEntry(size=1, blob_id="0" * 40) for n in [*files, "onnx/model.onnx", "model.Q4_0.gguf"]}
    write_tree_cache(str(storage), COMMIT, listing)
    assert resolve(REPO).path == snapshot

    (snapshot / "tokenizer.json").unlink()  # an interrupted download
    with pytest.raises(ModelNotFoundError, match=r"'plm-test/tiny-llama' is not \(completely\) in the"):
        resolve(REPO)


def test_which_files_a_load_fetches():
    assert hub.files_to_fetch(
        "o/m",
        [
            "README.md",
            ".gitattributes",
            "config.json",
            "tokenizer.json",
            "model-00002-of-00002.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "consolidated.safetensors",  # the same weights again
            "m.Q4_0.gguf",
            "onnx/model.safetensors",
        ],
    ) == [
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert hub.files_to_fetch("o/m", ["config.json", "pytorch_model.bin", "vocab.txt"]) == [
        "config.json",
        "pytorch_model.bin",
    ]
    assert hub.files_to_fetch("o/m", ["README.md", "m.Q4_K_M.gguf"]) == ["m.Q4_K_M.gguf"]
    with pytest.raises(ModelNotFoundError, match=r"6 \.gguf files \(a\.gguf, b\.gguf, c\.gguf, d\.gguf and 2 more\)"):
        hub.files_to_fetch("o/m", [f"{c}.gguf" for c in "abcdef"])
    with pytest.raises(ModelNotFoundError, match="hf download o/m FILE.gguf"):
        hub.files_to_fetch("o/m", ["a.gguf", "b.gguf"])
    with pytest.raises(ModelNotFoundError, match="has no weights plm_engine reads"):
        hub.files_to_fetch("o/m", ["config.json", "model.onnx"])


def test_hub_id_spelling():
    assert hub.is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and hub.is_hub_id("a_b/c.d-e")
    for not_an_id in ("smollm2-135m", "./a", "../a/b", "~/m", "/abs/m", "a/b/c", "a/b.gguf", "a--b/c", "a/"):
        assert not hub.is_hub_id(not_an_id), not_an_id


def test_online_fetches_only_what_a_load_needs_and_falls_back_to_the_cache(cache, repo, monkeypatch):
    """The online path with the Hub API replaced: the download asks for the chosen files; a Hub that
    cannot be reached leaves the cache; a repository the Hub does not know is one clear error."""
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    folder, _ = repo
    snapshot = lay_out_cache(cache, REPO, folder_files(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    remote = [*folder_files(folder), "onnx/model.onnx"]
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, allow_patterns, local_files_only))
        return str(snapshot)

    real_snapshot_download = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: remote)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve(REPO).path == snapshot
    assert calls == [(REPO, hub.files_to_fetch(REPO, remote), False)]

    def unreachable(self, repo_id):
        raise httpx2.ConnectError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    calls.clear()
    assert resolve(REPO).path == snapshot
    assert calls == [(REPO, None, True)]  # the cache, as the hub recorded nothing about this repository

    # the real snapshot_download on an empty cache, with the Hub unreachable
    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_snapshot_download)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "empty"))
    with pytest.raises(ModelNotFoundError, match=r"could not be reached \(ConnectError: Name or service not known\)"):
        resolve(REPO)

    def unknown(self, repo_id):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.invalid"))
        raise RepositoryNotFoundError("404 Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unknown)
    with pytest.raises(ModelNotFoundError, match="no such model on the Hugging Face Hub"):
        resolve("plm-test/no-such-repo")


def test_a_local_path_comes_before_a_hub_id(cache, repo, monkeypatch, tmp_path):
    folder, _ = repo
    lay_out_cache(cache, REPO, folder_files(folder))
    local = tmp_path / "work" / REPO
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "work")
    assert resolve(REPO) == ResolvedModel("hf_folder", Path(REPO), "tiny-llama")


def run_cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "plm_engine.cli", *argv],
        env={**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_cli_hub_id_from_hf_home_and_the_one_line_error(repo, tmp_path):
    """The real environment variables in a fresh process: HF_HOME places the cache, HF_HUB_OFFLINE=1 keeps
    the network out; a model that is not cached is one line on stderr and exit status 2."""
    folder, _ = repo
    lay_out_cache(tmp_path / "hf" / "hub", REPO, folder_files(folder))
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    common = ["--max-tokens", "3", "--temperature", "0", "--ignore-eos", "--device", "cpu"]
    ok = run_cli("generate", "w1 w2", "--model", REPO, *common, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "decode 3 tok" in ok.stderr

    bad = run_cli("generate", "w1 w2", "--model", "plm-test/not-downloaded", *common, env=env)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert lines[0].startswith("plm-engine generate: Hub model 'plm-test/not-downloaded' is not")
    assert str(tmp_path / "hf" / "hub") in lines[0] and "hf download plm-test/not-downloaded" in lines[0]
