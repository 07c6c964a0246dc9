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
    p.add_argument(
        "--max-tokens-default",
        type=int,
        default=256,
        help="max_tokens when a request sets none (capped by the remaining context)",
    )


def _http_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--http-host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)


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
    from .params import Limits
    from .server import Service

    service = Service(
        host=args.grpc_host, port=args.grpc_port, limits=Limits(default_max_tokens=args.max_tokens_default)
    )
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
        http = _http_server(f"{args.grpc_host}:{service.port}", args.http_host, args.http_port)
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
    log.info("shutting down")
    if http is not None and gateway_task is not None:
        http.should_exit = True
        await gateway_task
    await service.stop()


def _http_server(upstream: str, host: str, port: int) -> Any:
    import uvicorn

    from gateway.app import GatewayConfig, create_app

    class _Server(uvicorn.Server):
        """uvicorn without its own signal capture: the command's asyncio handlers own SIGINT/SIGTERM."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    app = create_app(GatewayConfig(upstream=upstream))
    return _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))


async def _run_gateway(args: argparse.Namespace) -> None:
    server = _http_server(args.upstream, args.http_host, args.http_port)
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
