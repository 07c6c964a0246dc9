"""The gateway's ASGI app: REST + SSE in front of the gRPC service.

Routes: POST /v1/chat/completions (and the hosted providers' aliases), GET /v1/models, GET /health.
`stream: true` calls the server-streaming RPC; the gateway waits for its first message before answering 200, so
a request the service rejects still gets its real status, then writes `data: {chunk}\\n\\n` ... `data: [DONE]\\n\\n`.
A failure after the 200 becomes a `data: {"error": ...}` event before `[DONE]`. When the HTTP client goes away,
the response generator is cancelled and so is the gRPC call, which frees the sequence in the engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tokenwire.v1 import chat_pb2, chat_pb2_grpc, models_pb2, models_pb2_grpc

from .errors import error_body, from_rpc_error, validation_body
from .transcode import TranscodeError, chunk_json, completion_json, models_json, parse_request

log = logging.getLogger("tokenwire.gateway")

DEFAULT_CHAT_PATHS = (
    "/v1/chat/completions",
    "/ai/chat/completions",
    "/v2/ai/chat/completions",
    "/v4/beta/chat/completions",
)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class GatewayConfig:
    """How the gateway reaches the service and what it exposes."""

    upstream: str = "127.0.0.1:50051"
    chat_paths: Sequence[str] = DEFAULT_CHAT_PATHS
    max_body_bytes: int = 16 * 1024 * 1024
    channel_options: list[tuple[str, Any]] = field(
        default_factory=lambda: [
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
    )


class _Upstream:
    """The gRPC channel and stubs, created inside the server's event loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self.channel = grpc.aio.insecure_channel(config.upstream, options=config.channel_options)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.models = models_pb2_grpc.ModelServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def _rpc_error_response(err: grpc.aio.AioRpcError, request_id: str) -> JSONResponse:
    status, body, headers = from_rpc_error(err)
    return _json(status, body, {**headers, "x-request-id": request_id})


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def create_app(config: GatewayConfig | None = None) -> Starlette:
    """Build the gateway app. The gRPC channel opens on startup and closes on shutdown."""
    cfg = config or GatewayConfig()
    state: dict[str, _Upstream] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["up"] = _Upstream(cfg)
        log.info(
            "gateway ready (open mode: no API key is configured)",
            extra={"fields": {"upstream": cfg.upstream, "paths": list(cfg.chat_paths)}},
        )
        try:
            yield
        finally:
            await state["up"].channel.close()

    async def chat_completions(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        rid = {"x-request-id": request_id}
        raw = await request.body()
        if len(raw) > cfg.max_body_bytes:
            return _json(413, error_body(413, f"request body over {cfg.max_body_bytes} bytes"), rid)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _json(422, validation_body([(("body",), f"JSON decode error: {exc}", "json_invalid")]), rid)
        stream = isinstance(body, dict) and body.get("stream") is True
        try:
            pb = parse_request(body)
        except TranscodeError as exc:
            return _json(422, validation_body(exc.violations), rid)
        metadata = (("x-request-id", request_id),)
        up = state["up"]
        if not stream:
            try:
                result = await up.chat.CreateChatCompletion(pb, metadata=metadata)
            except grpc.aio.AioRpcError as err:
                return _rpc_error_response(err, request_id)
            return _json(200, completion_json(result), rid)
        call = up.chat.StreamChatCompletion(pb, metadata=metadata)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as err:
            return _rpc_error_response(err, request_id)
        if first is grpc.aio.EOF:  # the stream ended without a message: report its status
            code = await call.code()
            return _json(502, error_body(502, f"the service ended the stream without data ({code.name})"), rid)
        return StreamingResponse(_stream(call, first), media_type="text/event-stream", headers={**SSE_HEADERS, **rid})

    async def _stream(call: Any, first: chat_pb2.ChatCompletionChunk) -> AsyncIterator[bytes]:
        try:
            yield _sse(chunk_json(first))
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                yield _sse(chunk_json(msg))
        except grpc.aio.AioRpcError as err:
            status, body, _ = from_rpc_error(err)
            yield _sse(body if "error" in body else error_body(status, str(body)))
        finally:
            call.cancel()  # no-op when the stream already ended; frees the sequence when the client left
        yield _sse("[DONE]")

    async def list_models(request: Request) -> Response:
        try:
            result = await state["up"].models.ListModels(models_pb2.ListModelsRequest())
        except grpc.aio.AioRpcError as err:
            return _rpc_error_response(err, request.headers.get("x-request-id", ""))
        return _json(200, models_json(result))

    async def health(request: Request) -> Response:
        try:
            reply = await state["up"].health.Check(
                health_pb2.HealthCheckRequest(service=chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name),
                timeout=2.0,
            )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError as err:
            return _json(503, {"status": "unavailable", "detail": err.code().name})
        return _json(200 if serving else 503, {"status": "ok" if serving else "not_serving"})

    routes = [Route(p, chat_completions, methods=["POST"]) for p in cfg.chat_paths]
    routes += [Route("/v1/models", list_models, methods=["GET"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)
