"""What the decoder-only Transformer and the encoder-decoder Seq2SeqTransformer share: saving under
transformers' names, counting parameters, and the engine's entry point forward_tokens."""

from __future__ import annotations

import torch
from torch import nn

from plm_engine.layers.kv_cache import KVCache, PagedBatch
from plm_engine.models.config import ModelConfig
from plm_engine.ops import checks


class PretrainedModel(nn.Module):
    config: ModelConfig

    def save_pretrained(self, path):
        """config.json + model.safetensors under transformers' names (models.hf_checkpoint.save_pretrained)."""
        from plm_engine.models.hf_checkpoint import save_pretrained

        return save_pretrained(self, path)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_tokens(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        batch: PagedBatch,
        logits_index: torch.Tensor | None = None,
        **inputs,
    ) -> torch.Tensor:
        """One generation step over packed new tokens (the engine's forward). input_ids, positions:
        (total,) int64; the new tokens' K/V go into kv_cache at batch.slot_mapping. Returns logits (n,
        vocab) for the tokens at logits_index (default: the last new token of each sequence). inputs:
        what the model needs besides (Seq2SeqTransformer: cross, each sequence's encoder keys/values in
        batch order)."""
        if not (self.config.causal or self.config.is_encoder_decoder):
            raise ValueError("forward_tokens: generation needs a causal (decoder) model")
        if checks.value_checks():  # a direct call; the engine checks prompts once, in add_request
            self._check_step_values(input_ids, positions)
        with checks.trusted():
            return self._forward_tokens(input_ids, positions, kv_cache, batch, logits_index, **inputs)

    def _check_step_values(self, input_ids: torch.Tensor, positions: torch.Tensor) -> None:
        raise NotImplementedError

    def _forward_tokens(self, input_ids, positions, kv_cache, batch, logits_index, **inputs) -> torch.Tensor:
        raise NotImplementedError
