"""Hugging Face Hub ids ("HuggingFaceTB/SmolLM2-135M-Instruct") as model arguments.

huggingface_hub does the work: its cache (HF_HOME / HF_HUB_CACHE), its offline switch (HF_HUB_OFFLINE)
and snapshot_download. This module only chooses which of a repository's files a load needs (the config,
the tokenizer and the weights, never every quantization of a GGUF repository) and turns the hub's
exceptions into one-line errors that say how to get the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

# Small files a HF folder load reads besides the weights (models.loading, models.tokenizer).
_METADATA = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)


class ModelNotFoundError(FileNotFoundError, ValueError):
    """A model argument that names no local path, packaged model or Hub repository we can get.

    Both a FileNotFoundError (nothing on disk or in the cache) and a ValueError (a bad argument), so code
    that caught either before Hub ids existed still does. The CLIs print it as one line and exit 2."""


def is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a Hub model id, "org/name". A relative path of two parts is spelled
    the same way: registry.resolve tries local paths first."""
    if name.count("/") != 1 or name.startswith(("/", ".", "~")) or name.lower().endswith(".gguf"):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def files_to_fetch(repo_id: str, files: Iterable[str]) -> list[str]:
    """The files of a repository that a load needs: config, tokenizer and safetensors (else
    pytorch_model.bin) of a HF layout, else its one .gguf file. Top-level files only."""
    top = [f for f in files if "/" not in f]
    metadata = [f for f in _METADATA if f in top]
    safetensors = sorted(f for f in top if f.endswith(".safetensors"))
    # Some repositories ship the weights twice (model-*.safetensors shards and consolidated.safetensors);
    # the shards are what the index and transformers use.
    safetensors = [f for f in safetensors if f.startswith("model")] or safetensors
    if "config.json" in top and safetensors:
        return metadata + safetensors
    if "config.json" in top and "pytorch_model.bin" in top:
        return [*metadata, "pytorch_model.bin"]
    ggufs = sorted(f for f in top if f.lower().endswith(".gguf"))
    if len(ggufs) == 1:
        return ggufs
    if ggufs:
        shown = ", ".join(ggufs[:4]) + (f" and {len(ggufs) - 4} more" if len(ggufs) > 4 else "")
        raise ModelNotFoundError(
            f"Hub repository {repo_id!r} holds {len(ggufs)} .gguf files ({shown}); download the one you want "
            f"with `hf download {repo_id} FILE.gguf` and pass the path it prints"
        )
    raise ModelNotFoundError(
        f"Hub repository {repo_id!r} has no weights plm_engine reads (config.json with *.safetensors or "
        f"pytorch_model.bin, or a .gguf file)"
    )


def _cached_files(repo_id: str) -> list[str] | None:
    """The repository's file list as the cache recorded it at its last download; None when it has none."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return [f.path for f in get_cached_repo_tree(repo_id)]
    except CachedRepoTreeNotFoundError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def snapshot(repo_id: str) -> Path:
    """The local folder holding what a load of Hub model `repo_id` needs, downloaded into huggingface_hub's
    cache unless it is there already. Offline (HF_HUB_OFFLINE=1), or when the Hub cannot be reached, only
    the cache is read. ModelNotFoundError, naming the id and how to get it, when that fails."""
    import huggingface_hub as hf
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    unreachable: Exception | None = None
    files = None
    if not offline:
        try:
            files = hf.HfApi().list_repo_files(repo_id)
        except GatedRepoError as e:
            raise ModelNotFoundError(
                f"Hub model {repo_id!r} is gated: accept its terms on its Hub page, then log in with `hf auth login`"
            ) from e
        except RepositoryNotFoundError as e:
            raise ModelNotFoundError(
                f"model {repo_id!r}: no such local file or folder, and no such model on the Hugging Face Hub "
                f"(a private one needs `hf auth login`)"
            ) from e
        except Exception as e:  # no network, a proxy, the Hub down: the cache may still hold the model
            unreachable = e
    cache_only = files is None
    if cache_only:
        files = _cached_files(repo_id)
    # The same file choice online and offline, so the hub's check that a cached snapshot is complete asks
    # only for the files we download (with no recorded file list it checks nothing).
    patterns = files_to_fetch(repo_id, files) if files is not None else None
    try:
        return Path(hf.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=cache_only))
    except LocalEntryNotFoundError as e:
        cache = constants.HF_HUB_CACHE
        if offline:
            why = "HF_HUB_OFFLINE is set, so nothing is downloaded"
        else:
            why = f"the Hub could not be reached ({_first_line(unreachable) if unreachable else _first_line(e)})"
        raise ModelNotFoundError(
            f"Hub model {repo_id!r} is not (completely) in the Hugging Face cache {cache} and {why}; download it "
            f"once with network access (HF_HUB_OFFLINE unset, e.g. `hf download {repo_id}`), or pass a local path"
        ) from e
