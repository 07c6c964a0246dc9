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

    model, tokenizer = reference
    eos = {int(tokenizer.eos_token_id)}
    engine = Engine(model, tokenizer, vocab_size=len(tokenizer), eos_token_ids=frozenset(eos))
    engine.start()

    async def run(prompt_ids: list[int], max_new: int) -> list[int]:
        handle = engine.submit(
            EngineRequest("oracle", tuple(prompt_ids), max_new, 0.0, 1.0, 0), asyncio.get_running_loop()
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
