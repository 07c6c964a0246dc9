"""Oracle: our greedy decoding equals transformers' generate(do_sample=False), token for token.

Both run on the exported tiny model, from the same chat-templated prompt ids. Checked twice: inside the engine
(token ids) and through the whole gRPC service (text and token count).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenwire.v1 import chat_pb2, chat_pb2_grpc

from .conftest import Servers

PROMPTS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "What is a token?"}],
    [
        {"role": "user", "content": "1, 2, 3,"},
        {"role": "assistant", "content": "4, 5"},
        {"role": "user", "content": "Continue: 你好, wörld — émoji 🙂"},
    ],
]
LENGTHS = [1, 5, 40]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def hf_greedy(model: Any, prompt_ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def test_engine_greedy_matches_generate(reference: tuple[Any, Any]) -> None:
    from service.engine import Engine, EngineRequest
    from service.params import SamplingParams

    model, tokenizer = reference
    eos = {int(tokenizer.eos_token_id)}
    engine = Engine(model, tokenizer, vocab_size=len(tokenizer), eos_token_ids=frozenset(eos))
    engine.start()

    async def run(prompt_ids: list[int], max_new: int) -> list[int]:
        handle = engine.submit(
            EngineRequest("oracle", tuple(prompt_ids), max_new, SamplingParams(temperature=0.0)),
            asyncio.get_running_loop(),
        )
        return [t.token_id async for ev in handle for t in ev.tokens]

    try:
        for messages in PROMPTS:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt_ids = tokenizer.encode(ids, add_special_tokens=False)
            for max_new in LENGTHS:
                ours = asyncio.run(run(prompt_ids, max_new))
                theirs = hf_greedy(model, prompt_ids, max_new, eos)
                assert ours == theirs, (messages, max_new)
    finally:
        engine.stop()


def test_service_greedy_text_matches_generate(servers: Servers, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    with grpc.insecure_channel(servers.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for messages in PROMPTS:
            prompt_ids = tokenizer.encode(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            )
            for max_new in LENGTHS:
                req = chat_pb2.ChatCompletionRequest(
                    messages=[chat_pb2.ChatMessage(role=m["role"], text=m["content"]) for m in messages],
                    max_completion_tokens=max_new,
                    temperature=0,
                )
                resp = stub.CreateChatCompletion(req)
                theirs = hf_greedy(model, prompt_ids, max_new, {int(tokenizer.eos_token_id)})
                assert resp.usage.prompt_tokens == len(prompt_ids)
                assert resp.usage.completion_tokens == len(theirs)
                assert resp.choices[0].message.content == tokenizer.decode(theirs, skip_special_tokens=True)


class _OpenAIPenalties:
    """OpenAI's frequency/presence penalties and logit bias, written plainly (the reference for our Rust stages)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float, bias: dict[int, float]) -> None:
        self.prompt_len, self.frequency, self.presence, self.bias = prompt_len, frequency, presence, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for token, b in self.bias.items():
            scores[:, token] += b
        for row, ids in enumerate(input_ids):
            counts = torch.bincount(ids[self.prompt_len :], minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= counts * self.frequency + (counts > 0).to(scores.dtype) * self.presence
        return scores


@pytest.mark.parametrize(
    ("fields", "hf_kwargs"),
    [
        ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
        ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
        ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"frequency": 1.5, "presence": 0.5}),
        ({"presence_penalty": -1.0, "logit_bias": {"1010": 4.0, "29491": -3.0}},
         {"presence": -1.0, "bias": {1010: 4.0, 29491: -3.0}}),
        ({"top_k": 1, "temperature": 1.0, "seed": 5}, {}),  # top-k 1 is greedy whatever the temperature
        ({"min_p": 1.0, "temperature": 1.0, "seed": 5}, {}),  # so is min-p 1
    ],
)  # fmt: skip
def test_greedy_with_processors_matches_generate(
    servers: Servers, reference: tuple[Any, Any], fields: dict[str, Any], hf_kwargs: dict[str, Any]
) -> None:
    from transformers import LogitsProcessorList

    model, tokenizer = reference
    messages = PROMPTS[1]
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    processors = LogitsProcessorList()
    gen_kwargs: dict[str, Any] = {}
    if "repetition_penalty" in hf_kwargs:
        gen_kwargs["repetition_penalty"] = hf_kwargs["repetition_penalty"]
    if {"frequency", "presence", "bias"} & hf_kwargs.keys():
        processors.append(_OpenAIPenalties(len(prompt_ids), hf_kwargs.get("frequency", 0.0),
                                           hf_kwargs.get("presence", 0.0), hf_kwargs.get("bias", {})))  # fmt: skip
    with torch.inference_mode():
        mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=mask, do_sample=False, max_new_tokens=30, pad_token_id=0,
            logits_processor=processors, **gen_kwargs,
        )  # fmt: skip
    theirs = [int(t) for t in out[0, len(prompt_ids) :]]
    body = {"messages": messages, "max_tokens": 30, "temperature": 0, "logprobs": True, **fields}
    import httpx

    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ours = [bytes(t["bytes"]) for t in choice["logprobs"]["content"]]
    vocab = servers.service.state.served.vocab
    assert ours == [vocab.token_bytes[t] for t in theirs]
    assert choice["message"]["content"] == tokenizer.decode(theirs, skip_special_tokens=True)


def test_logprobs_match_compute_transition_scores(servers: Servers, reference: tuple[Any, Any]) -> None:
    model, tokenizer = reference
    messages = PROMPTS[2]
    prompt_ids = tokenizer.encode(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    with torch.inference_mode():
        mask = torch.ones(1, len(prompt_ids), dtype=torch.long)
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        scores = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)[0]
        raw = torch.log_softmax(torch.stack(out.logits)[:, 0].float(), dim=-1)
    import httpx

    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json=body, timeout=60)
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == len(scores)
    vocab = servers.service.state.served.vocab
    for step, entry in enumerate(content):
        assert abs(entry["logprob"] - float(scores[step])) < 1e-5
        top = torch.topk(raw[step], 5)
        assert [bytes(t["bytes"]) for t in entry["top_logprobs"]] == [vocab.token_bytes[int(i)] for i in top.indices]
        for t, v in zip(entry["top_logprobs"], top.values, strict=True):
            assert abs(t["logprob"] - float(v)) < 1e-5
        assert entry["top_logprobs"][0]["logprob"] == entry["logprob"]  # greedy picks the best
