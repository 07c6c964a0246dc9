"""Shared fixtures: a tiny model exported to disk, and the real gRPC service + HTTP gateway on loopback ports.

The servers run in this process, on their own thread and event loop, so tests talk to them over real sockets
with real clients (grpcio stubs, the openai SDK, httpx) and can still look at the engine's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Small enough for 2 CPU cores, same architecture and tokenizer as the embedded default.
TEST_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service import tiny_model

    return tiny_model.export(tmp_path_factory.mktemp("tiny-model"), seed=0, overrides=TEST_MODEL)


@dataclass
class Servers:
    service: Any  # service.server.Service
    grpc_address: str
    http_url: str
    model_name: str
    loop: asyncio.AbstractEventLoop

    def wait_idle(self, timeout: float = 10.0) -> int:
        """Wait until the engine runs no sequence; return how many still run at the end."""
        engine = self.service.state.engine
        deadline = time.monotonic() + timeout
        while engine.num_running() and time.monotonic() < deadline:
            time.sleep(0.02)
        return int(engine.num_running())


@contextlib.contextmanager
def start_stack(
    model_dir: Path, name: str = "tiny-test", default_max_tokens: int = 32, **engine_config: Any
) -> Iterator[Servers]:
    """The real service and gateway on free loopback ports, on a thread of their own, until the block ends."""
    import uvicorn

    from gateway.app import GatewayConfig, create_app
    from service import model as model_mod
    from service.engine import EngineConfig
    from service.params import Limits
    from service.server import Service

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}
    http_port = free_port()

    async def main() -> None:
        service = Service(port=0, limits=Limits(default_max_tokens=default_max_tokens),
                          engine=EngineConfig(**engine_config))  # fmt: skip
        await service.start()
        served = await asyncio.to_thread(model_mod.load, str(model_dir), served_model_name=name)
        await service.attach(served)
        app = create_app(GatewayConfig(upstream=service.address))
        http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning"))
        task = asyncio.create_task(http.serve())
        while not http.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
            await asyncio.sleep(0.01)
        box.update(service=service, stop=asyncio.Event())
        ready.set()
        await box["stop"].wait()
        http.should_exit = True
        await task
        await service.stop(grace=1.0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(120), "servers did not start"
    try:
        yield Servers(box["service"], box["service"].address, f"http://127.0.0.1:{http_port}", name, loop)
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)


@pytest.fixture(scope="session")
def servers(tiny_model_dir: Path) -> Iterator[Servers]:
    with start_stack(tiny_model_dir) as stack:
        yield stack


@pytest.fixture()
def grpc_channel(servers: Servers) -> Iterator[Any]:
    import grpc

    with grpc.insecure_channel(servers.grpc_address) as channel:
        yield channel


@dataclass
class ExtraGateway:
    url: str
    app: Any


@pytest.fixture(scope="session")
def make_gateway(servers: Servers) -> Iterator[Any]:
    """Start more gateways (other configs) on the servers' event loop, in front of the same service."""
    import uvicorn

    from gateway.app import GatewayConfig, create_app

    started: list[Any] = []

    def make(**config: Any) -> ExtraGateway:
        port = free_port()
        app = create_app(GatewayConfig(upstream=servers.grpc_address, **config))
        http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))

        async def start() -> None:
            task = asyncio.ensure_future(http.serve())
            while not http.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
                await asyncio.sleep(0.01)
            started.append((http, task))

        asyncio.run_coroutine_threadsafe(start(), servers.loop).result(30)
        return ExtraGateway(f"http://127.0.0.1:{port}", app)

    yield make

    async def stop() -> None:
        for http, task in started:
            http.should_exit = True
            await task

    asyncio.run_coroutine_threadsafe(stop(), servers.loop).result(30)


@pytest.fixture(scope="session")
def spm() -> Any:
    """The Mistral SentencePiece 32k vocabulary as token bytes (bench/guided_vocab.py builds it)."""
    # Appended, not prepended: bench/gateway.py must not shadow the gateway package.
    sys.path.append(str(Path(__file__).parent.parent / "bench"))
    import guided_vocab

    return guided_vocab.sentencepiece()


@pytest.fixture(scope="session")
def vocab(spm: Any) -> Any:
    """That vocabulary indexed for guides (sampler_rs.Vocabulary)."""
    import sampler_rs

    return sampler_rs.Vocabulary(spm.token_bytes, [spm.eos], spm.special)
