"""The sampler's fields through the gateway and gRPC: logprobs, EOS control, seeds among strangers, bias."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai

from .conftest import Servers

MESSAGES = [{"role": "user", "content": "Write something long."}]
EOS = 2


def post(servers: Servers, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=60)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_logprobs_shape_and_stream_equality(servers: Servers) -> None:
    body = {"max_tokens": 10, "temperature": 0.8, "seed": 7, "logprobs": True, "top_logprobs": 3}
    full = post(servers, **body)["choices"][0]["logprobs"]["content"]
    assert len(full) == 10
    for entry in full:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] <= 0.0 and bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry["logprob"] <= tops[0]
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    streamed = []
    for chunk in client.chat.completions.create(model=servers.model_name, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                                **body):  # fmt: skip
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed.extend(t.model_dump() for t in chunk.choices[0].logprobs.content)
    assert streamed == full


def test_without_logprobs_there_are_none(servers: Servers) -> None:
    assert post(servers, max_tokens=3)["choices"][0]["logprobs"] is None


def test_eos_min_tokens_and_ignore_eos(servers: Servers) -> None:
    forced = {"logit_bias": {str(EOS): 100}, "max_tokens": 8, "temperature": 1.0, "seed": 1}
    r = post(servers, **forced)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    assert r["choices"][0]["message"]["content"] == ""
    r = post(servers, **forced, min_tokens=3)
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4
    r = post(servers, **forced, ignore_eos=True)
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8


def test_logit_bias_forces_a_token(servers: Servers) -> None:
    hello = 23325  # "▁Hello" in the Mistral v3 vocabulary
    r = post(servers, logit_bias={str(hello): 100}, max_tokens=4, temperature=1.0, logprobs=True)
    assert [t["token"] for t in r["choices"][0]["logprobs"]["content"]] == [" Hello"] * 4
    assert r["choices"][0]["message"]["content"] == "Hello Hello Hello Hello"


def test_seed_is_stable_among_strangers(servers: Servers) -> None:
    body = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 50, "min_p": 0.01,
            "frequency_penalty": 0.3, "seed": 2024}  # fmt: skip
    alone = post(servers, **body)["choices"][0]["message"]["content"]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        extra = body if i == 0 else {"max_tokens": 5 + i, "temperature": 1.3, "seed": i}
        results[i] = post(servers, **extra)["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == alone
    assert servers.wait_idle() == 0


def test_unknown_logit_bias_token_is_422(servers: Servers) -> None:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions",
                   json={"messages": MESSAGES, "logit_bias": {"40000": 5}}, timeout=30)  # fmt: skip
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "logit_bias", "40000"]
