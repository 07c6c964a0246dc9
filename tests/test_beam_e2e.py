"""Beam search through the service equals transformers' generate(num_beams=...), sequence for sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import Servers

MESSAGES = [{"role": "user", "content": "Describe the sea."}]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> tuple[Any, Any, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)  # fmt: skip
    return model, tok, ids


def hf_beams(model: Any, ids: list[int], k: int, n: int, lp: float, es: Any, m: int, **kw: Any) -> list[list[int]]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             num_beams=k, num_return_sequences=n, length_penalty=lp, early_stopping=es,
                             do_sample=False, max_new_tokens=m, pad_token_id=0, **kw)  # fmt: skip
    seqs = [[int(t) for t in row[len(ids) :]] for row in out]
    return [s[: s.index(0)] if 0 in s else s for s in seqs]  # drop the padding after an early EOS


@pytest.mark.parametrize(
    ("k", "n", "lp", "es"),
    [(2, 1, 1.0, False), (4, 2, 0.5, True), (4, 4, 2.0, "never"), (8, 3, 1.0, "never"), (8, 8, -0.5, False)],
)
def test_beams_equal_transformers(servers: Servers, reference: tuple[Any, Any, list[int]], k: int, n: int,
                                  lp: float, es: Any) -> None:  # fmt: skip
    model, tok, ids = reference
    expected = hf_beams(model, ids, k, n, lp, es, 10)
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "use_beam_search": True, "n": n, "best_of": k, "length_penalty": lp,
        "early_stopping": es, "max_tokens": 10})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == list(range(n))
    for choice, seq in zip(body["choices"], expected, strict=True):
        eos = bool(seq) and seq[-1] == tok.eos_token_id
        assert choice["message"]["content"] == tok.decode(seq[:-1] if eos else seq, skip_special_tokens=True)
        assert choice["finish_reason"] == ("stop" if eos else "length")
    assert body["usage"]["completion_tokens"] == sum(len(s) for s in expected)


def test_beams_compose_with_penalties_and_stream(servers: Servers, reference: tuple[Any, Any, list[int]]) -> None:
    model, tok, ids = reference
    expected = hf_beams(model, ids, 4, 2, 1.0, False, 8, repetition_penalty=1.5)
    body = {"use_beam_search": True, "n": 2, "best_of": 4, "max_tokens": 8, "repetition_penalty": 1.5}
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=120)
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert texts == [tok.decode(s, skip_special_tokens=True) for s in expected]
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    streamed = ["", ""]
    extra = {k: v for k, v in body.items() if k not in ("n", "max_tokens")}
    for chunk in client.chat.completions.create(model=servers.model_name, messages=MESSAGES, stream=True,  # type: ignore[call-overload]
                                                n=2, max_tokens=8, extra_body=extra):  # fmt: skip
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts  # the final beams, streamed once final


class _Bias:
    """Adds a bias to one token's score (transformers applies beam-search processors after log-softmax)."""

    def __init__(self, token: int, bias: float) -> None:
        self.token, self.bias = token, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.token] += self.bias
        return scores


@pytest.mark.parametrize("es", [True, False, "never"])
def test_beams_reaching_eos_equal_transformers(servers: Servers, reference: tuple[Any, Any, list[int]],
                                               es: Any) -> None:  # fmt: skip
    from transformers import LogitsProcessorList

    model, tok, ids = reference
    eos = int(tok.eos_token_id)
    expected = hf_beams(model, ids, 4, 4, 1.0, es, 12, logits_processor=LogitsProcessorList([_Bias(eos, 9.0)]))
    assert any(s and s[-1] == eos for s in expected), "the bias should make some beams end with EOS"
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "use_beam_search": True, "n": 4, "best_of": 4, "early_stopping": es,
        "max_tokens": 12, "logit_bias": {str(eos): 9.0}})  # fmt: skip
    choices = r.json()["choices"]
    for choice, seq in zip(choices, expected, strict=True):
        ended = bool(seq) and seq[-1] == eos
        assert choice["finish_reason"] == ("stop" if ended else "length")
        assert choice["message"]["content"] == tok.decode(seq[:-1] if ended else seq, skip_special_tokens=True)
