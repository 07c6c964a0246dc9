"""The `tokenwire` command: serve (gRPC), gateway (HTTP), up (both), tiny-model export."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__, logs

log = logging.getLogger("tokenwire.cli")

EPILOG = """\
examples:
  tokenwire up                                  # gRPC :50051 + HTTP :8000 on the embedded random model
  tokenwire up --model ./my-model-dir           # a real transformers model directory (or a hub id)
  tokenwire serve --grpc-port 50051             # the gRPC service alone
  tokenwire gateway --upstream 127.0.0.1:50051  # the HTTP gateway alone, in front of a service
  tokenwire tiny-model export ./tiny            # write the embedded model as a transformers directory

then:
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="transformers model directory or hub id (default: the embedded random-weight model)",
    )
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model`")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file (overrides the tokenizer's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--grpc-host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="the largest max_tokens a request may ask")
    p.add_argument("--max-messages", type=int, default=1024, help="the most messages a request may carry")
    p.add_argument("--max-n", type=int, default=16, help="the largest `n` a request may ask")
    p.add_argument("--max-best-of", type=int, default=16, help="the largest `best_of` (or beam width)")
    p.add_argument("--max-stop", type=int, default=4, help="the most stop strings a request may carry")
    p.add_argument("--max-running", type=int, default=64, help="requests stepped together by the engine")
    p.add_argument(
        "--max-waiting",
        type=int,
        default=256,
        help="requests that may wait beyond those; more get 429 (RESOURCE_EXHAUSTED)",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=16384,
        help="KV cache size in tokens (paged, 16 per block); admission waits and preemption frees when it is full",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=1024,
        help="tokens per forward pass: every decoding sequence's one token, then prompt chunks (chunked prefill)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port (off by default)"
    )
    p.add_argument(
        "--no-request-chat-template",
        action="store_true",
        help="refuse per-request `chat_template` (they are rendered sandboxed either way)",
    )
    p.add_argument(
        "--max-string-chars", type=int, default=1_000_000, help="the longest message content or name, in characters"
    )
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="the largest gRPC request message")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=2.0,
        help="on SIGTERM, report NOT_SERVING this long before refusing new RPCs (lets load balancers notice)",
    )
    p.add_argument(
        "--shutdown-grace", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests get to finish"
    )
    p.add_argument(
        "--max-tokens-default",
        type=int,
        default=256,
        help="max_tokens when a request sets none (capped by the remaining context)",
    )


def _http_args(p: argparse.ArgumentParser) -> None:
    from gateway.app import DEFAULT_CHAT_PATHS

    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument(
        "--api-keys-file",
        default=None,
        help="file with one API key per line (also: env TOKENWIRE_API_KEYS=k1,k2); none = open gateway",
    )
    p.add_argument(
        "--chat-path",
        action="append",
        default=None,
        help=f"a chat completions route (repeatable); default: {' '.join(DEFAULT_CHAT_PATHS)}",
    )
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    p.add_argument("--sse-ping-seconds", type=float, default=15.0, help="SSE keep-alive comment interval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire",
        description="tokenwire: an OpenAI-compatible chat completions service (gRPC + REST/SSE).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokenwire {__version__}")
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gRPC service",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(serve)
    gw = sub.add_parser("gateway", help="run the HTTP gateway in front of a gRPC service")
    gw.add_argument("--upstream", default="127.0.0.1:50051", help="the service's gRPC address HOST:PORT")
    _http_args(gw)
    up = sub.add_parser(
        "up",
        help="run the gRPC service and the HTTP gateway together",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(up)
    _http_args(up)
    tiny = sub.add_parser("tiny-model", help="the embedded model")
    tiny_sub = tiny.add_subparsers(dest="tiny_command", required=True)
    export = tiny_sub.add_parser("export", help="write the embedded model as a transformers directory")
    export.add_argument("dest", type=Path)
    export.add_argument("--seed", type=int, default=0)
    return parser


async def _run_service(args: argparse.Namespace, with_gateway: bool) -> None:
    from . import model as model_mod
    from .engine import EngineConfig
    from .params import Limits
    from .server import Service

    limits = Limits(
        default_max_tokens=args.max_tokens_default,
        max_tokens_cap=args.max_tokens_limit,
        max_messages=args.max_messages,
        max_string_chars=args.max_string_chars,
        max_request_bytes=args.max_request_bytes,
        max_n=args.max_n,
        max_best_of=args.max_best_of,
        max_stop=args.max_stop,
        allow_request_chat_template=not args.no_request_chat_template,
    )
    engine = EngineConfig(max_running=args.max_running, max_waiting=args.max_waiting,
                          kv_cache_tokens=args.kv_cache_tokens, max_batch_tokens=args.max_batch_tokens)  # fmt: skip
    service = Service(host=args.grpc_host, port=args.grpc_port, limits=limits, engine=engine)
    if args.metrics_port is not None:
        port = service.state.metrics.serve(args.grpc_host, args.metrics_port)
        log.info("service metrics", extra={"fields": {"url": f"http://{args.grpc_host}:{port}/metrics"}})
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    served = await asyncio.to_thread(
        model_mod.load,
        args.model,
        served_model_name=args.served_model_name,
        chat_template_path=args.chat_template,
        dtype=args.dtype,
        device=args.device,
    )
    await service.attach(served)
    gateway_task: asyncio.Task[None] | None = None
    http = None
    if with_gateway:
        http = _http_server(f"{args.grpc_host}:{service.port}", args)
        gateway_task = asyncio.create_task(http.serve())
        log.info(
            "ready",
            extra={
                "fields": {
                    "http": f"http://{args.http_host}:{args.http_port}/v1/chat/completions",
                    "grpc": service.address,
                    "model": served.name,
                }
            },
        )
    await stop.wait()
    log.info("shutting down", extra={"fields": {"drain_s": args.drain_seconds, "grace_s": args.shutdown_grace}})
    await service.health.enter_graceful_shutdown()  # readiness NOT_SERVING first, so traffic moves away
    await asyncio.sleep(args.drain_seconds)
    if http is not None and gateway_task is not None:
        http.should_exit = True
        await gateway_task
    await service.stop(grace=args.shutdown_grace)


def _http_server(upstream: str, args: argparse.Namespace) -> Any:
    import uvicorn

    from gateway.app import DEFAULT_CHAT_PATHS, GatewayConfig, create_app
    from gateway.auth import ApiKeys

    class _Server(uvicorn.Server):
        """uvicorn without its own signal capture: the command's asyncio handlers own SIGINT/SIGTERM."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = GatewayConfig(
        upstream=upstream,
        chat_paths=tuple(args.chat_path or DEFAULT_CHAT_PATHS),
        max_body_bytes=args.max_body_bytes,
        api_keys=ApiKeys.load(args.api_keys_file),
        sse_ping_seconds=args.sse_ping_seconds,
    )
    app = create_app(config)
    return _Server(uvicorn.Config(app, host=args.http_host, port=args.http_port, log_level="warning", lifespan="on"))


async def _run_gateway(args: argparse.Namespace) -> None:
    server = _http_server(args.upstream, args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(server.serve())
    log.info(
        "gateway listening",
        extra={"fields": {"http": f"http://{args.http_host}:{args.http_port}", "upstream": args.upstream}},
    )
    await stop.wait()
    server.should_exit = True
    await task


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    if args.command == "tiny-model":
        from . import tiny_model

        dest = tiny_model.export(args.dest, seed=args.seed)
        print(f"wrote the embedded model (random weights, seed {args.seed}) to {dest}")
        return 0
    if args.command == "serve":
        asyncio.run(_run_service(args, with_gateway=False))
    elif args.command == "up":
        asyncio.run(_run_service(args, with_gateway=True))
    elif args.command == "gateway":
        asyncio.run(_run_gateway(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
