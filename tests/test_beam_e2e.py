"""Beam search through the service equals transformers' generate(num_beams=...), sequence for sequence."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import Servers
from .test_beam import EosBias, tekken

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


@pytest.mark.parametrize("es", [True, False, "never"])
def test_beams_reaching_eos_equal_transformers(servers: Servers, reference: tuple[Any, Any, list[int]],
                                               es: Any) -> None:  # fmt: skip
    from transformers import LogitsProcessorList

    model, tok, ids = reference
    eos = int(tok.eos_token_id)
    expected = hf_beams(model, ids, 4, 4, 1.0, es, 12, logits_processor=LogitsProcessorList([EosBias(eos, 9.0)]))
    assert any(s and s[-1] == eos for s in expected), "the bias should make some beams end with EOS"
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "use_beam_search": True, "n": 4, "best_of": 4, "early_stopping": es,
        "max_tokens": 12, "logit_bias": {str(eos): 9.0}})  # fmt: skip
    choices = r.json()["choices"]
    for choice, seq in zip(choices, expected, strict=True):
        ended = bool(seq) and seq[-1] == eos
        assert choice["finish_reason"] == ("stop" if ended else "length")
        assert choice["message"]["content"] == tok.decode(seq[:-1] if ended else seq, skip_special_tokens=True)


# -- beam search composed with guides, stop strings and logprobs -------------------------------------------------


def _brute_allowed(pattern: str, token_bytes: list[bytes], eos: int, special: set[int]) -> Any:
    """transformers' `prefix_allowed_tokens_fn` for a regex, by brute force over the whole vocabulary: a token is
    allowed when the bytes so far plus its bytes can still become a full match (`regex`'s partial matching); EOS
    when the bytes so far are one. Independent of sampler_rs's DFA and token trie."""
    import regex

    compiled = regex.compile(pattern)
    texts = [b.decode("latin-1") for b in token_bytes]  # the pattern is ASCII: other bytes never match
    cache: dict[str, list[int]] = {}

    def allowed(prefix: str) -> list[int]:
        if prefix not in cache:
            ok = [t for t, s in enumerate(texts)
                  if s and t not in special and compiled.fullmatch(prefix + s, partial=True)]  # fmt: skip
            if compiled.fullmatch(prefix):
                ok.append(eos)
            cache[prefix] = ok or list(range(len(texts)))  # a dead beam: every score is -inf anyway
        return cache[prefix]

    return allowed


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("guided_choice", ["yes", "no", "the sea", "blue water", "maybe"], "yes|no|the sea|blue water|maybe"),
        ("guided_regex", r" ?[a-z]{2,6}( [a-z]{1,5})?\.", r" ?[a-z]{2,6}( [a-z]{1,5})?\."),
    ],
)
def test_guided_beams_equal_transformers_with_prefix_allowed_tokens(
    servers: Servers, reference: tuple[Any, Any, list[int]], spm: Any, field: str, value: Any, pattern: str
) -> None:
    """Every beam follows the guide with its own state: the result equals transformers' beam search with
    `prefix_allowed_tokens_fn` computing the same constraint by brute force."""
    import re

    model, tok, ids = reference
    eos = int(tok.eos_token_id)
    allowed = _brute_allowed(pattern, spm.token_bytes, eos, set(spm.special))
    texts = [b.decode("latin-1") for b in spm.token_bytes]

    def prefix_fn(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        return allowed("".join(texts[int(t)] for t in input_ids[len(ids) :]))

    expected = hf_beams(model, ids, 4, 3, 1.0, False, 12, prefix_allowed_tokens_fn=prefix_fn)
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "use_beam_search": True, "n": 3, "best_of": 4, "max_tokens": 12,
        field: value})  # fmt: skip
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    for choice, seq in zip(choices, expected, strict=True):
        ended = bool(seq) and seq[-1] == eos
        assert choice["finish_reason"] == ("stop" if ended else "length")
        assert choice["message"]["content"] == tok.decode(seq[:-1] if ended else seq, skip_special_tokens=True)
        if ended:
            body = "".join(texts[t] for t in seq[:-1])
            assert re.fullmatch(pattern, body), body


def test_guided_json_beams_validate(servers: Servers) -> None:
    import jsonschema

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
        "messages": MESSAGES, "use_beam_search": True, "n": 2, "best_of": 3, "max_tokens": 40,
        "guided_json": schema, "guided_whitespace_pattern": ""})  # fmt: skip
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
        else:  # cut by max_tokens: still a prefix of a valid document
            assert choice["message"]["content"].startswith("{")


def test_beam_stop_strings_equal_transformers_stop_string_criteria(
    servers: Servers, reference: tuple[Any, Any, list[int]]
) -> None:
    """A candidate whose text gains a stop string finishes like an EOS (transformers' `stop_strings`); the
    returned text ends before the stop string (or with it, with `include_stop_str_in_output`)."""
    model, tok, ids = reference
    plain = hf_beams(model, ids, 4, 1, 1.0, False, 10)[0]
    # A stop string from inside the best beam's fourth token: it fires there.
    piece = tok.convert_ids_to_tokens(plain[3]).replace("▁", "")
    assert len(piece) >= 2, piece
    stop = piece[:2]
    expected = hf_beams(model, ids, 4, 2, 1.0, False, 10, stop_strings=[stop], tokenizer=tok)
    for include in (False, True):
        r = httpx.post(f"{servers.http_url}/v1/chat/completions", timeout=120, json={
            "messages": MESSAGES, "use_beam_search": True, "n": 2, "best_of": 4, "max_tokens": 10, "stop": [stop],
            "include_stop_str_in_output": include})  # fmt: skip
        assert r.status_code == 200, r.text
        for choice, seq in zip(r.json()["choices"], expected, strict=True):
            full = tok.decode(seq, skip_special_tokens=True)
            if stop in full:
                cut = full.index(stop) + (len(stop) if include else 0)
                assert (choice["message"]["content"], choice["finish_reason"]) == (full[:cut], "stop")
            else:
                assert (choice["message"]["content"], choice["finish_reason"]) == (full, "length")
    assert any(stop in tok.decode(s) for s in expected)


def test_beam_logprobs_are_the_models_log_softmax(
    servers: Servers, reference: tuple[Any, Any, list[int]], spm: Any
) -> None:
    """`logprobs` / `top_logprobs` of beams: the raw log_softmax of the model at each position of the final
    sequence (a teacher-forced forward), as for sampled tokens."""
    model, _, ids = reference
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    resp = client.chat.completions.create(model=servers.model_name, messages=MESSAGES, n=2, max_tokens=6,  # type: ignore[call-overload]
                                          logprobs=True, top_logprobs=3,
                                          extra_body={"use_beam_search": True, "best_of": 3})  # fmt: skip
    expected = hf_beams(model, ids, 3, 2, 1.0, False, 6)
    for choice, seq in zip(resp.choices, expected, strict=True):
        with torch.inference_mode():
            logits = model(torch.tensor([ids + seq])).logits[0, len(ids) - 1 : -1].float()
        lp = torch.log_softmax(logits, dim=-1)
        content = choice.logprobs.content
        assert len(content) == len(seq)
        for i, (item, t) in enumerate(zip(content, seq, strict=True)):
            assert abs(item.logprob - float(lp[i, t])) < 1e-4
            best = torch.topk(lp[i], 3)
            assert all(abs(a.logprob - float(b)) < 1e-4 for a, b in zip(item.top_logprobs, best.values, strict=True))
            assert [bytes(a.bytes or []) for a in item.top_logprobs] == [spm.token_bytes[int(j)] for j in best.indices]


# -- a second model and tokenizer: Tekken (131,072 byte-level BPE tokens), another shape ----------------------


@pytest.mark.parametrize(("k", "n", "lp", "es"), [(2, 2, 1.0, True), (4, 2, 0.7, False), (8, 4, 1.5, "never")])
def test_engine_beams_equal_transformers_on_tekken(k: int, n: int, lp: float, es: Any) -> None:
    """The engine (prefill, cache reordering, detokenization) on the second tokenizer and model shape."""
    import asyncio

    from transformers import LogitsProcessorList

    from service.engine import BeamSettings, Engine, EngineRequest
    from service.params import SamplingParams

    model, tok, ids = tekken()
    eos = int(tok.eos_token_id)
    with torch.inference_mode():  # a bias on EOS (after log-softmax, as ours) makes some beams end with it
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             num_beams=k, num_return_sequences=n, length_penalty=lp, early_stopping=es,
                             do_sample=False, max_new_tokens=8, pad_token_id=0,
                             logits_processor=LogitsProcessorList([EosBias(eos, 6.0)]))  # fmt: skip
    expected = [[int(t) for t in row[len(ids) :]] for row in out]
    expected = [s[: s.index(eos) + 1] if eos in s else s for s in expected]
    assert any(s[-1] == eos for s in expected), "the bias should make some beams end with EOS"
    engine = Engine(model, tok, vocab_size=len(tok), eos_token_ids=frozenset({eos}))
    engine.start()
    try:

        async def run() -> list[Any]:
            sampling = SamplingParams(temperature=0.0, logit_bias=((eos, 6.0),))
            handle = engine.submit(EngineRequest("t", tuple(ids), 8, sampling,
                                                 beam=BeamSettings(k, n, lp, es)),
                                   asyncio.get_running_loop())  # fmt: skip
            return [event async for event in handle]

        events = sorted(asyncio.run(run()), key=lambda e: e.index)
    finally:
        engine.stop()
    assert [[t.token_id for t in e.tokens] for e in events] == expected
    for e, seq in zip(events, expected, strict=True):
        assert e.finish_reason == ("stop" if seq[-1] == eos else "length")
        assert e.text == tok.decode(seq[:-1] if seq[-1] == eos else seq, skip_special_tokens=True)
