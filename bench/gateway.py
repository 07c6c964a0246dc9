"""bench/gateway: what the gateway adds, against direct gRPC in the same run.

    .venv/bin/python bench/gateway.py [--requests 200] [--concurrency 64] [--out bench/results/gateway.json]

Starts `tokenwire serve` (the embedded model) and `tokenwire gateway` as separate processes, then measures:
1. latency: the same short completion (1 token, greedy) directly over gRPC (grpc.aio) and over HTTP through the
   gateway, with two HTTP clients: a lean keep-alive HTTP/1.1 client (httptools' C parser, the counterpart of
   grpcio's C core) and httpx. Each round sends one request of each kind, in rotating order, each after an idle
   gap; p50/p99 of each, and the overhead as the median (and p99) of the per-round differences HTTP - gRPC, which
   cancels what the rounds share (the service's compute, the other load on the machine). The lean client's figure
   is what the gateway adds; httpx's also holds the Python client's own cost (pure-Python HTTP/1.1: 1.4-2.6 ms a
   request on this 2-core machine after an idle gap), which a gRPC client does not pay;
2. streaming at concurrency C: SSE events/s through the gateway vs messages/s of the same streams over gRPC;
3. CPU time of each process during the HTTP streaming phase (from /proc): the gateway's share of the service's.
Targets (issue 7): p50 overhead < 1 ms; gateway CPU < 10% of the service's at concurrency 64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httptools
import httpx
from benchutil import cpu_seconds, free_port, pct  # bench/ is sys.path[0] when run as a script

from tokenwire.v1 import chat_pb2, chat_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [{"role": "user", "content": "Say something."}]


def start(args: list[str], ready: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--log-level", "warning", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{args[0]} exited with {proc.returncode}")
        if ready():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{args[0]} did not become ready")


class LeanHttp(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client for one request at a time: the request's bytes are built once, the response is
    parsed by httptools (llhttp, C). As little client code per request as grpc.aio's, so the difference is the
    gateway's."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.body: list[bytes] = []

    @classmethod
    async def connect(cls, host: str, port: int) -> LeanHttp:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), b"".join(self.body)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the gateway closed the connection"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.body = []
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def summary(ms: list[float]) -> tuple[float, float]:
    return statistics.median(ms), pct(ms, 0.99)


async def latency(http_url: str, grpc_addr: str, n: int, gap: float) -> dict[str, float]:
    body = {"messages": MESSAGES, "max_tokens": 1, "temperature": 0}
    req = chat_pb2.ChatCompletionRequest(messages=[chat_pb2.ChatMessage(role="user", text=MESSAGES[0]["content"])],
                                         max_tokens=1, temperature=0)  # fmt: skip
    host, port = http_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload  # fmt: skip
    ms: dict[str, list[float]] = {"grpc": [], "http": [], "httpx": []}
    lean = await LeanHttp.connect(host, int(port))
    async with httpx.AsyncClient(timeout=60) as client, grpc.aio.insecure_channel(grpc_addr) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)

        async def grpc_call() -> None:
            await stub.CreateChatCompletion(req)

        async def http_call() -> None:
            status, _ = await lean.request(raw)
            assert status == 200

        async def httpx_call() -> None:
            r = await client.post(f"{http_url}/v1/chat/completions", json=body)
            assert r.status_code == 200

        calls = [("grpc", grpc_call), ("http", http_call), ("httpx", httpx_call)]
        for i in range(n + 10):  # 10 warm-up rounds
            for name, call in calls[i % 3 :] + calls[: i % 3]:  # rotating order: no kind always goes first
                await asyncio.sleep(gap)  # let the service's compute threads go idle (2 cores are shared by all)
                t0 = time.perf_counter()
                await call()
                if i >= 10:
                    ms[name].append((time.perf_counter() - t0) * 1e3)
    lean.close()
    out: dict[str, float] = {}
    for name, values in ms.items():
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = summary(values)
    for name, key in (("http", "overhead"), ("httpx", "httpx_overhead")):
        diffs = [h - g for h, g in zip(ms[name], ms["grpc"], strict=True)]
        out[f"{key}_p50_ms"], out[f"{key}_p99_ms"] = summary(diffs)
        out[f"{key}_p50_of_medians_ms"] = out[f"{name}_p50_ms"] - out["grpc_p50_ms"]
    return out


async def streams_http(url: str, concurrency: int, tokens: int) -> tuple[int, float]:
    body = {"messages": MESSAGES, "max_tokens": tokens, "stream": True, "ignore_eos": True, "temperature": 1.0}
    events = 0

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal events
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                events += line.startswith("data: ")

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(client) for _ in range(concurrency)))
    return events, time.perf_counter() - t0


async def streams_grpc(addr: str, concurrency: int, tokens: int) -> tuple[int, float]:
    req = chat_pb2.ChatCompletionRequest(messages=[chat_pb2.ChatMessage(role="user", text=MESSAGES[0]["content"])],
                                         max_tokens=tokens, ignore_eos=True, temperature=1.0)  # fmt: skip
    messages = 0

    async def one(stub: Any) -> None:
        nonlocal messages
        async for _ in stub.StreamChatCompletion(req):
            messages += 1

    t0 = time.perf_counter()
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        await asyncio.gather(*(one(stub) for _ in range(concurrency)))
    return messages, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--gap", type=float, default=0.05, help="idle seconds before each timed request")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = ap.parse_args()
    grpc_port, http_port = free_port(), free_port()
    grpc_addr, http_url = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{http_url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    service = start(["serve", "--grpc-port", str(grpc_port), "--drain-seconds", "0"], lambda: True)
    gateway = start(["gateway", "--upstream", grpc_addr, "--http-port", str(http_port)], healthy)
    try:
        lat = asyncio.run(latency(http_url, grpc_addr, args.requests, args.gap))
        g_events, g_wall = asyncio.run(streams_grpc(grpc_addr, args.concurrency, args.tokens))
        s0, w0 = cpu_seconds(service.pid), cpu_seconds(gateway.pid)
        h_events, h_wall = asyncio.run(streams_http(http_url, args.concurrency, args.tokens))
        s1, w1 = cpu_seconds(service.pid), cpu_seconds(gateway.pid)
    finally:
        for proc in (gateway, service):
            proc.send_signal(signal.SIGTERM)
        for proc in (gateway, service):
            proc.wait(60)
    result = {
        **lat,
        "concurrency": args.concurrency, "tokens_per_stream": args.tokens,
        "sse_events_per_s": h_events / h_wall, "grpc_messages_per_s": g_events / g_wall,
        "gateway_cpu_s": w1 - w0, "service_cpu_s": s1 - s0, "gateway_cpu_share": (w1 - w0) / max(s1 - s0, 1e-9),
    }  # fmt: skip
    print(f"{'measure':<40} | {'value':>10}")
    print("-" * 54)
    for key, label, unit in [
        ("grpc_p50_ms", "1-token completion direct gRPC, p50", "ms"),
        ("http_p50_ms", "same via gateway (lean client), p50", "ms"),
        ("httpx_p50_ms", "same via gateway (httpx), p50", "ms"),
        ("overhead_p50_ms", "gateway overhead, p50", "ms"),
        ("overhead_p99_ms", "gateway overhead, p99", "ms"),
        ("httpx_overhead_p50_ms", "overhead seen by httpx, p50", "ms"),
        ("sse_events_per_s", f"SSE events/s via gateway (c={args.concurrency})", "/s"),
        ("grpc_messages_per_s", f"gRPC stream messages/s direct (c={args.concurrency})", "/s"),
        ("gateway_cpu_share", "gateway CPU / service CPU (HTTP phase)", "x"),
    ]:
        print(f"{label:<40} | {result[key]:>9.3f}{unit}")
    machine = {"cores": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "result": result}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
