"""The paged KV cache and the attention that reads it: one forward pass for every running sequence.

Storage: per layer, one key and one value tensor of `num_blocks * block_size` token slots (`[slots, kv_heads,
head_dim]`). A sequence owns a *block table* (a list of block ids); its token at position `p` lives in slot
`table[p // block_size] * block_size + p % block_size`. Blocks are reference-counted, so the `n` samples or the
beams of one prompt share the prompt's full blocks; only the last, partly filled block is copied when a sequence
forks (copy on fork rather than copy on write: the partial block is the only one a child will write to).

The model itself is transformers' (projections, rotary embeddings, MLPs, norms): we register our attention
function with `transformers.AttentionInterface` (and a mask function that builds nothing) and select it with
`model.set_attn_implementation`. A step's tokens, from every sequence, run as one ragged row `[1, T]` with their
own positions; the attention function receives a `StepBatch` through the forward's kwargs. It writes the new
keys and values into their slots, then attends:
- decode tokens (one per sequence) all at once: each gathers its sequence's keys `[B, L, kv_heads, head_dim]`
  (padded to the longest, padding masked), one `scaled_dot_product_attention` call;
- prefill chunks (a prompt, or part of one) one by one, causally over the sequence's keys so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "tokenwire_paged"


class OutOfBlocks(Exception):
    """No free KV block is left (the scheduler preempts and retries)."""


class PagedKVCache:
    """Block allocator plus the per-layer key/value slot tensors."""

    def __init__(self, model: Any, num_tokens: int, block_size: int = 16) -> None:
        cfg = model.config
        param = next(model.parameters())
        self.block_size = block_size
        self.num_blocks = max(1, math.ceil(num_tokens / block_size))
        heads = int(cfg.num_key_value_heads or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        slots = self.num_blocks * block_size
        shape = (slots, heads, head_dim)
        self.k = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.num_hidden_layers)]
        self.bytes_per_token = 2 * cfg.num_hidden_layers * heads * head_dim * param.element_size()
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def usage(self) -> float:
        """Fraction of blocks in use (vLLM's `kv_cache_usage_perc`, as a fraction)."""
        return self.used_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def _alloc(self) -> int:
        if not self._free:
            raise OutOfBlocks
        b = self._free.pop()
        self._refs[b] = 1
        return b

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block of `table` (and empty it)."""
        for b in table:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
        table.clear()

    def reserve(self, table: list[int], tokens: int) -> None:
        """Grow `table` to hold `tokens` tokens. All or nothing: raises OutOfBlocks and changes nothing."""
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            raise OutOfBlocks
        for _ in range(need):
            table.append(self._alloc())

    def fork(self, table: list[int], length: int) -> list[int]:
        """A child of a sequence of `length` tokens: the full blocks shared, the partial last one copied."""
        full = length // self.block_size
        if full == len(table) or length % self.block_size == 0:
            child = table[: self.blocks_for(length)]
            for b in child:
                self._refs[b] += 1
            return child
        if not self._free:
            raise OutOfBlocks
        child = table[:full]
        for b in child:
            self._refs[b] += 1
        last = self._alloc()
        src, dst = table[full] * self.block_size, last * self.block_size
        for k, v in zip(self.k, self.v, strict=True):
            k[dst : dst + self.block_size] = k[src : src + self.block_size]
            v[dst : dst + self.block_size] = v[src : src + self.block_size]
        child.append(last)
        return child

    def slots(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Slot indices of positions `start..end` of a sequence (a CPU LongTensor)."""
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks * self.block_size + pos % self.block_size


@dataclass
class Chunk:
    """One sequence's tokens in a step: positions `start..start + len(tokens)` of its KV table."""

    table: list[int]
    start: int
    tokens: list[int]


@dataclass
class StepBatch:
    """Everything the attention function needs for one forward, built once per step (CPU index tensors moved to
    the model's device)."""

    cache: PagedKVCache
    write_index: torch.Tensor  # [T] slot of every token of the step
    decode_rows: torch.Tensor | None = None  # [B] positions in the step of the one-token chunks
    decode_read: torch.Tensor | None = None  # [B, L] slots each decode token attends to (padding: slot 0)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, L] True where attended
    decode_all: bool = False  # every token of the step is a decode token, in order (no gather needed)
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = field(default_factory=list)
    # (first, end) in the step, the slots read [L] and the causal mask [c, L]; both None when the chunk is the
    # sequence's whole prefix (it attends to its own keys, plain causal attention)


def build_batch(cache: PagedKVCache, chunks: list[Chunk], device: torch.device) -> tuple[StepBatch, Any, Any]:
    """The step's ragged inputs: `(batch, input_ids [1, T], position_ids [1, T])`. Tables must already hold
    every position written."""
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    writes: list[torch.Tensor] = []
    decode: list[tuple[int, Chunk]] = []
    prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []
    offset = 0
    for c in chunks:
        n = len(c.tokens)
        end = c.start + n
        ids.extend(c.tokens)
        positions.append(torch.arange(c.start, end))
        writes.append(cache.slots(c.table, c.start, end))
        if n == 1 and c.start > 0:
            decode.append((offset, c))
        elif c.start == 0:
            prefills.append((offset, offset + n, None, None))
        else:  # a later chunk of a long prompt (or a recompute): causal over everything before it too
            q = torch.arange(c.start, end)[:, None]
            mask = (torch.arange(end)[None, :] <= q).to(device)
            prefills.append((offset, offset + n, cache.slots(c.table, 0, end).to(device), mask))
        offset += n
    batch = StepBatch(cache, torch.cat(writes).to(device), prefills=prefills)
    if decode:
        longest = max(c.start + 1 for _, c in decode)
        read = torch.zeros(len(decode), longest, dtype=torch.long)
        mask = torch.zeros(len(decode), longest, dtype=torch.bool)
        for i, (_, c) in enumerate(decode):
            read[i, : c.start + 1] = cache.slots(c.table, 0, c.start + 1)
            mask[i, : c.start + 1] = True
        batch.decode_rows = torch.tensor([o for o, _ in decode], dtype=torch.long, device=device)
        batch.decode_read = read.to(device)
        batch.decode_mask = mask[:, None, None, :].to(device)
        batch.decode_all = len(decode) == offset
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    position_ids = torch.cat(positions)[None, :].to(device)
    return batch, input_ids, position_ids


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`cache[index]` (slots `[..., kv_heads, head_dim]`) through `index_select` on a 2-D view: several times
    faster than advanced indexing on CPU."""
    rows = cache.view(cache.shape[0], -1).index_select(0, index.reshape(-1))
    return rows.view(*index.shape, *cache.shape[1:])


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: `query [1, Hq, T, D]`, `key`/`value [1, Hkv, T, D]` for the step's
    tokens; returns `[1, T, Hq, D]`."""
    batch: StepBatch | None = kwargs.pop("tw_batch", None)
    if batch is None:  # the same model used outside the engine (transformers' generate): plain sdpa
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    layer = module.layer_idx
    kc, vc = batch.cache.k[layer], batch.cache.v[layer]
    kc.index_copy_(0, batch.write_index, key[0].transpose(0, 1))
    vc.index_copy_(0, batch.write_index, value[0].transpose(0, 1))
    _, heads, total, dim = query.shape
    out = query.new_empty(total, heads, dim)
    if batch.decode_rows is not None:
        assert batch.decode_read is not None
        q = query[0] if batch.decode_all else query[0].index_select(1, batch.decode_rows)  # [Hq, B, D]
        q = q.transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, D]
        k = _gather(kc, batch.decode_read).transpose(1, 2)  # [B, Hkv, L, D]
        v = _gather(vc, batch.decode_read).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.decode_mask, scale=scaling, enable_gqa=True)
        if batch.decode_all:
            out = o[:, :, 0]
        else:
            out[batch.decode_rows] = o[:, :, 0]
    for first, end, read, mask in batch.prefills:
        q = query[:, :, first:end]
        if read is None:  # the whole prefix is this chunk: plain causal attention over its own keys
            k, v = key[:, :, first:end], value[:, :, first:end]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            k = _gather(kc, read).transpose(0, 1).unsqueeze(0)
            v = _gather(vc, read).transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[first:end] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


# The engine passes this as `attention_mask`: a 4D mask makes transformers skip building one (the paged attention
# builds its own); outside the engine, sdpa's masks are built as usual.
NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


def install(model: Any) -> None:
    """Register the paged attention with transformers and select it for `model`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
