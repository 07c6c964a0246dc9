"""The model runner: transformers forwards for one request group, with the group's batched KV cache."""

from __future__ import annotations

from typing import Any

import torch


class ModelRunner:
    """Prefill and decode forwards of a causal LM (one group per call; batching across groups is issue 6)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.device = next(model.parameters()).device

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def prefill(
        self, prompt_ids: list[int], prompt_logprobs: bool, width: int = 1
    ) -> tuple[torch.Tensor, Any, list[float] | None]:
        """The prompt's forward, `width` identical rows (beam search prefills with one row per beam, as
        transformers does). Returns the last position's logits `[width, vocab]` (float32), the cache, and (when
        asked) the logprob of every prompt token but the first under the model's raw log-softmax."""
        cache = self._new_cache()
        ids = torch.tensor([prompt_ids] * width, dtype=torch.long, device=self.device)
        keep = 0 if prompt_logprobs else 1  # 0 = all positions
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        logits = out.logits[:, -1].float()
        if not prompt_logprobs:
            return logits, out.past_key_values, None
        lps = torch.log_softmax(out.logits[0, :-1].float(), dim=-1).gather(1, ids[0, 1:, None])[:, 0]
        return logits, out.past_key_values, [float(x) for x in lps.cpu()]

    @torch.inference_mode()
    def forward_batch(self, tokens: list[int], cache: Any) -> tuple[torch.Tensor, Any]:
        """One decode step for every row of a group: `tokens[i]` follows row i of `cache`. Logits `[rows, vocab]`."""
        ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values
