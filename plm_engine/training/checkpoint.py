"""Training checkpoints: a folder per step that load_model can read, plus what resuming needs.

    <out_dir>/checkpoints/step-00000100/
        config.json, model.safetensors          the weights (save_pretrained: load_model / transformers read them)
        tokenizer.json, tokenizer_config.json   so `plm-engine generate --model <folder>` works on it
        trainer.pt                              optimizer, scheduler, grad scaler, RNG states (tensors and
                                                plain containers only: read back with weights_only=True)
        trainer_state.json                      step, data position, config, last metrics
        manifest.json                           size and sha256 of every file above; written last

A checkpoint is written into a hidden temporary folder and renamed into place, so a crash mid-write
never leaves a `step-*` folder behind; a folder without a manifest (copied half-way, written by hand)
is reported as partial, and a file whose size or hash disagrees with the manifest as corrupt.

With keep_best, <out_dir>/best/ holds the weights that scored best on the validation split so far
(save_pretrained layout + tokenizer + best.json: step, metric, value), replaced by the same
write-then-rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time

import numpy as np
import torch

FORMAT = "plm_engine-train-checkpoint/1"
MANIFEST = "manifest.json"
BEST_RECORD = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, partial or corrupt."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout uses torch's; numpy/python for user code)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, folder) of every step-* folder under root, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def _write_folder(final: str, tmp: str, write) -> None:
    """write(tmp) fills a fresh temporary folder, which then replaces `final` by a rename: readers see
    the old folder or the complete new one, never a partial one; a failure leaves `final` as it was."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.exists(final):  # e.g. the same step saved again (a signal right after a periodic save)
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_weights_and_tokenizer(folder: str, save_weights, tokenizer) -> None:
    save_weights(folder)
    if tokenizer is not None:
        tokenizer.save(folder)


def save_checkpoint(
    root: str, step: int, save_weights, trainer_tensors: dict, trainer_state: dict, tokenizer=None, keep_last: int = 3
) -> str:
    """Write checkpoint `step` under root and keep only the newest `keep_last`.

    save_weights(folder) writes the weights (config.json + model.safetensors); trainer_tensors goes to
    trainer.pt (torch.save: tensors, numbers, strings, lists, dicts, tuples only), trainer_state to JSON.
    Returns the checkpoint folder.
    """

    def write(tmp: str) -> None:
        _save_weights_and_tokenizer(tmp, save_weights, tokenizer)
        torch.save(trainer_tensors, os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({**trainer_state, "step": step, "saved_at": time.time()}, f, indent=2, default=str)
        files = {}
        for name in sorted(os.listdir(tmp)):
            p = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"format": FORMAT, "step": step, "files": files}, f, indent=2)
        for name in os.listdir(tmp):  # the data must be on disk before the rename makes it visible
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    os.makedirs(root, exist_ok=True)
    final = step_dir(root, step)
    _write_folder(final, os.path.join(root, f".tmp-step-{step:08d}-{os.getpid()}"), write)
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(path: str, save_weights, tokenizer, record: dict) -> str:
    """Replace the folder of the best weights so far (<out_dir>/best: config.json, model.safetensors,
    the tokenizer and best.json = `record`) by a write to a temporary folder and a rename, so the folder
    always holds one complete set of weights and the record that goes with them."""

    def write(tmp: str) -> None:
        _save_weights_and_tokenizer(tmp, save_weights, tokenizer)
        with open(os.path.join(tmp, BEST_RECORD), "w") as f:
            json.dump(record, f, indent=2)

    _write_folder(path, f"{path}.tmp-{os.getpid()}", write)
    return path


def read_best(path: str) -> dict | None:
    """The record of the best-weights folder `path`, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(path, BEST_RECORD)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def verify_checkpoint(path: str) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError naming the problem otherwise."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(
            f"checkpoint {path!r} is partial: it has no {MANIFEST} (the write was interrupted "
            "or the folder was not written by the trainer); resume from an earlier checkpoint"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path!r} is corrupt: unreadable {MANIFEST} ({e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path!r} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name, meta in files.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {path!r} is partial: {name} is missing")
        size = os.path.getsize(p)
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupt: {name} has {size} bytes, the manifest says "
                f"{meta['bytes']} (truncated or overwritten)"
            )
        digest = _sha256(p)
        if digest != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {path!r} is corrupt: {name} has sha256 {digest[:12]}..., the manifest "
                f"says {meta['sha256'][:12]}..."
            )
    return manifest


def load_trainer_files(path: str) -> tuple[dict, dict]:
    """(trainer.pt contents, trainer_state.json contents) of a verified checkpoint."""
    verify_checkpoint(path)
    try:
        tensors = torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r}: trainer.pt could not be read ({e})") from e
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    return tensors, state


def resolve_resume(resume: str, root: str) -> str:
    """The checkpoint folder a `resume` setting names: "latest" under root, or a folder."""
    if resume == "latest":
        path = latest_checkpoint(root)
        if path is None:
            raise CheckpointError(f"resume='latest' but {root!r} holds no checkpoint (step-* folder)")
        return path
    return resume
