"""n and best_of through the gateway, against a plain reference: row i of a request is the single request seeded
with seed + i (documented), and best_of keeps the n rows with the highest mean token logprob."""

from __future__ import annotations

from typing import Any

import httpx
import openai

from .conftest import Servers

MESSAGES = [{"role": "user", "content": "Tell a story."}]
BASE = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 12}


def post(servers: Servers, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=120)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def test_n_rows_equal_single_requests_with_consecutive_seeds(servers: Servers) -> None:
    r = post(servers, n=3, seed=10, **BASE)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    singles = [post(servers, seed=10 + i, **BASE) for i in range(3)]
    assert [c["message"]["content"] for c in r["choices"]] == [s["choices"][0]["message"]["content"] for s in singles]
    assert r["usage"]["prompt_tokens"] == singles[0]["usage"]["prompt_tokens"]  # the prompt counts once
    assert r["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"] for s in singles)
    assert len({c["message"]["content"] for c in r["choices"]}) == 3


def test_n_streams_each_choice_by_index(servers: Servers) -> None:
    full = post(servers, n=3, seed=4, **BASE)
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    texts = ["", "", ""]
    finishes: list[str | None] = [None, None, None]
    for chunk in client.chat.completions.create(model=servers.model_name, messages=MESSAGES, n=3, seed=4,  # type: ignore[arg-type]
                                                stream=True, **BASE):  # fmt: skip
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert texts == [c["message"]["content"] for c in full["choices"]]
    assert finishes == [c["finish_reason"] for c in full["choices"]]


def test_best_of_keeps_the_best_mean_logprob(servers: Servers) -> None:
    r = post(servers, n=2, best_of=4, seed=21, **BASE)
    singles = [post(servers, seed=21 + i, logprobs=True, **BASE)["choices"][0] for i in range(4)]

    def mean(choice: dict[str, Any]) -> float:
        lps = [t["logprob"] for t in choice["logprobs"]["content"]]
        return sum(lps) / len(lps)

    best = sorted(singles, key=lambda c: -mean(c))[:2]
    assert [c["message"]["content"] for c in r["choices"]] == [c["message"]["content"] for c in best]
    assert [c["index"] for c in r["choices"]] == [0, 1]


def test_best_of_cannot_stream(servers: Servers) -> None:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions",
                   json={"messages": MESSAGES, "n": 1, "best_of": 3, "stream": True})  # fmt: skip
    assert r.status_code == 422 and "cannot be streamed" in r.json()["detail"][0]["msg"]


def test_n_with_greedy_and_stops(servers: Servers) -> None:
    r = post(servers, n=2, temperature=0, max_tokens=20, ignore_eos=True)
    a, b = (c["message"]["content"] for c in r["choices"])
    assert a == b  # greedy rows agree
    cut = a[5:8]
    r = post(servers, n=2, temperature=0, max_tokens=20, ignore_eos=True, stop=[cut])
    assert [c["message"]["content"] for c in r["choices"]] == [a[: a.find(cut)]] * 2
    assert servers.wait_idle() == 0
