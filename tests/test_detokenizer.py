"""Incremental detokenization with the real SentencePiece tokenizer (byte fallback for rare characters)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from service.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\nnewlines\n\n",
    "你好，世界",  # CJK: several byte-fallback tokens per character
    "emoji 🙂🚀🦩 and ǅ, ß, é",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    '{"key": [1, 2.5e-3, "\\u00e9"]}',
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_concatenate(tokenizer: object, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    tail = detok.flush()
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + tail == tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]


def test_multibyte_character_is_held_until_complete(tokenizer: object) -> None:
    ids = tokenizer.encode("𝔘", add_special_tokens=False)  # type: ignore[attr-defined]
    pieces = tokenizer.convert_ids_to_tokens(ids)  # type: ignore[attr-defined]
    assert sum(p.startswith("<0x") for p in pieces) == 4, pieces  # byte fallback: one token per UTF-8 byte
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1].endswith("𝔘")


def test_incomplete_character_at_the_end_is_flushed(tokenizer: object) -> None:
    ids = tokenizer.encode("a𝔘", add_special_tokens=False)[:-1]  # type: ignore[attr-defined]  # cut mid-character
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(detok.push(t) for t in ids)
    assert REPLACEMENT not in text
    assert (text + detok.flush()).endswith(REPLACEMENT)


def test_special_tokens_are_skipped(tokenizer: object) -> None:
    detok = IncrementalDetokenizer(tokenizer)
    ids = [3, *tokenizer.encode("ok", add_special_tokens=False), 2]  # type: ignore[attr-defined]  # [INST] ok </s>
    assert "".join(detok.push(t) for t in ids) + detok.flush() == "ok"
