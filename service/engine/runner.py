"""The model runner: one transformers forward pass for a sequence, with its own KV cache."""

from __future__ import annotations

from typing import Any

import torch


class ModelRunner:
    """Runs prefill and decode forwards of a causal LM (one sequence per call; batching arrives with issue 6)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int], prompt_logprobs: bool) -> tuple[torch.Tensor, Any, list[float] | None]:
        """The prompt's forward: last-position logits, the new cache, and (when asked) the logprob of every prompt
        token but the first under the model's raw log-softmax."""
        if not prompt_logprobs:
            logits, cache = self.forward(prompt_ids, None)
            return logits, cache, None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
        logits = out.logits[0].float()
        lps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        return logits[-1], out.past_key_values, [float(x) for x in lps.cpu()]

    @torch.inference_mode()
    def forward(self, input_ids: list[int], cache: Any | None) -> tuple[torch.Tensor, Any]:
        """Feed `input_ids` after what `cache` holds; return the last position's logits (float32) and the cache."""
        from transformers import DynamicCache

        if cache is None:
            cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.past_key_values
