"""The model runner: one transformers forward per engine step over every scheduled sequence's tokens."""

from __future__ import annotations

from typing import Any

import torch

from . import kv
from .kv import Chunk, PagedKVCache


class ModelRunner:
    """Owns the model's paged KV cache; `forward` runs a step's chunks as one ragged batch."""

    def __init__(self, model: Any, kv_tokens: int, block_size: int = 16) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        kv.install(model)
        self.cache = PagedKVCache(model, kv_tokens, block_size)
        self.forwards = 0

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], keep: list[int]) -> torch.Tensor:
        """Write the KV of every chunk's tokens and return the float32 logits `[len(keep), vocab]` of the step's
        tokens at the flat positions `keep` (chunk after chunk, token after token)."""
        batch, input_ids, position_ids = kv.build_batch(self.cache, chunks, self.device)
        keep_index = torch.tensor(keep, dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=kv.NO_MASK,
                         use_cache=False, logits_to_keep=keep_index, tw_batch=batch)  # fmt: skip
        self.forwards += 1
        logits: torch.Tensor = out.logits[0].float()
        return logits
