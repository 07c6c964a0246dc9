"""The gateway's ASGI app: REST + SSE in front of the gRPC service.

Routes: POST /v1/chat/completions and the hosted providers' aliases (configurable), GET /v1/models, GET /health
(the service's gRPC health), GET /metrics (Prometheus), GET /openapi.json (derived from the proto).

`stream: true` calls the server-streaming RPC. The gateway waits for its first message before answering 200, so a
request the service rejects still gets its real status; then it writes `data: {chunk}` events and `data: [DONE]`,
with `: ping` comments during long silences. A failure after the 200 becomes a `data: {"error": ...}` event before
`[DONE]`. When the HTTP client goes away, the response generator is cancelled and so is the gRPC call, which
frees the sequence in the engine. The gateway holds no model logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service import __version__
from tokenwire.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc

from .auth import ApiKeys
from .errors import error_body, from_rpc_error, validation_body
from .metrics import GatewayMetrics
from .openapi import document
from .transcode import TranscodeError, chunk_json, completion_json, models_json, parse_request

log = logging.getLogger("tokenwire.gateway")

DEFAULT_CHAT_PATHS = (
    "/v1/chat/completions",
    "/ai/chat/completions",
    "/v2/ai/chat/completions",
    "/v4/beta/chat/completions",
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
MiB = 1024 * 1024
Handler = Callable[[Scope, Receive, dict[str, str]], Awaitable[Response]]


@dataclass
class GatewayConfig:
    """How the gateway reaches the service and what it exposes."""

    upstream: str = "127.0.0.1:50051"  # any grpc target: host:port, or dns:///name:port for a pool of pods
    chat_paths: Sequence[str] = DEFAULT_CHAT_PATHS
    max_body_bytes: int = 4 * MiB  # the same value bounds the gRPC messages both ways
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    sse_ping_seconds: float = 15.0
    request_timeout_seconds: float | None = None  # gRPC deadline for unary calls; None = none

    def channel_options(self) -> list[tuple[str, Any]]:
        limit = self.max_body_bytes + MiB
        return [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", 64 * MiB),
            # A headless Service resolves to every pod: spread calls over them instead of pinning one.
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_permit_without_calls", 0),
        ]


class _Upstream:
    """The gRPC channel and stubs, created inside the server's event loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.channel = grpc.aio.insecure_channel(config.upstream, options=config.channel_options())
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class _JSONResponse(Response):
    """JSONResponse's bytes and headers (the same rendering: compact, UTF-8, no NaN), with less machinery.

    Every chat response but a stream is one of these, so what it costs is on every request's path.
    """

    media_type = "application/json"

    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.status_code = status
        self.background = None
        self.body = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        raw += [(b"content-length", str(len(self.body)).encode()), (b"content-type", b"application/json")]
        self.raw_headers = raw

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a (lower-case) request header, as Starlette's Headers.get gives it."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes (checked on the header and while reading).

    ClientDisconnect when the client leaves first (as Starlette's Request.stream raises it)."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def create_app(config: GatewayConfig | None = None) -> Starlette:
    """Build the gateway app. The gRPC channel opens on startup and closes on shutdown."""
    cfg = config or GatewayConfig()
    metrics = GatewayMetrics()
    state: dict[str, _Upstream] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["up"] = _Upstream(cfg)
        fields = {"upstream": cfg.upstream, "paths": list(cfg.chat_paths), "api_keys": len(cfg.api_keys.keys)}
        if cfg.api_keys.open:
            log.warning("gateway is OPEN: no API key is configured (set TOKENWIRE_API_KEYS or --api-keys-file)",
                        extra={"fields": fields})  # fmt: skip
        else:
            log.info("gateway requires an API key", extra={"fields": fields})
        try:
            yield
        finally:
            await state["up"].channel.close(None)

    def guarded(route: str, handler: Handler) -> _Guarded:
        """Request id, auth and metrics around a handler, as an ASGI app."""
        return _Guarded(route, handler, cfg.api_keys, metrics)

    async def chat_completions(scope: Scope, receive: Receive, rid: dict[str, str]) -> Response:
        raw = await _read_body(scope, receive, cfg.max_body_bytes)
        if raw is None:
            message = f"the request body is over {cfg.max_body_bytes} bytes"
            return _JSONResponse(413, error_body(413, message, code="request_too_large"), rid)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _JSONResponse(422, validation_body([(("body",), f"JSON decode error: {exc}", "json_invalid")]), rid)
        stream = isinstance(body, dict) and body.get("stream") is True
        try:
            pb = parse_request(body)
        except TranscodeError as exc:
            return _JSONResponse(422, validation_body(exc.violations), rid)
        metadata = (("x-request-id", rid["x-request-id"]),)
        # `inference_timeout` becomes the gRPC deadline (expiry: DEADLINE_EXCEEDED -> 504); the service enforces it
        # too, for gRPC clients that send it without a deadline.
        timeout = pb.inference_timeout if pb.HasField("inference_timeout") and pb.inference_timeout > 0 else None
        timeout = timeout or cfg.request_timeout_seconds
        up = state["up"]
        if not stream:
            try:
                result = await up.chat.CreateChatCompletion(pb, metadata=metadata, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                return _rpc_error_response(err, rid)
            return _JSONResponse(200, completion_json(result), rid)
        call = up.chat.StreamChatCompletion(pb, metadata=metadata, timeout=timeout)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as err:
            return _rpc_error_response(err, rid)
        if first is grpc.aio.EOF:  # the stream ended without a message: report its status
            code = await call.code()
            return _JSONResponse(502, error_body(502, f"the service ended the stream without data ({code.name})"), rid)
        return StreamingResponse(_stream(call, first), media_type="text/event-stream", headers={**SSE_HEADERS, **rid})

    def _rpc_error_response(err: grpc.aio.AioRpcError, rid: dict[str, str]) -> Response:
        status, body, headers = from_rpc_error(err)
        return _JSONResponse(status, body, {**headers, **rid})

    async def _stream(call: Any, first: chat_pb2.ChatCompletionChunk) -> AsyncIterator[bytes]:
        metrics.streams.inc()
        finished = False
        pending: asyncio.Future[Any] | None = None
        try:
            yield _sse(chunk_json(first))
            metrics.events.inc()
            while True:
                pending = asyncio.ensure_future(call.read())
                while not pending.done():
                    done, _ = await asyncio.wait({pending}, timeout=cfg.sse_ping_seconds)
                    if not done:
                        yield b": ping\n\n"  # an SSE comment: keeps proxies from closing a silent stream
                msg = pending.result()
                pending = None
                if msg is grpc.aio.EOF:
                    break
                yield _sse(chunk_json(msg))
                metrics.events.inc()
            finished = True
        except grpc.aio.AioRpcError as err:
            status, body, _ = from_rpc_error(err)
            yield _sse(body if "error" in body else error_body(status, str(body)))
            finished = True
        finally:
            metrics.streams.dec()
            if pending is not None and not pending.done():
                pending.cancel()
            if not finished:
                metrics.disconnects.inc()
            call.cancel()  # no-op when the stream already ended; frees the sequence when the client left
        yield _sse("[DONE]")

    async def list_models(scope: Scope, receive: Receive, rid: dict[str, str]) -> Response:
        try:
            result = await state["up"].models.ListModels(models_pb2.ListModelsRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            return _rpc_error_response(err, rid)
        return _JSONResponse(200, models_json(result), rid)

    async def health(request: Request) -> Response:
        try:
            reply = await state["up"].health.Check(health_pb2.HealthCheckRequest(service=CHAT_SERVICE), timeout=2.0)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as err:
            return _JSONResponse(503, {"status": "unavailable", "detail": err.code().name})
        return _JSONResponse(200 if serving else 503, {"status": "ok" if serving else "not_serving"})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi_body = json.dumps(document(tuple(cfg.chat_paths), __version__)).encode()  # built once

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type="application/json")

    chat = guarded("chat", chat_completions)
    routes = [Route(p, chat, methods=["POST"]) for p in cfg.chat_paths]
    routes += [
        Route("/v1/models", guarded("models", list_models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = _GatewayApp(chat, cfg.chat_paths, routes=routes, lifespan=lifespan)
    app.state.metrics = metrics
    return app


class _Guarded:
    """An ASGI app: request id, auth and metrics around a `handler(scope, receive, rid) -> Response`.

    The metrics of a plain response are recorded once it is sent (its latency is still the time to the response),
    so they are not on the request's path; a stream's are recorded before its events flow.
    """

    def __init__(
        self,
        route: str,
        handler: Handler,
        api_keys: ApiKeys,
        metrics: GatewayMetrics,
    ) -> None:
        self.route = route
        self.handler = handler
        self.api_keys = api_keys
        self.metrics = metrics
        self._children: dict[int, tuple[Any, Any]] = {}  # status -> (requests counter, latency histogram)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        # 32 random hex digits, as uuid4().hex gave, without building a UUID (a third of the time on a cold core)
        rid = {"x-request-id": _header(scope, b"x-request-id") or f"req-{os.urandom(16).hex()}"}
        denied = None if self.api_keys.open else self.api_keys.check(Headers(scope=scope))
        if denied is not None:
            error = {"message": denied, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            response: Response = _JSONResponse(401, {"error": error}, rid)
        else:
            try:
                response = await self.handler(scope, receive, rid)
            except ClientDisconnect:
                response = _JSONResponse(499, error_body(499, "the client closed the request"), rid)
        elapsed = time.perf_counter() - started
        if isinstance(response, StreamingResponse):
            self._record(response.status_code, elapsed)
            await response(scope, receive, send)
            return
        try:
            await response(scope, receive, send)
        finally:
            self._record(response.status_code, elapsed)

    def _record(self, status: int, elapsed: float) -> None:
        child = self._children.get(status)
        if child is None:
            labels = self.metrics.requests.labels(self.route, str(status)), self.metrics.latency.labels(self.route)
            child = self._children[status] = labels
        child[0].inc()
        child[1].observe(elapsed)


class _GatewayApp(Starlette):
    """Starlette, with `POST <chat path>` sent straight to its endpoint.

    The chat routes are the hot path: on a machine whose cores idle between requests, every layer a request
    crosses costs far more than its warm cost (cold caches), so they skip Starlette's middleware stack and
    router and go straight to the same endpoint. Any other method or path (and any request under a root_path)
    takes the ordinary Starlette route, so 404, 405 and the other routes behave as before.
    """

    def __init__(self, chat: _Guarded, chat_paths: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._chat = chat
        self._chat_paths = frozenset(chat_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self._chat_paths
                and not scope.get("root_path")):  # fmt: skip
            scope["app"] = self
            await self._chat(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
