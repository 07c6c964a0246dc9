"""Token bytes of the two benchmark vocabularies, in the form every guided-decoding engine takes.

- ``sentencepiece()``: Mistral's SentencePiece 32,768 (``▁`` → space, ``<0xNN>`` → the byte;
  control and unknown pieces special).
- ``tekken()``: Mistral's Tekken 131,072 byte-level BPE (ids 0–999 special).

Each returns a ``VocabSpec``: ``token_bytes`` (``b""`` for special tokens), ``eos``, ``special`` and
``encode(text) -> list[int]`` without BOS/EOS and without SentencePiece's dummy-prefix space.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mistral_common

DATA = os.path.join(os.path.dirname(mistral_common.__file__), "data")
SPM_FILE = os.path.join(DATA, "mistral_instruct_tokenizer_240323.model.v3")
TEKKEN_FILE = os.path.join(DATA, "tekken_240911.json")


@dataclass(frozen=True)
class VocabSpec:
    name: str
    token_bytes: list[bytes]
    eos: int
    special: list[int]
    encode: Callable[[str], list[int]]


def sentencepiece() -> VocabSpec:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=SPM_FILE)
    n = sp.get_piece_size()
    token_bytes: list[bytes] = []
    special: list[int] = []
    for i in range(n):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            special.append(i)
            token_bytes.append(b"")
        elif sp.is_byte(i):
            token_bytes.append(bytes([int(piece[3:5], 16)]))
        else:
            token_bytes.append(piece.replace("\u2581", " ").encode())
    # SentencePiece prepends a dummy `▁`: encode behind a sentinel and drop the sentinel's tokens.
    sentinel = sp.encode("\n", out_type=int)

    def encode(text: str) -> list[int]:
        ids: list[int] = sp.encode("\n" + text, out_type=int)
        if ids[: len(sentinel)] == sentinel:
            ids = ids[len(sentinel) :]
        assert b"".join(token_bytes[i] for i in ids) == text.encode(), text
        return ids

    return VocabSpec("sentencepiece-32k", token_bytes, sp.eos_id(), special, encode)


def tekken() -> VocabSpec:
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tk = Tekkenizer.from_file(TEKKEN_FILE)
    n = tk.n_words
    nspecial = tk.num_special_tokens
    token_bytes = [b"" if i < nspecial else tk.id_to_byte_piece(i, SpecialTokenPolicy.KEEP) for i in range(n)]
    special = list(range(nspecial))

    def encode(text: str) -> list[int]:
        ids: list[int] = tk.encode(text, bos=False, eos=False)
        return ids

    return VocabSpec("tekken-131k", token_bytes, tk.eos_id, special, encode)


def load(name: str) -> VocabSpec:
    if name.startswith("tekken"):
        return tekken()
    if name.startswith("sentencepiece") or name == "spm":
        return sentencepiece()
    raise ValueError(f"unknown vocabulary {name!r}")


def llg_tokenizer(spec: VocabSpec) -> Any:
    """An ``llguidance.LLTokenizer`` over the same bytes (special tokens named, never matched),
    encoding with the vocabulary's own tokenizer."""
    import llguidance

    class Tok:
        eos_token_id = spec.eos
        bos_token_id = None
        tokens = [b if b else f"<special_{i}>".encode() for i, b in enumerate(spec.token_bytes)]  # noqa: RUF012
        special_token_ids = spec.special

        def __call__(self, s: bytes) -> list[int]:
            return spec.encode(s.decode("utf-8", "replace"))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()))
