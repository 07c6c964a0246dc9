"""The gRPC service: ChatService, ModelService, grpc.health.v1 and server reflection.

The servicer is thin: validate (params.py) -> render and tokenize (model.py, off the event loop) -> submit to the
engine -> convert events to protobuf. Every ServiceError becomes its gRPC status with google.rpc details in one
place (`_abort`). A client that goes away (CANCELLED) frees its sequence in the handler's `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from tokenwire.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc

from .engine import (
    BeamSettings,
    Engine,
    EngineConfig,
    EngineRequest,
    FinishReason,
    QueueFull,
    SequenceHandle,
    StepEvent,
    TokenInfo,
    TooLarge,
)
from .errors import ContextLengthExceeded, DeadlineExceeded, Overloaded, ServiceError, ServiceUnavailable
from .metrics import ServiceMetrics
from .model import ServedModel
from .params import ChatParams, Limits, validate
from .vocab import Vocabulary

log = logging.getLogger("tokenwire.service")

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
MODEL_SERVICE = models_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
HEALTH_NAMES = ("", CHAT_SERVICE, "readiness")

_FINISH = {
    FinishReason.STOP: chat_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: chat_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class ServiceState:
    """What the RPCs share: the model and engine once loaded, the limits."""

    limits: Limits
    served: ServedModel | None = None
    engine: Engine | None = None
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)

    def ready(self) -> tuple[ServedModel, Engine]:
        if self.served is None or self.engine is None or not self.engine.alive:
            raise ServiceUnavailable("the model is still loading (or the engine stopped); retry shortly")
        return self.served, self.engine


async def _abort(context: grpc.aio.ServicerContext[object, object], err: ServiceError) -> None:
    await context.abort_with_status(rpc_status.to_status(err.to_status()))


class ChatServicer(chat_pb2_grpc.ChatServiceServicer):
    """tokenwire.v1.ChatService."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def _prepare(
        self, request: chat_pb2.ChatCompletionRequest, streaming: bool
    ) -> tuple[ServedModel, Engine, ChatParams, EngineRequest]:
        served, engine = self.state.ready()
        params = validate(
            request,
            streaming=streaming,
            served_names=served.names,
            default_model=served.name,
            limits=self.state.limits,
            vocab_size=served.vocab_size,
        )
        prompt_ids = await asyncio.to_thread(served.render_prompt, params)
        # Guides compile off the event loop and off the engine's step loop (cached by spec in the vocabulary).
        guide = await asyncio.to_thread(served.compile_guide, params.guide) if params.guide is not None else None
        max_new = served.max_new_tokens(params, len(prompt_ids), self.state.limits.default_max_tokens)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        fields: dict[str, object] = {
            "request_id": request_id,
            "prompt_tokens": len(prompt_ids),
            "max_tokens": max_new,
            "stream": streaming,
        }
        if params.user is not None:
            fields["user"] = params.user
        if guide is not None and params.guide is not None:
            fields.update(guide_engine=guide.engine, guide_kind=params.guide.kind,
                          guide_backend_requested=params.guide.requested_backend)  # fmt: skip
            if guide.fallback_reason is not None:
                # Why our JSON Schema compiler left it to llguidance; quoted schema text elided.
                fields["guide_fallback"] = re.sub(r'"[^"]*"', '"…"', guide.fallback_reason)[:160]
        fields.update(params.bookkeeping)
        if params.log_prompt:
            fields["prompt"] = served.tokenizer.decode(prompt_ids)
        log.info("request", extra={"fields": fields})
        engine_request = EngineRequest(
            request_id,
            tuple(prompt_ids),
            max_new,
            params.sampling,
            top_logprobs=params.top_logprobs if params.logprobs else 0,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            prompt_logprobs=params.loglikelihood,
            guide=guide,
            rows=params.best_of if params.beam is None else 1,
            beam=None
            if params.beam is None
            else BeamSettings(params.beam.width, params.n, params.beam.length_penalty, params.beam.early_stopping),
        )
        return served, engine, params, engine_request

    def _submit(self, engine: Engine, req: EngineRequest) -> SequenceHandle:
        try:
            return engine.submit(req, asyncio.get_running_loop())
        except QueueFull as exc:
            self.state.metrics.rejected.labels("queue_full").inc()
            raise Overloaded(f"the server is busy ({exc}); retry shortly") from exc
        except TooLarge as exc:
            self.state.metrics.rejected.labels("too_large").inc()
            raise ContextLengthExceeded(str(exc), "max_tokens") from exc

    async def _events(self, handle: SequenceHandle, deadline: float | None) -> AsyncIterator[StepEvent]:
        """The request's events until it finishes; DeadlineExceeded past `deadline` (monotonic seconds).

        Latency histograms are observed here: time to the first token, between token events, to the end.
        """
        metrics = self.state.metrics
        started = last = time.monotonic()
        first = True
        while True:
            timeout = None if deadline is None else deadline - time.monotonic()
            try:
                if timeout is not None and timeout <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(anext(handle), timeout)
            except StopAsyncIteration:
                metrics.e2e.observe(time.monotonic() - started)
                return
            except TimeoutError:
                raise DeadlineExceeded("the request ran past its deadline (`inference_timeout` or the call's "
                                       "deadline); its sequences were freed") from None  # fmt: skip
            if event.tokens:
                now = time.monotonic()
                (metrics.ttft if first else metrics.itl).observe(now - (started if first else last))
                first, last = False, now
            if event.finish_reason is not None:
                metrics.finished.labels(event.finish_reason.value).inc()
            yield event

    async def CreateChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> chat_pb2.ChatCompletion:
        try:
            served, engine, params, req = await self._prepare(request, streaming=False)
        except ServiceError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        try:
            handle = self._submit(engine, req)
        except ServiceError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        rows = [_Choice() for _ in range(req.choices)]
        prompt_logprobs: tuple[TokenInfo, ...] = ()
        try:
            async for event in self._events(handle, _deadline(params.inference_timeout, context)):
                if event.error is not None:
                    await _abort(context, ServiceUnavailable(event.error))
                row = rows[event.index]
                row.texts.append(event.text)
                row.tokens.extend(event.tokens)
                prompt_logprobs = event.prompt_logprobs or prompt_logprobs
                row.finish = event.finish_reason or row.finish
        except ServiceError as err:
            await _abort(context, err)
        finally:
            handle.cancel()
            self.state.metrics.sync()
        count = sum(len(r.tokens) for r in rows)  # every generated token, best_of's discarded samples included
        if params.beam is None and params.best_of > params.n:  # keep the n with the highest mean token logprob
            rows = sorted(rows, key=lambda r: -sum(t.logprob for t in r.tokens) / max(len(r.tokens), 1))[: params.n]
        prompt_tokens = len(req.prompt_ids)
        return chat_pb2.ChatCompletion(
            id=req.request_id,
            object="chat.completion",
            created=int(time.time()),
            model=params.model,
            system_fingerprint=served.fingerprint,
            choices=[
                chat_pb2.Choice(
                    index=index,
                    message=chat_pb2.AssistantMessage(role="assistant", content="".join(row.texts)),
                    logprobs=_logprobs(served.vocab, row.tokens, params.top_logprobs) if params.logprobs else None,
                    finish_reason=_FINISH[row.finish or FinishReason.LENGTH],
                )
                for index, row in enumerate(rows)
            ],
            usage=chat_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=count, total_tokens=prompt_tokens + count
            ),
            prompt_logprobs=_logprobs(served.vocab, list(prompt_logprobs), 0).content,
        )

    async def StreamChatCompletion(
        self, request: chat_pb2.ChatCompletionRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        try:
            served, engine, params, req = await self._prepare(request, streaming=True)
        except ServiceError as err:
            await _abort(context, err)
            return
        try:
            handle = self._submit(engine, req)
        except ServiceError as err:
            await _abort(context, err)
            return
        created = int(time.time())

        def chunk(
            choices: list[chat_pb2.ChunkChoice], usage: chat_pb2.Usage | None = None
        ) -> chat_pb2.ChatCompletionChunk:
            return chat_pb2.ChatCompletionChunk(
                id=req.request_id,
                object="chat.completion.chunk",
                created=created,
                model=params.model,
                system_fingerprint=served.fingerprint,
                choices=choices,
                usage=usage,
            )

        count = 0
        # tokens whose text is held back (an incomplete character, a possible stop string), per choice: they are
        # sent with that choice's next delta
        pending: list[list[TokenInfo]] = [[] for _ in range(req.choices)]
        try:
            # The first chunk carries each choice's role (OpenAI sends it before any content). Beam search streams
            # its final beams once they are final.
            yield chunk([chat_pb2.ChunkChoice(index=i, delta=chat_pb2.Delta(role="assistant", content=""))
                         for i in range(req.choices)])  # fmt: skip
            async for event in self._events(handle, _deadline(params.inference_timeout, context)):
                if event.error is not None:
                    await _abort(context, ServiceUnavailable(event.error))
                count += len(event.tokens)
                held = pending[event.index]
                held.extend(event.tokens)
                if event.text or event.finish_reason is not None:
                    choice = _delta_choice(event)
                    if params.logprobs:
                        choice.logprobs.CopyFrom(_logprobs(served.vocab, held, params.top_logprobs))
                    held.clear()
                    yield chunk([choice])
            if params.include_usage:
                p = len(req.prompt_ids)
                yield chunk([], chat_pb2.Usage(prompt_tokens=p, completion_tokens=count, total_tokens=p + count))
        except ServiceError as err:
            await _abort(context, err)
        finally:
            handle.cancel()
            self.state.metrics.sync()


@dataclass
class _Choice:
    """One choice being collected for a unary answer."""

    texts: list[str] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: FinishReason | None = None


def _deadline(inference_timeout: float | None, context: grpc.aio.ServicerContext[object, object]) -> float | None:
    """The earlier of the request's `inference_timeout` and the call's own deadline, as monotonic seconds."""
    remaining = context.time_remaining()
    limits = [t for t in (inference_timeout, remaining) if t is not None]
    return time.monotonic() + min(limits) if limits else None


def _logprobs(vocab: Vocabulary, tokens: list[TokenInfo], top: int) -> chat_pb2.ChoiceLogprobs:
    """OpenAI's logprobs shape: the model's raw log-softmax of each token, and its best `top` alternatives."""
    return chat_pb2.ChoiceLogprobs(
        content=[
            chat_pb2.TokenLogprob(
                token=vocab.text(t.token_id),
                logprob=t.logprob,
                bytes=vocab.token_bytes[t.token_id],
                top_logprobs=[
                    chat_pb2.TopLogprob(token=vocab.text(i), logprob=lp, bytes=vocab.token_bytes[i])
                    for i, lp in t.top_logprobs[:top]
                ],
            )
            for t in tokens
        ]
    )


def _delta_choice(event: StepEvent) -> chat_pb2.ChunkChoice:
    delta = chat_pb2.Delta(content=event.text) if event.text else chat_pb2.Delta()
    finish = _FINISH[event.finish_reason] if event.finish_reason is not None else chat_pb2.FINISH_REASON_UNSPECIFIED
    return chat_pb2.ChunkChoice(index=event.index, delta=delta, finish_reason=finish)


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    """tokenwire.v1.ModelService."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def ListModels(
        self, request: models_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> models_pb2.ListModelsResponse:
        try:
            served, _ = self.state.ready()
        except ServiceError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from None
        return models_pb2.ListModelsResponse(
            object="list",
            data=[
                models_pb2.Model(
                    id=served.name,
                    object="model",
                    created=served.created,
                    owned_by="tokenwire",
                    max_context_length=served.context_length,
                    aliases=list(served.aliases),
                )
            ],
        )


class Service:
    """The whole gRPC server: build it, `start()`, `load()` the model, `stop()`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 50051,
        limits: Limits | None = None,
        engine: EngineConfig | None = None,
    ) -> None:
        self.state = ServiceState(limits or Limits())
        self.engine_config = engine or EngineConfig()
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.state.limits.max_request_bytes + 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # Accept the gateway's keepalive pings (every 60 s) on streams that are silent while they wait in
                # the queue; the default minimum (5 min) answers them with GOAWAY "too_many_pings".
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            ]
        )
        chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(self.state), self.server)
        models_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.state), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (CHAT_SERVICE, MODEL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {host}:{port}")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        """Listen; health answers NOT_SERVING until the model is loaded (liveness SERVING at once)."""
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        await self.server.start()
        log.info("gRPC service listening", extra={"fields": {"address": self.address}})

    async def attach(self, served: ServedModel) -> None:
        """Start the engine on a loaded model and report SERVING."""
        engine = Engine(
            served.model,
            served.tokenizer,
            vocab_size=served.vocab_size,
            eos_token_ids=served.eos_token_ids,
            config=self.engine_config,
        )
        engine.start()
        self.state.metrics.bind(engine)
        self.state.served, self.state.engine = served, engine
        for name in HEALTH_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"fields": {"model": served.name, "address": self.address}})

    async def stop(self, grace: float = 5.0) -> None:
        """Graceful: NOT_SERVING, let in-flight RPCs finish within `grace`, then stop the engine."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.state.engine is not None:
            await asyncio.to_thread(self.state.engine.stop)
