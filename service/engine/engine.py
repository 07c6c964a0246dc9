"""The engine loop: admit new requests, run one forward per request group, sample all rows in one sampler call.

A request is a *group* of rows that share one batched KV cache: one row for a plain completion, `n` (or
`best_of`) rows for several samples of one prompt, `num_beams` rows for beam search. The prompt is computed once
per group: a sampling group prefills it with batch 1 and repeats the cache `n` times; a beam group prefills it
with batch `num_beams`, as transformers' `generate` does, so its beams equal transformers' bit for bit.

Threading: the loop runs on its own thread, never on the asyncio event loop (health checks stay responsive).
Requests come in through `submit()` (thread-safe); each group's events go out through its own asyncio queue via
`loop.call_soon_threadsafe`. `cancel()` (also thread-safe) frees a group at the start of the next step.

One step:
1. take newly submitted groups and drop cancelled ones (freeing their KV cache and sampler state);
2. per group, one forward: the prompt for a new group (prefill), else the last token of each live row;
3. beam groups: `BeamSearch.step` on the group's logits picks the next beams; the cache is reordered to them;
4. sampling rows of all groups: their logits stacked into one `[rows, vocab]` float32 array, one `Sampler.step`;
5. per row: append the token, detokenize, match stop strings, decide whether it finished, push a `StepEvent`;
   finished rows leave the group's cache (`batch_select_indices`), and an empty group leaves the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np
import torch

import sampler_rs

from ..params import SamplingParams
from .detokenizer import IncrementalDetokenizer
from .runner import ModelRunner
from .stops import StopMatcher

log = logging.getLogger("tokenwire.engine")


class FinishReason(StrEnum):
    """Why a row ended."""

    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True)
class TokenInfo:
    """One generated token and its raw log probability."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepEvent:
    """What one step produced for one row (choice `index`)."""

    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_logprobs: tuple[TokenInfo, ...] | None = None  # on the first event of row 0, when asked for
    index: int = 0


@dataclass(frozen=True)
class BeamSettings:
    """Beam search for a group: transformers' generate(num_beams=..., num_return_sequences=..., ...)."""

    num_beams: int
    num_return: int
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never"


@dataclass(frozen=True)
class EngineRequest:
    """A group to generate: already tokenized and validated."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    top_logprobs: int = 0  # alternatives to report per token (the chosen token's logprob is always reported)
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text
    include_stop_str_in_output: bool = False
    prompt_logprobs: bool = False  # logprobs of every prompt token but the first
    guide: Any = None  # a compiled sampler_rs.Guide constraining the output, or None
    rows: int = 1  # sampled rows (n, or best_of); row i is seeded with seed + i
    beam: BeamSettings | None = None  # beam search instead of sampling

    @property
    def choices(self) -> int:
        """How many finished rows the consumer receives."""
        return self.beam.num_return if self.beam is not None else self.rows


@dataclass
class _Row:
    index: int
    seq_id: int  # the sampler's id for this row
    detok: IncrementalDetokenizer
    stops: StopMatcher
    output_ids: list[int] = field(default_factory=list)
    pending_text: str = ""  # decoded this step, not yet through the stop matcher


@dataclass
class _Group:
    group_id: int
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepEvent]
    live: list[_Row] = field(default_factory=list)  # sampling rows still running, in cache batch order
    cache: Any = None
    beam: Any = None  # sampler_rs.BeamSearch
    beam_tokens: list[int] = field(default_factory=list)  # the next token of each beam
    beam_hist: list[list[int]] = field(default_factory=list)  # each beam's generated tokens (for stop strings)
    prompt_lps: tuple[TokenInfo, ...] | None = None  # prompt logprobs, sent with row 0's first event

    def emit(self, event: StepEvent) -> None:
        # RuntimeError: the consumer's event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class QueueFull(Exception):
    """The engine's waiting queue is full (backpressure: the caller should retry later)."""


class SequenceHandle:
    """The consumer's side of one group: an async iterator of events (all rows) and a cancel()."""

    def __init__(self, engine: Engine, group_id: int, queue: asyncio.Queue[StepEvent], choices: int) -> None:
        self._engine = engine
        self.seq_id = group_id
        self._queue = queue
        self._remaining = choices
        self.finished = False

    def __aiter__(self) -> SequenceHandle:
        return self

    async def __anext__(self) -> StepEvent:
        if self.finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.error is not None:
            self.finished = True
        elif event.finish_reason is not None:
            self._remaining -= 1
            self.finished = self._remaining == 0
        return event

    def cancel(self) -> None:
        """Free the group (no-op when it already finished)."""
        if not self.finished:
            self.finished = True
            self._engine.cancel(self.seq_id)


class Engine:
    """Owns the model runner, the sampler and the step loop thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        max_running: int = 64,
        max_waiting: int = 256,
    ) -> None:
        self.max_running = max_running  # groups stepped together; more wait, in arrival order
        self.max_waiting = max_waiting  # past this many waiting groups, submit() refuses (backpressure)
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = sampler_rs.Sampler(vocab_size)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._incoming: deque[_Group] = deque()
        self._cancelled: set[int] = set()
        self._running: dict[int, _Group] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.cancellations = 0
        self.generated_tokens = 0

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tokenwire-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- thread-safe API -------------------------------------------------------------------------------------
    def submit(self, request: EngineRequest, loop: asyncio.AbstractEventLoop) -> SequenceHandle:
        """Queue a request; raise QueueFull when `max_waiting` requests already wait."""
        queue: asyncio.Queue[StepEvent] = asyncio.Queue()
        group = _Group(next(self._ids), request, loop, queue)
        with self._cond:
            if len(self._incoming) >= self.max_waiting:
                raise QueueFull(f"{len(self._incoming)} requests are already waiting (limit {self.max_waiting})")
            self._incoming.append(group)
            self._cond.notify_all()
        return SequenceHandle(self, group.group_id, queue, request.choices)

    def cancel(self, group_id: int) -> None:
        with self._cond:
            self._cancelled.add(group_id)
            self._cond.notify_all()

    def num_running(self) -> int:
        """Groups admitted and not yet finished or freed (waiting ones included)."""
        with self._cond:
            return len(self._running) + len(self._incoming)

    def num_waiting(self) -> int:
        """Groups submitted and not yet admitted to the step loop."""
        with self._cond:
            return len(self._incoming)

    def num_stepping(self) -> int:
        """Groups in the step loop now."""
        return len(self._running)

    # -- the loop --------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._cond:
            while not self._stop and not self._incoming and not self._running and not self._cancelled:
                self._cond.wait()
            cancelled = set(self._cancelled)
            self._cancelled.clear()
            for group in [g for g in self._incoming if g.group_id in cancelled]:  # cancelled while waiting
                self._incoming.remove(group)
                self.cancellations += 1
            incoming: list[_Group] = []
            while self._incoming and len(self._running) + len(incoming) < self.max_running:
                incoming.append(self._incoming.popleft())
        for group in incoming:
            try:
                self._setup(group)
            except Exception as exc:  # one bad request fails alone; the engine keeps serving the others
                log.exception("cannot admit a request", extra={"fields": {"request_id": group.request.request_id}})
                self._drop(group)
                group.emit(StepEvent("", (), error=f"engine error: {type(exc).__name__}: {exc}"))
                continue
            self._running[group.group_id] = group
        for group_id in cancelled:
            gone = self._running.pop(group_id, None)
            if gone is not None:
                self._drop(gone)
                self.cancellations += 1

    def _setup(self, group: _Group) -> None:
        r = group.request
        if r.beam is not None:
            b = r.beam
            group.beam = sampler_rs.BeamSearch(
                num_beams=b.num_beams, num_return=b.num_return, length_penalty=b.length_penalty,
                early_stopping=b.early_stopping, eos_token_ids=sorted(self.eos_token_ids),
                max_new_tokens=r.max_new_tokens, vocab_size=self.vocab_size, params=self._sampler_params(r),
                prompt_token_ids=list(r.prompt_ids), guide=r.guide, top_logprobs=r.top_logprobs,
            )  # fmt: skip
            group.beam_hist = [[] for _ in range(b.num_beams)]
            return
        for i in range(r.rows):
            row = _Row(i, next(self._ids), IncrementalDetokenizer(self.tokenizer),
                       StopMatcher(r.stop, r.include_stop_str_in_output))  # fmt: skip
            seed = None if r.sampling.seed is None else (r.sampling.seed + i) & 0xFFFF_FFFF_FFFF_FFFF
            params = self._sampler_params(replace(r, sampling=replace(r.sampling, seed=seed)))
            if r.guide is not None:
                self.sampler.add_sequence(row.seq_id, params, list(r.prompt_ids), r.guide)
            else:
                self.sampler.add_sequence(row.seq_id, params, list(r.prompt_ids))
            group.live.append(row)

    def _sampler_params(self, r: EngineRequest) -> Any:
        s = r.sampling
        return sampler_rs.SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            top_logprobs=r.top_logprobs,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            logit_bias=dict(s.logit_bias) or None,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            eos_token_ids=sorted(self.eos_token_ids),
        )

    def _drop(self, group: _Group) -> None:
        """Free a group's KV cache and sampler state."""
        group.cache = None
        for row in group.live:
            if row.seq_id in self.sampler:
                self.sampler.remove_sequence(row.seq_id)
        group.live.clear()

    def _finish(self, group: _Group) -> None:
        self._running.pop(group.group_id, None)
        self._drop(group)

    def _loop(self) -> None:
        while True:
            self._admit()
            if self._stop:
                break
            if not self._running:
                continue
            try:
                self._step()
            except Exception as exc:  # never let one bad step kill the engine: fail the groups in it
                log.exception("engine step failed")
                for group in list(self._running.values()):
                    group.emit(StepEvent("", (), error=f"engine error: {type(exc).__name__}: {exc}"))
                    self._finish(group)
        for group in list(self._running.values()):
            group.emit(StepEvent("", (), error="the engine is shutting down"))
            self._finish(group)

    def _forward(self, group: _Group) -> torch.Tensor:
        """One forward of a group: its logits `[live rows, vocab]` (a prefill also records prompt logprobs)."""
        r = group.request
        if group.cache is None:
            prompt = list(r.prompt_ids)
            width = r.beam.num_beams if r.beam is not None else 1
            logits, group.cache, lps = self.runner.prefill(prompt, r.prompt_logprobs, width)
            if r.beam is None and r.rows > 1:  # n samples of one prompt: computed once, then shared
                group.cache.batch_repeat_interleave(r.rows)
                logits = logits.expand(r.rows, -1)
            if lps is not None:
                group.prompt_lps = tuple(TokenInfo(t, lp) for t, lp in zip(prompt[1:], lps, strict=True))
            return logits
        last = group.beam_tokens if group.beam is not None else [row.output_ids[-1] for row in group.live]
        logits, group.cache = self.runner.forward_batch(last, group.cache)
        return logits

    def _step(self) -> None:
        rows: list[torch.Tensor] = []
        sampled: list[tuple[_Group, _Row]] = []
        for group in list(self._running.values()):
            logits = self._forward(group)
            if group.beam is not None:
                self._beam_step(group, logits)
                continue
            rows.append(logits)
            sampled.extend((group, row) for row in group.live)
        self.steps += 1
        if not sampled:
            return
        batch = np.ascontiguousarray(torch.cat(rows).cpu().numpy(), dtype=np.float32)
        outputs = self.sampler.step(batch, [row.seq_id for _, row in sampled])
        finished: dict[int, set[int]] = {}
        for (group, row), out in zip(sampled, outputs, strict=True):
            token = int(out.token_id)
            row.output_ids.append(token)
            info = TokenInfo(token, float(out.logprob), tuple((int(t), float(lp)) for t, lp in out.top_logprobs))
            finish = self._advance(group.request, row, token)
            if finish is None and out.guide_finished:  # the constraint is complete: nothing more may follow
                finish = FinishReason.STOP
                row.pending_text += row.detok.flush()
            can_stop = len(row.output_ids) >= group.request.sampling.min_tokens
            text = row.stops.push(row.pending_text, can_stop=can_stop)
            row.pending_text = ""
            if row.stops.stopped:
                finish = FinishReason.STOP
            elif finish is not None:
                text += row.stops.flush()
            first = row.index == 0 and len(row.output_ids) == 1
            group.emit(StepEvent(text, (info,), finish, index=row.index,
                                 prompt_logprobs=group.prompt_lps if first else None))  # fmt: skip
            self.generated_tokens += 1
            if finish is not None:
                finished.setdefault(group.group_id, set()).add(row.seq_id)
        for group_id, done in finished.items():
            group = self._running[group_id]
            keep = [i for i, row in enumerate(group.live) if row.seq_id not in done]
            for row in group.live:
                if row.seq_id in done:
                    self.sampler.remove_sequence(row.seq_id)
            group.live = [group.live[i] for i in keep]
            if not group.live:
                self._finish(group)
            else:
                group.cache.batch_select_indices(torch.tensor(keep, dtype=torch.long))

    def _advance(self, request: EngineRequest, row: _Row, token: int) -> FinishReason | None:
        """Detokenize the new token into `row.pending_text`; say whether EOS or the length limit ended it."""
        if token in self.eos_token_ids:
            row.pending_text = row.detok.flush()
            return FinishReason.STOP
        row.pending_text = row.detok.push(token)
        if len(row.output_ids) >= request.max_new_tokens:
            row.pending_text += row.detok.flush()
            return FinishReason.LENGTH
        return None

    def _beam_step(self, group: _Group, logits: torch.Tensor) -> None:
        """Advance a beam group; when the search is done, emit its `num_return` best hypotheses, best first.

        With stop strings, a candidate whose decoded text gains a stop string hits like an EOS (transformers'
        `StopStringCriteria`): `propose` gives the candidates, this checks them, `commit` finishes the step."""
        r = group.request
        batch = np.ascontiguousarray(logits.cpu().numpy(), dtype=np.float32)
        if r.stop:
            beams, tokens = group.beam.propose(batch)
            hits = [self._gains_stop(r, group.beam_hist[b], t) for b, t in zip(beams, tokens, strict=True)]
            parent, tokens = group.beam.commit(hits)
        else:
            parent, tokens = group.beam.step(batch)
        if not group.beam.is_done():
            group.cache.reorder_cache(torch.tensor(parent, dtype=torch.long))
            group.beam_tokens = list(tokens)
            group.beam_hist = [[*group.beam_hist[p], t] for p, t in zip(parent, tokens, strict=True)]
            return
        for index, hyp in enumerate(group.beam.finalize()):
            ids = list(hyp.token_ids)
            self.generated_tokens += len(ids)
            text_ids = ids[:-1] if hyp.finished_by_eos else ids
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
            finish = FinishReason.STOP if hyp.finished_by_eos else FinishReason.LENGTH
            if r.stop:
                stops = StopMatcher(r.stop, r.include_stop_str_in_output)
                text = stops.push(text, can_stop=True)
                if stops.stopped:
                    finish = FinishReason.STOP
                else:
                    text += stops.flush()
            tokens_info = tuple(
                TokenInfo(t, lp, tuple((int(a), float(b)) for a, b in top))
                for t, lp, top in zip(ids, hyp.logprobs, hyp.top_logprobs, strict=True)
            )
            group.emit(StepEvent(text, tokens_info, finish, index=index,
                                 prompt_logprobs=group.prompt_lps if index == 0 else None))  # fmt: skip
        self._finish(group)

    def _gains_stop(self, request: EngineRequest, hist: list[int], token: int) -> bool:
        """Whether `hist + [token]` decodes to a text with a stop string that `hist`'s text does not have
        (only once `min_tokens` tokens are generated)."""
        if token in self.eos_token_ids or len(hist) + 1 < request.sampling.min_tokens:
            return False
        before = self.tokenizer.decode(hist, skip_special_tokens=True)
        after = self.tokenizer.decode([*hist, token], skip_special_tokens=True)
        common = next(
            (i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), min(len(before), len(after))
        )
        return any(after.find(s, max(0, common - len(s) + 1)) >= 0 for s in request.stop)
