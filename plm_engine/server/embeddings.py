"""Sentence embeddings for /v1/embeddings: tokenize, pad into one batch, mean-pool, L2-normalise.

The model does the pooling (`model.embed(input_ids, attention_mask) -> (batch, hidden)`); we normalise
to unit length as sentence-transformers' all-MiniLM-L6-v2 pipeline does (and as OpenAI's embeddings
are), so a dot product is the cosine similarity.
"""

from __future__ import annotations

import threading

import torch


class Embedder:
    """Wraps an encoder model and its tokenizer.

    model: has `.embed(input_ids (B, S) int64, attention_mask (B, S) int64) -> (B, hidden)` and
        `.config.max_position_embeddings`. tokenizer: `.encode(text) -> list[int]` (with the special
        tokens the model expects), `.pad_token_id` (0 if absent: masked out either way).
    """

    def __init__(self, model, tokenizer, max_batch: int = 64):
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        cfg = getattr(model, "config", None)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 512))
        self.dimensions = int(getattr(cfg, "hidden_size", 0)) or None
        # Token-id inputs index the embedding table: an id past it is a 500 on the CPU and a device-side
        # assert (which breaks CUDA for the whole process) on a GPU, so they are checked here.
        sizes = [int(n) for n in (getattr(cfg, "vocab_size", None), getattr(tokenizer, "vocab_size", None)) if n]
        self.vocab_size = min(sizes) if sizes else None
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        # One forward at a time: requests arrive on the event loop and run in worker threads.
        self._lock = threading.Lock()

    def tokenize(self, item: str | list[int]) -> list[int]:
        """Token ids of one input; raises ValueError when it is empty, longer than the model's context or
        (token ids) outside the vocabulary."""
        if isinstance(item, str) and not item:
            raise ValueError("input must not be an empty string")
        ids = list(self.tokenizer.encode(item)) if isinstance(item, str) else list(item)
        if not ids:
            raise ValueError("input must not be empty")
        if not isinstance(item, str) and self.vocab_size is not None:
            bad = next(
                (t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size), None
            )
            if bad is not None:
                raise ValueError(f"input token ids must be ints in [0, {self.vocab_size}), got {str(bad)[:40]}")
        if len(ids) > self.max_length:
            raise ValueError(
                f"input has {len(ids)} tokens, more than the embedding model's context of {self.max_length}"
            )
        return ids

    @torch.inference_mode()
    def embed_ids(self, batch: list[list[int]]) -> torch.Tensor:
        """(len(batch), hidden) float32 unit vectors for already-tokenized inputs."""
        out = []
        with self._lock:
            for start in range(0, len(batch), self.max_batch):
                chunk = batch[start : start + self.max_batch]
                width = max(len(ids) for ids in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)  # (B, S)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, S), 1 = real token
                for i, ids in enumerate(chunk):
                    input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[i, : len(ids)] = 1
                dev = _device_of(self.model)
                emb = self.model.embed(input_ids.to(dev), mask.to(dev)).float().cpu()  # (B, hidden)
                out.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.cat(out)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
