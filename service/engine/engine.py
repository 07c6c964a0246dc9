"""The engine loop: continuous batching. Every step, one forward pass over every running sequence.

A request is a *group* of rows: one row for a plain completion, `n` (or `best_of`) sampled rows, or `num_beams`
beams. Each row is a KV *sequence* in the paged cache (`kv.py`): a block table, the positions already written,
and the tokens still to feed (`pending`: a prompt, a recompute after preemption, or the last sampled token). The
prompt of a group is fed once, as one sequence; when it is complete the group forks into its rows, which share
the prompt's full KV blocks.

One step (`_step`):
1. **admission** (`_admit`): cancelled groups leave (their blocks freed); waiting groups join, preempted ones
   first, then new ones in arrival order, while fewer than `max_running` run and the free KV blocks cover the
   newcomer's prompt;
2. **scheduling** (`_schedule`): every decoding sequence feeds its one pending token; prefilling sequences
   (prompts, recomputes) take the rest of the `max_batch_tokens` budget, first come first served, in chunks
   (chunked prefill: a long prompt never holds back the others' tokens for more than one step's budget);
3. **KV blocks**: the scheduled positions are reserved; when the cache is full the most recently admitted group
   is *preempted* (recompute policy: its blocks are freed, it goes back to the head of the queue, and when
   re-admitted each of its rows re-feeds its prompt plus what it generated, then continues exactly where it was;
   sampler state such as seeds, penalties and guides lives on in `sampler_rs`);
4. **one forward** (`ModelRunner.forward`): all chunks as one ragged batch; logits only where needed;
5. **sampling**: the rows whose pending tokens are all fed get their next token from one `Sampler.step` call
   (all groups together); a beam group whose beams are all fed takes one `BeamSearch.step` and its sequences
   are forked / dropped to follow the new beams;
6. per row: append the token, detokenize, match stop strings, emit a `StepEvent`; finished rows free their
   blocks; an empty group leaves.

Threading: the loop runs on its own thread, never on the asyncio event loop (health checks stay responsive).
Requests come in through `submit()` (thread-safe); each group's events go out through its own asyncio queue via
`loop.call_soon_threadsafe`. `cancel()` (also thread-safe) frees a group at the start of the next step.
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
from .kv import Chunk, OutOfBlocks
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


class _Outbox:
    """A step's events, handed to each consumer event loop in one `call_soon_threadsafe` (one wake-up per loop
    per step, not one per token)."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[StepEvent], StepEvent]]] = {}

    def add(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[StepEvent], event: StepEvent) -> None:
        self._items.setdefault(loop, []).append((queue, event))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            self.deliver_now(loop, batch)

    @staticmethod
    def deliver_now(loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue[StepEvent], StepEvent]]) -> None:
        def put() -> None:
            for queue, event in batch:
                queue.put_nowait(event)

        # RuntimeError: the consumer's event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(put)


@dataclass
class _Seq:
    """One KV sequence: its block table, how many positions hold KV, and the tokens still to feed."""

    table: list[int] = field(default_factory=list)
    length: int = 0
    pending: list[int] = field(default_factory=list)
    fed: int = 0  # tokens of `pending` scheduled in the current step
    logits: torch.Tensor | None = None  # next-token logits once everything is fed, until they are used


@dataclass
class _Row:
    index: int
    seq_id: int  # the sampler's id for this row
    detok: IncrementalDetokenizer
    stops: StopMatcher
    kv: _Seq
    output_ids: list[int] = field(default_factory=list)
    pending_text: str = ""  # decoded this step, not yet through the stop matcher


@dataclass
class _Group:
    group_id: int
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepEvent]
    admitted: int = 0  # admission order (the latest admitted is preempted first)
    prompt: _Seq | None = None  # the prompt while it is fed; None once the group forked into rows or beams
    live: list[_Row] = field(default_factory=list)  # sampling rows still running
    beam: Any = None  # sampler_rs.BeamSearch
    beams: list[_Seq] = field(default_factory=list)  # one sequence per beam, in beam order
    beam_hist: list[list[int]] = field(default_factory=list)  # each beam's generated tokens
    prompt_lps: list[float] = field(default_factory=list)  # prompt logprobs so far (chunk by chunk)
    prompt_info: tuple[TokenInfo, ...] | None = None  # prompt logprobs, sent with row 0's first event
    outbox: _Outbox | None = None  # the engine's: events leave once per step

    def emit(self, event: StepEvent) -> None:
        if self.outbox is not None:
            self.outbox.add(self.loop, self.queue, event)
        else:
            _Outbox.deliver_now(self.loop, [(self.queue, event)])

    @property
    def rows_made(self) -> bool:
        """The rows (or beams) exist; until then `prompt` is fed."""
        return self.prompt is None

    def seqs(self) -> list[_Seq]:
        if self.prompt is not None:
            return [self.prompt]
        if self.beam is not None:
            return self.beams
        return [row.kv for row in self.live]


class QueueFull(Exception):
    """The engine's waiting queue is full (backpressure: the caller should retry later)."""


class TooLarge(Exception):
    """The request alone needs more KV cache than the engine has."""


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


@dataclass(frozen=True)
class EngineConfig:
    """The engine's capacity (the `serve` flags of the same names)."""

    max_running: int = 64  # groups stepped together; more wait, in arrival order
    max_waiting: int = 256  # past this many waiting groups, submit() refuses (backpressure)
    kv_cache_tokens: int = 16384  # the paged KV cache, in tokens
    max_batch_tokens: int = 1024  # tokens per forward (decodes first, then prefill chunks)
    block_size: int = 16  # tokens per KV block


class Engine:
    """Owns the model runner (and its paged KV cache), the sampler and the step loop thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        config: EngineConfig | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.runner = ModelRunner(model, config.kv_cache_tokens, config.block_size)
        self.cache = self.runner.cache
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = sampler_rs.Sampler(vocab_size)
        self._ids = itertools.count(1)
        self._admissions = itertools.count(1)
        self._cond = threading.Condition()
        self._incoming: deque[_Group] = deque()
        self._preempted: deque[_Group] = deque()  # engine thread only: re-admitted before new groups
        self._cancelled: set[int] = set()
        self._running: dict[int, _Group] = {}
        self._outbox = _Outbox()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.cancellations = 0
        self.preemptions = 0
        self.generated_tokens = 0
        self.batch_log: deque[tuple[int, int]] = deque(maxlen=4096)  # per step: (decode tokens, prefill tokens)

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
    def tokens_needed(self, request: EngineRequest) -> int:
        """KV positions the request may hold at once: its prompt plus every row's output (full blocks)."""
        bs = self.cache.block_size
        width = request.beam.num_beams if request.beam is not None else request.rows
        return self.cache.blocks_for(len(request.prompt_ids)) * bs + width * (request.max_new_tokens + bs)

    def submit(self, request: EngineRequest, loop: asyncio.AbstractEventLoop) -> SequenceHandle:
        """Queue a request; QueueFull when `max_waiting` requests already wait, TooLarge when it could never fit."""
        need = self.tokens_needed(request)
        if need > self.cache.capacity_tokens:
            raise TooLarge(f"the request needs up to {need} tokens of KV cache (prompt, plus max_tokens for each "
                           f"of its choices); the server holds {self.cache.capacity_tokens}")  # fmt: skip
        queue: asyncio.Queue[StepEvent] = asyncio.Queue()
        group = _Group(next(self._ids), request, loop, queue, prompt=_Seq(pending=list(request.prompt_ids)),
                       outbox=self._outbox)  # fmt: skip
        with self._cond:
            if len(self._incoming) >= self.config.max_waiting:
                raise QueueFull(f"{len(self._incoming)} requests are already waiting (limit {self.config.max_waiting})")
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
            return len(self._running) + len(self._incoming) + len(self._preempted)

    def num_waiting(self) -> int:
        """Groups submitted (or preempted) and not admitted to the step loop."""
        with self._cond:
            return len(self._incoming) + len(self._preempted)

    def num_stepping(self) -> int:
        """Groups in the step loop now."""
        return len(self._running)

    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks in use."""
        return self.cache.usage()

    # -- admission -------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._cond:
            while (not self._stop and not self._incoming and not self._running and not self._cancelled
                   and not self._preempted):  # fmt: skip
                self._cond.wait()
            cancelled = set(self._cancelled)
            self._cancelled.clear()
            for queue in (self._incoming, self._preempted):
                for group in [g for g in queue if g.group_id in cancelled]:  # cancelled while waiting
                    queue.remove(group)
                    self._drop(group)
                    self.cancellations += 1
            for group_id in cancelled:
                gone = self._running.pop(group_id, None)
                if gone is not None:
                    self._drop(gone)
                    self.cancellations += 1
            admitted: list[_Group] = []
            while len(self._running) + len(admitted) < self.config.max_running:
                source = self._preempted if self._preempted else self._incoming
                if not source:
                    break
                group = source[0]
                need = sum(self.cache.blocks_for(s.length + len(s.pending)) for s in group.seqs())
                reserved = sum(self._blocks_ahead(g) for g in [*self._running.values(), *admitted])
                if need + reserved > self.cache.free_blocks and (self._running or admitted):
                    break  # wait for blocks to free up (never blocks an idle engine: it takes one at a time)
                source.popleft()
                admitted.append(group)
        for group in admitted:
            fresh = group.admitted == 0  # not a preempted group coming back
            group.admitted = next(self._admissions)
            if fresh:
                try:
                    self._setup(group)
                except Exception as exc:  # one bad request fails alone; the engine keeps serving the others
                    log.exception("cannot admit a request",
                                  extra={"fields": {"request_id": group.request.request_id}})  # fmt: skip
                    self._drop(group)
                    group.emit(StepEvent("", (), error=f"engine error: {type(exc).__name__}: {exc}"))
                    continue
            self._running[group.group_id] = group

    def _blocks_ahead(self, group: _Group) -> int:
        """Blocks a running group still needs for its pending tokens."""
        return sum(max(0, self.cache.blocks_for(s.length + len(s.pending)) - len(s.table)) for s in group.seqs())

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
            return
        for i in range(r.rows):
            row = _Row(i, next(self._ids), IncrementalDetokenizer(self.tokenizer),
                       StopMatcher(r.stop, r.include_stop_str_in_output), _Seq())  # fmt: skip
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
        """Free a group's KV blocks and sampler state."""
        for seq in group.seqs():
            self.cache.release(seq.table)
        for row in group.live:
            if row.seq_id in self.sampler:
                self.sampler.remove_sequence(row.seq_id)
        group.live.clear()
        group.beams.clear()

    def _finish(self, group: _Group) -> None:
        self._drop(group)  # first: once it is out of `_running`, observers may count it as gone
        self._running.pop(group.group_id, None)

    # -- preemption ------------------------------------------------------------------------------------------
    def _preempt(self, group: _Group) -> None:
        """Free a running group's KV; it re-feeds everything it had when it is admitted again (recompute)."""
        r = group.request
        self._running.pop(group.group_id, None)
        if group.prompt is not None:
            self.cache.release(group.prompt.table)
            group.prompt = _Seq(pending=list(r.prompt_ids))
            group.prompt_lps.clear()
        elif group.beam is not None:
            for seq, hist in zip(group.beams, group.beam_hist, strict=True):
                self.cache.release(seq.table)
                seq.length, seq.pending, seq.logits = 0, [*r.prompt_ids, *hist], None
        else:
            for row in group.live:
                self.cache.release(row.kv.table)
                row.kv.length, row.kv.pending, row.kv.logits = 0, [*r.prompt_ids, *row.output_ids], None
        with self._cond:
            self._preempted.appendleft(group)
        self.preemptions += 1
        log.info("preempted", extra={"fields": {"request_id": r.request_id, "kv_usage": round(self.kv_usage(), 3)}})

    def _make_room(self, blocks: int, protect: _Group | None) -> bool:
        """Preempt the latest admitted groups (never `protect`) until `blocks` blocks are free."""
        while self.cache.free_blocks < blocks:
            victims = [g for g in self._running.values() if g is not protect]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda g: g.admitted))
        return True

    # -- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._admit()
            if self._stop:
                break
            if self._running:
                try:
                    self._step()
                except Exception as exc:  # never let one bad step kill the engine: fail the groups in it
                    log.exception("engine step failed")
                    for group in list(self._running.values()):
                        group.emit(StepEvent("", (), error=f"engine error: {type(exc).__name__}: {exc}"))
                        self._finish(group)
            self._outbox.flush()
        for queue in (self._running.values(), self._preempted):
            for group in list(queue):
                group.emit(StepEvent("", (), error="the engine is shutting down"))
                self._drop(group)
        self._running.clear()
        self._preempted.clear()
        self._outbox.flush()

    def _schedule(self) -> list[tuple[_Group, _Seq]]:
        """This step's sequences, each with `fed` tokens to feed; their KV blocks reserved (preempting when full)."""
        while True:
            decodes: list[tuple[_Group, _Seq]] = []
            prefills: list[tuple[_Group, _Seq]] = []
            for group in sorted(self._running.values(), key=lambda g: g.admitted):
                for seq in group.seqs():
                    seq.fed = 0
                    if len(seq.pending) == 1 and seq.length > 0:
                        decodes.append((group, seq))
                    elif seq.pending:
                        prefills.append((group, seq))
            budget = max(1, self.config.max_batch_tokens - len(decodes))
            chosen: list[tuple[_Group, _Seq]] = []
            for group, seq in decodes:
                seq.fed = 1
                chosen.append((group, seq))
            for group, seq in prefills:
                if budget <= 0:
                    break
                seq.fed = min(len(seq.pending), budget)
                budget -= seq.fed
                chosen.append((group, seq))
            try:
                for _, seq in chosen:
                    self.cache.reserve(seq.table, seq.length + seq.fed)
                return chosen
            except OutOfBlocks:
                if len(self._running) == 1:  # alone and still short: cannot happen within tokens_needed()
                    raise RuntimeError("the KV cache cannot hold this request") from None
                self._preempt(max(self._running.values(), key=lambda g: g.admitted))

    def _step(self) -> None:
        chosen = self._schedule()
        if not chosen:
            return
        chunks: list[Chunk] = []
        keep: list[int] = []
        wants: list[tuple[_Group, _Seq, int, int]] = []  # (group, seq, first kept row, kept rows)
        offset = 0
        for group, seq in chosen:
            tokens = seq.pending[: seq.fed]
            chunks.append(Chunk(seq.table, seq.length, tokens))
            done = seq.fed == len(seq.pending)
            lps = group.request.prompt_logprobs and not group.rows_made
            if lps:
                wants.append((group, seq, len(keep), seq.fed))
                keep.extend(range(offset, offset + seq.fed))
            elif done:
                wants.append((group, seq, len(keep), 1))
                keep.append(offset + seq.fed - 1)
            offset += seq.fed
        logits = self.runner.forward(chunks, keep)
        self.steps += 1
        decoded = sum(1 for _, seq in chosen if seq.fed == 1 and seq.length > 0)
        self.batch_log.append((decoded, offset - decoded))
        for group, seq, first, count in wants:
            if group.request.prompt_logprobs and not group.rows_made:
                self._prompt_logprobs(group, seq, logits[first : first + count])
            if seq.fed == len(seq.pending):
                seq.logits = logits[first + count - 1]
        for _, seq in chosen:
            seq.length += seq.fed
            del seq.pending[: seq.fed]
            seq.fed = 0
        self._sample()

    def _prompt_logprobs(self, group: _Group, seq: _Seq, rows: torch.Tensor) -> None:
        """Logprobs of the prompt tokens that the chunk's positions predict (all but the prompt's first)."""
        prompt = group.request.prompt_ids
        start = seq.length  # the chunk's first position (not yet advanced)
        targets = [prompt[p + 1] for p in range(start, start + seq.fed) if p + 1 < len(prompt)]
        if targets:
            lps = torch.log_softmax(rows[: len(targets)], dim=-1)
            picked = lps.gather(1, torch.tensor(targets, device=lps.device)[:, None])[:, 0]
            group.prompt_lps.extend(float(x) for x in picked.cpu())

    def _fork_rows(self, group: _Group) -> None:
        """The prompt is fed: give each row (or beam) its sequence, sharing the prompt's blocks."""
        prompt = group.prompt
        assert prompt is not None
        beam = group.request.beam
        width = beam.num_beams if beam is not None else len(group.live)
        if not self._make_room(width - 1, protect=group):
            raise RuntimeError("the KV cache cannot hold this request's rows")
        seqs = [prompt] + [_Seq(self.cache.fork(prompt.table, prompt.length), prompt.length)
                           for _ in range(width - 1)]  # fmt: skip
        if group.beam is not None:
            group.beams = seqs
            group.beam_hist = [[] for _ in seqs]
        else:
            for row, seq in zip(group.live, seqs, strict=True):
                row.kv = seq
        group.prompt = None
        if group.request.prompt_logprobs:
            prompt_ids = group.request.prompt_ids
            group.prompt_info = tuple(TokenInfo(t, lp) for t, lp in zip(prompt_ids[1:], group.prompt_lps, strict=True))

    def _sample(self) -> None:
        """Sample every row whose logits are ready; step every beam group whose beams all are."""
        rows: list[torch.Tensor] = []
        sampled: list[tuple[_Group, _Row]] = []
        for group in list(self._running.values()):
            if group.group_id not in self._running:  # preempted meanwhile (to make room for another's rows)
                continue
            if group.prompt is not None:
                if group.prompt.logits is None:
                    continue
                head, group.prompt.logits = group.prompt.logits, None
                self._fork_rows(group)
                if group.beam is not None:
                    self._beam_step(group, head.expand(len(group.beams), -1))
                else:
                    rows.append(head.expand(len(group.live), -1))
                    sampled.extend((group, row) for row in group.live)
                continue
            if group.beam is not None:
                # After a recompute the beams' chunks may end in different steps: wait for all of them.
                if all(seq.logits is not None for seq in group.beams):
                    stacked = torch.stack([seq.logits for seq in group.beams if seq.logits is not None])
                    for seq in group.beams:
                        seq.logits = None
                    self._beam_step(group, stacked)
                continue
            for row in group.live:
                if row.kv.logits is not None:
                    rows.append(row.kv.logits[None, :])
                    row.kv.logits = None
                    sampled.append((group, row))
        if not sampled:
            return
        batch = np.ascontiguousarray(torch.cat(rows).cpu().numpy(), dtype=np.float32)
        outputs = self.sampler.step(batch, [row.seq_id for _, row in sampled])
        finished: dict[int, tuple[_Group, set[int]]] = {}
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
                                 prompt_logprobs=group.prompt_info if first else None))  # fmt: skip
            self.generated_tokens += 1
            if finish is not None:
                finished.setdefault(group.group_id, (group, set()))[1].add(row.seq_id)
            else:
                row.kv.pending.append(token)
        for group, done in finished.values():
            for row in group.live:
                if row.seq_id in done:
                    self.sampler.remove_sequence(row.seq_id)
                    self.cache.release(row.kv.table)
            group.live = [row for row in group.live if row.seq_id not in done]
            if not group.live:
                if group in self._preempted:
                    with self._cond:
                        self._preempted.remove(group)
                self._finish(group)

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
            self._follow_beams(group, list(parent), list(tokens))
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
                                 prompt_logprobs=group.prompt_info if index == 0 else None))  # fmt: skip
        self._finish(group)

    def _follow_beams(self, group: _Group, parent: list[int], tokens: list[int]) -> None:
        """The next beams' sequences: a parent's sequence moves to its first child, further children fork it
        (sharing its full blocks); parents without children free theirs."""
        old = group.beams
        children = [parent.count(b) for b in range(len(old))]
        if not self._make_room(sum(max(0, c - 1) for c in children), protect=group):
            raise RuntimeError("the KV cache cannot hold this request's beams")
        taken: set[int] = set()
        new: list[_Seq] = []
        for p, t in zip(parent, tokens, strict=True):
            src = old[p]
            if p in taken:
                seq = _Seq(self.cache.fork(src.table, src.length), src.length)
            else:
                taken.add(p)
                seq = src
            seq.pending = [t]
            new.append(seq)
        for b, seq in enumerate(old):
            if b not in taken:
                self.cache.release(seq.table)
        group.beams = new
        group.beam_hist = [[*group.beam_hist[p], t] for p, t in zip(parent, tokens, strict=True)]

    def _gains_stop(self, request: EngineRequest, hist: list[int], token: int) -> bool:
        """Whether `hist + [token]` decodes to a text with a stop string that `hist`'s text does not have
        (only once `min_tokens` tokens are generated)."""
        if token in self.eos_token_ids or len(hist) + 1 < request.sampling.min_tokens:
            return False
        before = self.tokenizer.decode(hist, skip_special_tokens=True)
        after = self.tokenizer.decode([*hist, token], skip_special_tokens=True)
        common = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
                      min(len(before), len(after)))  # fmt: skip
        return any(after.find(s, max(0, common - len(s) + 1)) >= 0 for s in request.stop)
