"""Guided decoding through the `sampler_rs` bindings, on the real Mistral vocabularies.

- the API: engines, errors (fail closed), masks wider than the vocabulary, EOS, finishing;
- regex masks bit for bit against a brute-force check over the whole vocabulary (Python `regex`
  partial matching; tokens ending inside a UTF-8 character are covered by the Rust oracle);
- instance replay on a seeded subset of maskbench-dev (0 validation / 0 invalidation errors);
- JSON Schema masks against llguidance's Python package, differences classified.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import pytest

sys.path.append(os.path.join(os.path.dirname(__file__), "..", "bench"))

import guided_replay as gr
import guided_vocab as gv

import sampler_rs
from sampler_rs import Guide, GuideState, Vocabulary


@pytest.fixture(scope="module")
def tekken() -> gv.VocabSpec:
    return gv.tekken()


def mask_of(state: GuideState, n: int, width: int | None = None) -> np.ndarray:
    out = np.full(((width or n) + 31) // 32, 0xFFFFFFFF, dtype=np.uint32)
    state.fill_mask(out)
    return out


def allowed(mask: np.ndarray, n: int) -> np.ndarray:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")
    return bits[:n].astype(bool)


def walk(guide: Guide, ids: list[int]) -> tuple[bool, bool]:
    st = GuideState(guide)
    ok = all(st.advance(t) for t in ids)
    return ok, ok and st.is_accepting()


# ---- API ----------------------------------------------------------------------------------


def test_engines_and_cache(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    g = Guide.regex(vocab, r"\d+")
    assert g.engine == "tokenwire-dfa"
    assert Guide.regex(vocab, r"\d+") is not g  # a new wrapper ...
    assert vocab.cached_guides >= 1  # ... over the cached compile
    assert Guide.choice(vocab, ["a", "b"]).engine == "tokenwire-dfa"
    assert Guide.json_schema(vocab, '{"type": "integer"}').engine == "tokenwire-json"
    assert Guide.json_object(vocab).engine == "tokenwire-json"
    # What our JSON Schema compiler does not implement goes to llguidance.
    fallback = Guide.json_schema(vocab, '{"type": "object", "minProperties": 2}')
    assert fallback.engine == "llguidance"
    assert fallback.fallback_reason == "`minProperties` beyond the required properties"
    assert Guide.json_schema(vocab, '{"type": "integer"}').fallback_reason is None
    assert Guide.grammar(vocab, 'start: "x"+').engine == "llguidance"
    assert len(vocab) == 32768
    vocab.clear_caches()
    assert vocab.cached_guides == 0
    # Compiled guides outlive the caches; a schema compiles again after them.
    assert walk(g, spm.encode("42")) == (True, True)
    assert walk(Guide.json_schema(vocab, '{"type": "integer"}'), spm.encode("42")) == (True, True)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v: Guide.regex(v, "(a"), "invalid regex"),
        (lambda v: Guide.regex(v, r"\w{500}\w{500}\w{500}"), "too large"),
        (lambda v: Guide.regex(v, r"[^\s\S]"), "matches no string"),
        (lambda v: Guide.choice(v, []), "at least one"),
        (
            lambda v: Guide.json_schema(v, '{"type": "array", "uniqueItems": true}'),
            "unsupported JSON Schema keyword `uniqueItems`",
        ),
        (lambda v: Guide.json_schema(v, '{"not": {"minimum": 3}}'), "unsupported JSON Schema keyword `not`"),
        (lambda v: Guide.json_schema(v, "{"), "invalid JSON Schema"),
        (lambda v: Guide.json_schema(v, '{"type": "string", "format": "bogus"}'), "format"),
        (lambda v: Guide.grammar(v, "start: ("), "invalid grammar"),
        (lambda v: Guide.grammar(v, "root ::= foo"), "not defined"),
    ],
)
def test_compile_errors_fail_closed(vocab: Vocabulary, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        call(vocab)


def test_mask_wider_than_vocab_and_eos(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    g = Guide.regex(vocab, "(yes|no)")
    st = GuideState(g)
    m = mask_of(st, len(vocab), width=len(vocab) + 100)
    assert not allowed(m, len(vocab) + 100)[len(vocab) :].any(), "padding stays masked"
    a = allowed(m, len(vocab))
    assert not a[spm.eos] and not a[spm.special].any()
    ids = spm.encode("yes")
    for t in ids:
        assert st.advance(t)
    assert st.is_accepting() and st.is_finished()
    a = allowed(mask_of(st, len(vocab)), len(vocab))
    assert np.flatnonzero(a).tolist() == [spm.eos]
    assert not st.advance(ids[0])
    assert st.advance(spm.eos)
    assert not allowed(mask_of(st, len(vocab)), len(vocab)).any()


def test_int32_buffer_and_bad_buffers(vocab: Vocabulary) -> None:
    st = GuideState(Guide.regex(vocab, "a"))
    i32 = np.zeros(1024, dtype=np.int32)
    st.fill_mask(i32)
    u32 = np.zeros(1024, dtype=np.uint32)
    st.fill_mask(u32)
    assert (i32.view(np.uint32) == u32).all()
    with pytest.raises(ValueError, match="words"):
        st.fill_mask(np.zeros(10, dtype=np.uint32))
    with pytest.raises(ValueError, match="uint32"):
        st.fill_mask(np.zeros(1024, dtype=np.float32))


def test_refused_token_leaves_state_unchanged(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    st = GuideState(Guide.regex(vocab, "ab"))
    (b,) = spm.encode("b")[-1:]
    assert not st.advance(b)
    assert not st.advance(-1) and not st.advance(10**9)
    for t in spm.encode("ab"):
        assert st.advance(t)
    assert st.is_accepting()


def test_multibyte_prefixes(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    # `é` is 0xC3 0xA9: the byte-fallback piece <0xC3> is allowed, <0xC4> is not.
    st = GuideState(Guide.regex(vocab, "é+"))
    a = allowed(mask_of(st, len(vocab)), len(vocab))
    byte_id = {
        spm.token_bytes[i]: i for i in range(len(vocab)) if len(spm.token_bytes[i]) == 1 and i not in spm.special
    }
    assert a[byte_id[b"\xc3"]] and not a[byte_id[b"\xc4"]]
    assert st.advance(byte_id[b"\xc3"]) and not st.is_accepting()
    assert st.advance(byte_id[b"\xa9"]) and st.is_accepting()


def test_choice_and_grammars(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    g = Guide.choice(vocab, ["red", "green", "a.b"])
    assert walk(g, spm.encode("green")) == (True, True)
    assert not walk(g, spm.encode("axb"))[1]
    lark = Guide.grammar(vocab, 'start: "(" item ("," item)* ")"\nitem: /[0-9]+/')
    assert walk(lark, spm.encode("(1,22,333)")) == (True, True)
    assert not walk(lark, spm.encode("(1,)"))[0]
    gbnf = Guide.grammar(vocab, 'root ::= "[" num ("," num)* "]"\nnum ::= [0-9]+ # digits\n')
    assert walk(gbnf, spm.encode("[1,2]")) == (True, True)
    assert not walk(gbnf, spm.encode("[a]"))[0]


def test_whitespace_pattern(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}})
    compact = Guide.json_schema(vocab, schema)
    spaced = Guide.json_schema(vocab, schema, whitespace_pattern=" ")
    assert walk(compact, spm.encode('{"a":[1,2]}')) == (True, True)
    assert not walk(compact, spm.encode('{"a": [1, 2]}'))[0]
    assert walk(spaced, spm.encode('{"a": [1, 2]}')) == (True, True)


# ---- regex masks against brute force --------------------------------------------------------

PATTERNS = [
    r"\d{3}-\d{4}",
    r"(true|false|null)",
    r"[A-Z][a-z]+( [A-Z][a-z]+)*",
    r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?",
    r'\{"name": "[^"]{0,12}", "age": \d{1,3}\}',
    r"(ab|abc|b)*c",
    r"[\u0400-\u04FF ]{1,10}",
]


def brute_force(pattern: str, prefix: bytes, spm: gv.VocabSpec) -> tuple[np.ndarray, np.ndarray]:
    """(allowed, checked): token t allowed iff prefix + bytes(t) extends to a full match, for the
    tokens whose concatenation decodes completely (`checked`)."""
    import regex

    rx = regex.compile(pattern)
    n = len(spm.token_bytes)
    ok = np.zeros(n, dtype=bool)
    checked = np.zeros(n, dtype=bool)
    special = set(spm.special)
    for t, b in enumerate(spm.token_bytes):
        if t in special or not b:
            continue
        try:
            text = (prefix + b).decode()
        except UnicodeDecodeError:
            continue
        checked[t] = True
        ok[t] = rx.fullmatch(text, partial=True) is not None
    return ok, checked


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_masks_match_brute_force(vocab: Vocabulary, spm: gv.VocabSpec, pattern: str) -> None:
    import regex

    g = Guide.regex(vocab, pattern)
    rng = random.Random(pattern)
    st = GuideState(g)
    prefix = b""
    n = len(vocab)
    for _ in range(6):
        ours = allowed(mask_of(st, n), n)
        want, checked = brute_force(pattern, prefix, spm)
        bad = np.flatnonzero((ours != want) & checked)
        assert bad.size == 0, [(int(t), spm.token_bytes[t], bool(ours[t])) for t in bad[:10]]
        assert ours[spm.eos] == (regex.fullmatch(pattern, prefix.decode()) is not None)
        choices = [int(t) for t in np.flatnonzero(ours & checked)]
        if not choices:
            break
        t = rng.choice(choices)
        assert st.advance(t)
        prefix += spm.token_bytes[t]


# ---- maskbench-dev replay and llguidance --------------------------------------------------


def subset(k: int, seed: int) -> list[gr.Schema]:
    schemas = [s for s in gr.load_maskbench() if s.tests]
    return random.Random(seed).sample(schemas, k)


def replay_errors(v: Vocabulary, spec: gv.VocabSpec, schemas: list[gr.Schema]) -> tuple[int, int, int, list[str]]:
    compiled = validation = invalidation = 0
    failures = []
    words = (len(v) + 31) // 32
    mask = np.zeros(words, dtype=np.uint32)
    for s in schemas:
        try:
            g = Guide.json_schema(v, json.dumps(s.schema), whitespace_pattern=gr.WHITESPACE)
        except ValueError:
            continue
        compiled += 1
        for valid, text in gr.instances(s):
            r = gr.replay(GuideState(g), spec.encode(text), mask)
            if valid and not r.accepted:
                validation += 1
                failures.append(f"{s.name}: valid rejected at {r.accepted_tokens}/{r.n_tokens}: {text[:120]}")
            if not valid and r.accepted:
                invalidation += 1
                failures.append(f"{s.name}: invalid accepted: {text[:120]}")
    return compiled, validation, invalidation, failures


def test_maskbench_replay_sentencepiece(vocab: Vocabulary, spm: gv.VocabSpec) -> None:
    compiled, validation, invalidation, failures = replay_errors(vocab, spm, subset(60, 1))
    assert compiled >= 45
    assert (validation, invalidation) == (0, 0), failures[:5]


def test_maskbench_replay_tekken(tekken: gv.VocabSpec) -> None:
    v = Vocabulary(tekken.token_bytes, [tekken.eos], tekken.special)
    compiled, validation, invalidation, failures = replay_errors(v, tekken, subset(25, 2))
    assert compiled >= 18
    assert (validation, invalidation) == (0, 0), failures[:5]


@pytest.mark.parametrize(("vocab_name", "k"), [("sentencepiece", 150), ("tekken", 60)])
def test_masks_match_llguidance(vocab_name: str, k: int, spm: gv.VocabSpec, tekken: gv.VocabSpec) -> None:
    """Along every valid instance of a seeded maskbench subset, both tokenizers, our JSON Schema
    masks (the tokenwire-json engine) equal llguidance's (the PyPI package) bit for bit up to the
    documented policy differences (``bench/guided_oracle.py`` classifies each differing token;
    ``python bench/guided_oracle.py`` runs the whole corpus)."""
    pytest.importorskip("llguidance")
    import guided_oracle

    spec = spm if vocab_name == "sentencepiece" else tekken
    r = guided_oracle.run(spec, subset(k, 3))
    assert r["schemas_compared"] >= k // 2
    assert r["masks"] > 20 * k
    assert r["unclassified_masks"] == 0, r["unclassified"][:5]


def test_stub_lists_the_classes() -> None:
    for name in ("Vocabulary", "Guide", "GuideState"):
        assert hasattr(sampler_rs, name)
