"""Stop strings, prompt logprobs and per-request templates through the gateway, on the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import Servers

MESSAGES = [{"role": "user", "content": "Keep talking."}]


def post(servers: Servers, **body: Any) -> httpx.Response:
    return httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=60)


def streamed_text(servers: Servers, **body: Any) -> tuple[str, str | None]:
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    text, finish = "", None
    standard = {k: v for k, v in body.items() if k in ("max_tokens", "temperature", "stop")}
    extra = {k: v for k, v in body.items() if k not in standard}
    for chunk in client.chat.completions.create(model=servers.model_name, messages=MESSAGES, stream=True,  # type: ignore[arg-type]
                                                extra_body=extra, **standard):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.fixture(scope="module")
def greedy(servers: Servers) -> str:
    r = post(servers, max_tokens=60, temperature=0, ignore_eos=True)
    content: str = r.json()["choices"][0]["message"]["content"]
    assert len(content) > 40
    return content


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("where", [0.3, 0.6])
def test_stop_cuts_and_streams_the_same(servers: Servers, greedy: str, include: bool, where: float) -> None:
    k = int(len(greedy) * where)
    stop = greedy[k : k + 4]
    cut = greedy.find(stop)
    expected = greedy[: cut + (len(stop) if include else 0)]
    body = {"max_tokens": 60, "temperature": 0, "ignore_eos": True, "stop": [stop, "never-in-this-text-zz"],
            "include_stop_str_in_output": include}  # fmt: skip
    r = post(servers, **body).json()
    assert r["choices"][0]["message"]["content"] == expected
    assert r["choices"][0]["finish_reason"] == "stop"
    assert streamed_text(servers, **body) == (expected, "stop")


def test_a_lone_stop_string_and_length(servers: Servers, greedy: str) -> None:
    r = post(servers, max_tokens=60, temperature=0, ignore_eos=True, stop="never-in-this-text-zz").json()
    assert r["choices"][0]["message"]["content"] == greedy and r["choices"][0]["finish_reason"] == "length"


def test_stop_waits_for_min_tokens(servers: Servers, greedy: str) -> None:
    stop = greedy[:3]  # matched at once without min_tokens
    early = post(servers, max_tokens=60, temperature=0, ignore_eos=True, stop=[stop]).json()
    assert early["choices"][0]["message"]["content"] == ""
    late = post(servers, max_tokens=60, temperature=0, ignore_eos=True, stop=[stop], min_tokens=20).json()
    assert late["usage"]["completion_tokens"] >= 20


def test_loglikelihood_equals_the_forward_pass(servers: Servers, tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)  # fmt: skip
    with torch.inference_mode():
        lps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(lps[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    r = post(servers, max_tokens=1, loglikelihood=True).json()
    got = r["prompt_logprobs"]
    assert len(got) == len(ids) - 1 == r["usage"]["prompt_tokens"] - 1
    vocab = servers.service.state.served.vocab
    assert [bytes(e["bytes"]) for e in got] == [vocab.token_bytes[t] for t in ids[1:]]
    assert max(abs(e["logprob"] - x) for e, x in zip(got, expected, strict=True)) < 1e-4
    assert "prompt_logprobs" not in post(servers, max_tokens=1).json()


def test_request_chat_template_and_kwargs(servers: Servers, tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{{ suffix }}"
    r = post(servers, max_tokens=1, chat_template=template, chat_template_kwargs={"suffix": "ANSWER:"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("<<Keep talking.>>ANSWER:", add_special_tokens=False))


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content ",  # syntax error
        "{{ raise_exception('no thanks') }}",  # the template refuses
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses
    ],
)
def test_bad_templates_are_422(servers: Servers, template: str) -> None:
    r = post(servers, max_tokens=1, chat_template=template)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "chat_template"]
