"""The engine loop: admit new sequences, run one forward per sequence, sample all rows in one sampler call.

Threading: the loop runs on its own thread, never on the asyncio event loop (health checks stay responsive).
Requests come in through `submit()` (thread-safe); each sequence's events go out through its own asyncio queue
via `loop.call_soon_threadsafe`. `cancel()` (also thread-safe) frees a sequence at the start of the next step.

One step:
1. take newly submitted sequences and drop cancelled ones (freeing their KV cache and sampler state);
2. for every running sequence, one forward: the whole prompt for a new one (prefill), else its last token;
3. stack the last-position logits into one `[batch, vocab]` float32 array and call `Sampler.step` once;
4. per sequence: append the token, detokenize incrementally, decide whether it finished (EOS, max tokens),
   and push a `StepEvent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
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
    """Why a sequence ended."""

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
    """What one step produced for one sequence."""

    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_logprobs: tuple[TokenInfo, ...] | None = None  # on the first event, when asked for


@dataclass(frozen=True)
class EngineRequest:
    """A sequence to generate: already tokenized and validated."""

    request_id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    top_logprobs: int = 0  # alternatives to report per token (the chosen token's logprob is always reported)
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text
    include_stop_str_in_output: bool = False
    prompt_logprobs: bool = False  # logprobs of every prompt token but the first


@dataclass
class _Sequence:
    seq_id: int
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[StepEvent]
    detok: IncrementalDetokenizer
    stops: StopMatcher
    cache: Any = None
    output_ids: list[int] = field(default_factory=list)
    pending_text: str = ""  # decoded this step, not yet through the stop matcher

    def emit(self, event: StepEvent) -> None:
        # RuntimeError: the consumer's event loop is closed, nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class SequenceHandle:
    """The consumer's side of one sequence: an async iterator of events and a cancel()."""

    def __init__(self, engine: Engine, seq_id: int, queue: asyncio.Queue[StepEvent]) -> None:
        self._engine = engine
        self.seq_id = seq_id
        self._queue = queue
        self.finished = False

    def __aiter__(self) -> SequenceHandle:
        return self

    async def __anext__(self) -> StepEvent:
        if self.finished:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event.finish_reason is not None or event.error is not None:
            self.finished = True
        return event

    def cancel(self) -> None:
        """Free the sequence (no-op when it already finished)."""
        if not self.finished:
            self.finished = True
            self._engine.cancel(self.seq_id)


class Engine:
    """Owns the model runner, the sampler and the step loop thread."""

    def __init__(self, model: Any, tokenizer: Any, *, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.runner = ModelRunner(model)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.sampler = sampler_rs.Sampler(vocab_size)
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._incoming: deque[_Sequence] = deque()
        self._cancelled: set[int] = set()
        self._running: dict[int, _Sequence] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.cancellations = 0

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
        queue: asyncio.Queue[StepEvent] = asyncio.Queue()
        stops = StopMatcher(request.stop, request.include_stop_str_in_output)
        seq = _Sequence(next(self._ids), request, loop, queue, IncrementalDetokenizer(self.tokenizer), stops)
        with self._cond:
            self._incoming.append(seq)
            self._cond.notify_all()
        return SequenceHandle(self, seq.seq_id, queue)

    def cancel(self, seq_id: int) -> None:
        with self._cond:
            self._cancelled.add(seq_id)
            self._cond.notify_all()

    def num_running(self) -> int:
        """Sequences admitted and not yet finished or freed (incoming ones included)."""
        with self._cond:
            return len(self._running) + len(self._incoming)

    # -- the loop --------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._cond:
            while not self._stop and not self._incoming and not self._running and not self._cancelled:
                self._cond.wait()
            incoming = list(self._incoming)
            self._incoming.clear()
            cancelled = set(self._cancelled)
            self._cancelled.clear()
        for seq in incoming:
            self.sampler.add_sequence(seq.seq_id, self._sampler_params(seq.request), list(seq.request.prompt_ids))
            self._running[seq.seq_id] = seq
        for seq_id in cancelled:
            if self._free(seq_id):
                self.cancellations += 1

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

    def _free(self, seq_id: int) -> bool:
        seq = self._running.pop(seq_id, None)
        if seq is None:
            return False
        seq.cache = None
        if seq_id in self.sampler:
            self.sampler.remove_sequence(seq_id)
        return True

    def _loop(self) -> None:
        while True:
            self._admit()
            if self._stop:
                break
            if not self._running:
                continue
            try:
                self._step()
            except Exception as exc:  # never let one bad step kill the engine: fail the sequences in it
                log.exception("engine step failed")
                for seq_id, seq in list(self._running.items()):
                    seq.emit(StepEvent("", (), error=f"engine error: {type(exc).__name__}: {exc}"))
                    self._free(seq_id)
        for seq_id, seq in list(self._running.items()):
            seq.emit(StepEvent("", (), error="the engine is shutting down"))
            self._free(seq_id)

    def _step(self) -> None:
        seqs = list(self._running.values())
        rows: list[torch.Tensor] = []
        prompt_lps: dict[int, tuple[TokenInfo, ...]] = {}
        for seq in seqs:
            if seq.cache is None:  # prefill
                prompt = list(seq.request.prompt_ids)
                logits, seq.cache, lps = self.runner.prefill(prompt, seq.request.prompt_logprobs)
                if lps is not None:
                    prompt_lps[seq.seq_id] = tuple(TokenInfo(t, lp) for t, lp in zip(prompt[1:], lps, strict=True))
            else:
                logits, seq.cache = self.runner.forward([seq.output_ids[-1]], seq.cache)
            rows.append(logits)
        batch = torch.stack(rows).cpu().numpy()
        outputs = self.sampler.step(np.ascontiguousarray(batch, dtype=np.float32), [s.seq_id for s in seqs])
        self.steps += 1
        for seq, out in zip(seqs, outputs, strict=True):
            token = int(out.token_id)
            seq.output_ids.append(token)
            info = TokenInfo(token, float(out.logprob), tuple((int(t), float(lp)) for t, lp in out.top_logprobs))
            finish = self._advance(seq, token)
            text = seq.stops.push(seq.pending_text, can_stop=len(seq.output_ids) >= seq.request.sampling.min_tokens)
            seq.pending_text = ""
            if seq.stops.stopped:
                finish = FinishReason.STOP
            elif finish is not None:
                text += seq.stops.flush()
            seq.emit(StepEvent(text, (info,), finish, prompt_logprobs=prompt_lps.get(seq.seq_id)))
            if finish is not None:
                self._free(seq.seq_id)

    def _advance(self, seq: _Sequence, token: int) -> FinishReason | None:
        """Detokenize the new token into `seq.pending_text`; say whether EOS or the length limit ended it."""
        if token in self.eos_token_ids:
            seq.pending_text = seq.detok.flush()
            return FinishReason.STOP
        seq.pending_text = seq.detok.push(token)
        if len(seq.output_ids) >= seq.request.max_new_tokens:
            seq.pending_text += seq.detok.flush()
            return FinishReason.LENGTH
        return None
