"""Backpressure, deadlines and the service's metrics, over real loopback ports."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from tokenwire.v1 import chat_pb2, chat_pb2_grpc

from .conftest import Servers, start_stack

MESSAGES = [{"role": "user", "content": "Go on."}]
LONG = {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True}


def test_queue_overflow_is_429_with_retry_after(tiny_model_dir: Path) -> None:
    with start_stack(tiny_model_dir, max_running=1, max_waiting=1) as stack:
        opened: list[Any] = []
        stop = threading.Event()

        def hold() -> None:  # a long stream that keeps its slot until told to go
            with httpx.stream("POST", f"{stack.http_url}/v1/chat/completions", json=LONG, timeout=60) as r:
                opened.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

        threads = [threading.Thread(target=hold) for _ in range(2)]  # one running, one waiting
        threads[0].start()
        while not opened:
            time.sleep(0.01)
        threads[1].start()
        deadline = time.monotonic() + 10
        while stack.service.state.engine.num_waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(f"{stack.http_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        with grpc.insecure_channel(stack.grpc_address) as ch:
            with pytest.raises(grpc.RpcError) as exc:
                chat_pb2_grpc.ChatServiceStub(ch).CreateChatCompletion(chat_pb2.ChatCompletionRequest(
                    messages=[chat_pb2.ChatMessage(role="user", text="x")], max_tokens=1))  # fmt: skip
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        stop.set()
        for t in threads:
            t.join(60)
        assert stack.wait_idle() == 0
        # capacity is back
        assert httpx.post(f"{stack.http_url}/v1/chat/completions",
                          json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200  # fmt: skip


def test_inference_timeout_is_504_and_frees_the_rows(servers: Servers) -> None:
    body = {"messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "inference_timeout": 0.3, "n": 2}
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 504, r.text
    assert r.headers["x-should-retry"] == "false"
    assert servers.wait_idle() == 0
    # streaming: the 200 is already sent, so the deadline arrives as an error event before [DONE]
    with httpx.stream("POST", f"{servers.http_url}/v1/chat/completions", json={**body, "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"timeout"' in lines[-2]
    assert servers.wait_idle() == 0


def test_grpc_deadline_and_inference_timeout_without_one(servers: Servers) -> None:
    req = chat_pb2.ChatCompletionRequest(messages=[chat_pb2.ChatMessage(role="user", text="x")], max_tokens=400,
                                         ignore_eos=True)  # fmt: skip
    with grpc.insecure_channel(servers.grpc_address) as ch:
        stub = chat_pb2_grpc.ChatServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc:
            stub.CreateChatCompletion(req, timeout=0.3)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        req.inference_timeout = 0.3  # no call deadline: the service enforces the field itself
        with pytest.raises(grpc.RpcError) as exc:
            stub.CreateChatCompletion(req)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert servers.wait_idle() == 0


def test_service_metrics(servers: Servers) -> None:
    port = servers.service.state.metrics.serve("127.0.0.1", 0)
    httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 5})
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    for name in ("tokenwire:num_requests_running", "tokenwire:num_requests_waiting",
                 "tokenwire:generation_tokens_total", "tokenwire:time_to_first_token_seconds_bucket",
                 "tokenwire:inter_token_latency_seconds_bucket", "tokenwire:request_success_total",
                 "tokenwire:request_cancellations_total", "tokenwire:kv_cache_usage_perc",
                 "tokenwire:num_preemptions_total"):  # fmt: skip
        assert name in text, name
    tokens = next(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("tokenwire:generation_tokens_total"))  # fmt: skip
    assert tokens >= 5
