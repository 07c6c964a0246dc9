"""Continuous batching: many requests share each forward pass, results do not depend on who else runs, the KV
cache stays within its budget (preempting and recomputing when full), and cancelled requests free everything."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tokenwire.v1 import chat_pb2, chat_pb2_grpc

from .conftest import Servers, start_stack

TOPICS = ["the sea", "a token", "Paris", "rust and python", "KV caches", "the moon", "bread", "chess"]


def request_body(i: int) -> dict[str, Any]:
    """Request i of a mixed workload: greedy and seeded sampling, several lengths and parameters."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})." * (1 + i % 3)}],
        "max_tokens": 4 + (i * 7) % 29,
    }
    if i % 2:
        body.update(temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i)
    else:
        body.update(temperature=0)
    if i % 5 == 0:
        body.update(repetition_penalty=1.3, presence_penalty=0.5)
    if i % 7 == 0:
        body.update(n=2, seed=7 + i, temperature=0.7)
    return body


async def stream_one(client: openai.AsyncOpenAI, model: str, body: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Texts and finish reasons per choice, assembled from the stream."""
    params = {k: v for k, v in body.items() if k in ("messages", "max_tokens", "temperature", "top_p", "seed",
                                                       "presence_penalty", "n")}  # fmt: skip
    extra = {k: v for k, v in body.items() if k not in params}
    n = body.get("n", 1)
    texts, reasons = [""] * n, [""] * n
    stream = await client.chat.completions.create(model=model, stream=True, extra_body=extra, **params)
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons


def run_all(servers: Servers, bodies: list[dict[str, Any]], concurrent: bool) -> list[tuple[list[str], list[str]]]:
    async def main() -> list[tuple[list[str], list[str]]]:
        async with openai.AsyncOpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:  # fmt: skip
            if concurrent:
                return list(await asyncio.gather(*(stream_one(client, servers.model_name, b) for b in bodies)))
            return [await stream_one(client, servers.model_name, b) for b in bodies]

    return asyncio.run(main())


def test_32_concurrent_streams_equal_their_solo_runs(servers: Servers) -> None:
    """Greedy and seeded requests give the same text alone or among 31 others, and the steps were shared."""
    engine = servers.service.state.engine
    bodies = [request_body(i) for i in range(32)]
    solo = run_all(servers, bodies, concurrent=False)
    forwards = engine.runner.forwards
    together = run_all(servers, bodies, concurrent=True)
    assert together == solo
    for body, (texts, reasons) in zip(bodies, together, strict=True):
        assert all(r in ("stop", "length") for r in reasons), reasons
        assert len(texts) == body.get("n", 1)
    shared = engine.runner.forwards - forwards
    tokens = sum(b["max_tokens"] * b.get("n", 1) for b in bodies)
    assert shared < tokens / 4, f"{shared} forwards for up to {tokens} tokens: the requests were not batched"
    assert max(d for d, _ in list(engine.batch_log)[-shared:]) >= 16  # many sequences decoded in one forward
    assert servers.wait_idle() == 0
    assert engine.cache.used_blocks == 0


def test_cancelling_half_the_streams_frees_them(servers: Servers) -> None:
    engine = servers.service.state.engine

    async def main() -> int:
        async with grpc.aio.insecure_channel(servers.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            calls = []
            for i in range(16):
                req = chat_pb2.ChatCompletionRequest(
                    messages=[chat_pb2.ChatMessage(role="user", text=f"Count to {i}.")], max_tokens=200,
                    temperature=0, ignore_eos=True, stream=True)  # fmt: skip
                calls.append(stub.StreamChatCompletion(req))
            done = 0
            for i, call in enumerate(calls):
                async for _ in call:  # every stream runs
                    break
                if i % 2:
                    call.cancel()
            for i, call in enumerate(calls):
                if i % 2 == 0:
                    async for _ in call:
                        pass
                    done += 1
            return done

    assert asyncio.run(main()) == 8
    assert servers.wait_idle() == 0
    assert engine.cache.used_blocks == 0
    assert engine.cancellations >= 8


def test_long_prompts_are_prefilled_in_chunks_between_decodes(tiny_model_dir: Path) -> None:
    """A long prompt is fed `max_batch_tokens` at a time, in the same forwards as the running decodes, and its
    prompt logprobs are those of an unchunked prefill (checked against transformers in test_generation_e2e)."""
    with start_stack(tiny_model_dir, max_batch_tokens=24) as stack:
        engine = stack.service.state.engine
        long_text = " ".join(f"word{i}" for i in range(120))

        async def main() -> Any:
            async with openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="x", max_retries=0) as client:
                first = await client.chat.completions.create(
                    model=stack.model_name, stream=True, max_tokens=60, temperature=0,
                    messages=[{"role": "user", "content": "hi"}], extra_body={"ignore_eos": True})  # fmt: skip
                async for _ in first:  # running: now the long prompt arrives
                    break
                long = asyncio.create_task(client.chat.completions.create(
                    model=stack.model_name, max_tokens=1, messages=[{"role": "user", "content": long_text}],
                    extra_body={"loglikelihood": True}))  # fmt: skip
                async for _ in first:
                    pass
                return await long

        resp = asyncio.run(main())
        log = list(engine.batch_log)
    mixed = [(d, p) for d, p in log if d > 0 and p > 0]
    assert len(mixed) >= 5, log  # the prompt's chunks rode along with the other stream's decodes
    assert all(d + p <= 24 for d, p in mixed)
    prompt_lps = resp.model_extra["prompt_logprobs"]
    assert len(prompt_lps) > 100
    with start_stack(tiny_model_dir) as stack:
        r = httpx.post(f"{stack.http_url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": long_text}], "max_tokens": 1, "loglikelihood": True})  # fmt: skip
        whole = r.json()["prompt_logprobs"]
    assert [t["logprob"] for t in prompt_lps] == pytest.approx([t["logprob"] for t in whole], abs=1e-4)


def test_a_full_kv_cache_preempts_and_recomputes_without_changing_results(tiny_model_dir: Path) -> None:
    """A budget too small for everyone at once: requests are preempted (recompute) and still give the texts they
    give alone; afterwards every block is free."""
    bodies = [{"messages": [{"role": "user", "content": f"Story number {i}, please."}], "max_tokens": 90,
               "temperature": 0 if i % 2 else 0.8, "seed": i, "ignore_eos": True} for i in range(8)]  # fmt: skip
    bodies.append({**bodies[0], "n": 3, "seed": 99})
    bodies.append({"messages": bodies[1]["messages"], "max_tokens": 40, "use_beam_search": True, "best_of": 3,
                   "n": 2})  # fmt: skip
    with start_stack(tiny_model_dir, kv_cache_tokens=512, max_batch_tokens=64) as stack:
        engine = stack.service.state.engine
        solo = run_all(stack, bodies, concurrent=False)
        assert engine.preemptions == 0
        together = run_all(stack, bodies, concurrent=True)
        assert engine.preemptions > 0
        assert together == solo
        assert stack.wait_idle() == 0
        assert engine.cache.used_blocks == 0


def test_a_request_larger_than_the_kv_cache_is_refused(tiny_model_dir: Path) -> None:
    with start_stack(tiny_model_dir, kv_cache_tokens=128) as stack:
        r = httpx.post(f"{stack.http_url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 3})  # fmt: skip
        assert r.status_code == 400, r.text
        assert "KV cache" in r.json()["error"]["message"]


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_soak_with_random_disconnects(servers: Servers) -> None:
    """Two thousand requests over gRPC, a third of them dropped at a random point: afterwards nothing runs, every
    KV block and sampler sequence is free, and resident memory grew by less than 150 MiB."""
    engine = servers.service.state.engine
    rng = random.Random(5)

    async def one(stub: Any, i: int, sem: asyncio.Semaphore) -> str:
        async with sem:
            req = chat_pb2.ChatCompletionRequest(
                messages=[chat_pb2.ChatMessage(role="user", text=f"soak {i} " * rng.randint(1, 20))],
                max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.7]), stream=True,
                n=rng.choice([1, 1, 1, 2]))  # fmt: skip
            call = stub.StreamChatCompletion(req)
            drop_after = rng.randint(0, 6) if i % 3 == 0 else None
            seen = 0
            try:
                async for _ in call:
                    seen += 1
                    if drop_after is not None and seen > drop_after:
                        call.cancel()
                        return "cancelled"
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    return "cancelled"
                raise
            return "done"

    async def main(n: int) -> list[str]:
        sem = asyncio.Semaphore(48)
        async with grpc.aio.insecure_channel(servers.grpc_address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            return list(await asyncio.gather(*(one(stub, i, sem) for i in range(n))))

    asyncio.run(main(200))  # warm-up: allocator pools, caches
    assert servers.wait_idle() == 0
    before = _rss_mb()
    outcomes = asyncio.run(main(2000))
    assert servers.wait_idle(30) == 0
    after = _rss_mb()
    assert outcomes.count("done") >= 1200 and outcomes.count("cancelled") >= 300
    assert engine.cache.used_blocks == 0
    assert len(engine.sampler) == 0
    assert after - before < 150, f"resident memory grew {after - before:.0f} MiB"
