"""The vocabulary as bytes: what each token id stands for, for logprobs (`token`, `bytes`) and guided decoding.

Handles SentencePiece (`▁` for a space, `<0xNN>` byte-fallback pieces) and byte-level BPE (GPT-2's `Ġ` alphabet);
any other tokenizer falls back to decoding each id alone. Special/added tokens stand for their literal text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


@dataclass(frozen=True)
class Vocabulary:
    """token id -> bytes and display text, plus which ids are special."""

    token_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]

    def text(self, token_id: int) -> str:
        """The token's text as OpenAI reports it (invalid UTF-8 shown as U+FFFD)."""
        return self.token_bytes[token_id].decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return len(self.token_bytes)


def from_tokenizer(tokenizer: Any) -> Vocabulary:
    """Build the byte table of a transformers tokenizer."""
    pieces: dict[str, int] = tokenizer.get_vocab()
    size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})
    sentencepiece = "<0x00>" in pieces and any(p.startswith("▁") for p in pieces)
    byte_level = not sentencepiece and "Ġ" in "".join(list(pieces)[:5000])
    decoder = _byte_decoder()
    out: list[bytes] = [b""] * size
    for piece, token_id in pieces.items():
        if not 0 <= token_id < size:
            continue
        if token_id in special:
            out[token_id] = piece.encode()
        elif sentencepiece:
            m = _BYTE_PIECE.match(piece)
            out[token_id] = bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        elif byte_level and all(c in decoder for c in piece):
            out[token_id] = bytes(decoder[c] for c in piece)
        else:
            out[token_id] = tokenizer.decode([token_id]).encode()
    return Vocabulary(tuple(out), frozenset(i for i in special if 0 <= i < size))
