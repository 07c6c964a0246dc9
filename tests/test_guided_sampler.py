"""Guided decoding inside `Sampler.step`, on the real SentencePiece 32k vocabulary.

A batch mixes a regex guide, a choice guide, a JSON Schema guide and an unguided row; random
(seeded) logits are stepped until every guided row reports `guide_finished`, and the decoded
outputs must match their constraints. Padding columns and sampler-vocabulary tokens past the
guide's vocabulary get huge logits, so a leak through the mask would show.
"""

from __future__ import annotations

import json
import os
import re
import sys

import jsonschema
import numpy as np
import pytest

sys.path.append(os.path.join(os.path.dirname(__file__), "..", "bench"))

import guided_vocab as gv

from sampler_rs import Guide, GuideState, Sampler, SamplingParams, StepOutput, Vocabulary

REGEX = r"[a-z]{3}-[0-9]{2}"
CHOICES = ["red", "green", "blue", "ultraviolet"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
EXTRA = 32  # the sampler's vocabulary is longer than the guide's ...
PAD = 64  # ... and the logits rows longer still
MAX_STEPS = 120


@pytest.fixture(scope="module")
def guides(vocab: Vocabulary) -> list[Guide | None]:
    return [
        Guide.regex(vocab, REGEX),
        Guide.choice(vocab, CHOICES),
        Guide.json_schema(vocab, json.dumps(SCHEMA)),
        None,
    ]


def params(spm: gv.VocabSpec, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, top_logprobs=2, eos_token_ids=[spm.eos])


def logits_for(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    logits = (rng.standard_normal((rows, n + EXTRA + PAD), dtype=np.float32) * 3.0).astype(np.float32)
    logits[:, n:] = 1e4  # past the guide vocabulary, and padding: never allowed
    return logits


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, 0), (1.0, 1), (1.0, 2)])
def test_mixed_batch_follows_its_guides(
    spm: gv.VocabSpec, vocab: Vocabulary, guides: list[Guide | None], temperature: float, seed: int
) -> None:
    n = len(vocab)
    sampler = Sampler(n + EXTRA)
    shadow_sampler = Sampler(n + EXTRA)  # the unguided row on its own
    for i, g in enumerate(guides):
        sampler.add_sequence(i, params(spm, temperature, seed * 10 + i), [1, 2, 3], g)
    shadow_sampler.add_sequence(3, params(spm, temperature, seed * 10 + 3), [1, 2, 3])
    shadows = [GuideState(g) if g is not None else None for g in guides]
    tokens: list[list[int]] = [[] for _ in guides]
    live = [0, 1, 2, 3]
    rng = np.random.default_rng(seed)
    for _ in range(MAX_STEPS):
        if live == [3]:
            break
        logits = logits_for(rng, len(live), n)
        outs = sampler.step(logits, live)
        for row, (i, out) in enumerate(zip(live, outs, strict=True)):
            tokens[i].append(out.token_id)
            st = shadows[i]
            if st is None:
                assert not out.guide_finished
                alone = shadow_sampler.step(np.ascontiguousarray(logits[row : row + 1]), [3])[0]
                assert (alone.token_id, alone.logprob) == (out.token_id, out.logprob)
                continue
            assert out.token_id < n, "a guided row never leaves the guide's vocabulary"
            assert out.token_id not in spm.special or out.token_id == spm.eos
            accepting = st.is_accepting()
            assert st.advance(out.token_id), f"row {i}: token {out.token_id} not allowed"
            assert out.token_id != spm.eos or accepting
            assert out.guide_finished == st.is_finished()
            # logprobs are the raw row's
            raw = logits[row, : n + EXTRA].astype(np.float64)
            lse = raw.max() + np.log(np.exp(raw - raw.max()).sum())
            assert out.logprob == pytest.approx(raw[out.token_id] - lse, abs=1e-3)
        live = [i for i, out in zip(live, outs, strict=True) if i == 3 or not out.guide_finished]
    assert live == [3], f"rows {live} did not finish in {MAX_STEPS} steps"

    def text(i: int) -> str:
        return b"".join(spm.token_bytes[t] for t in tokens[i] if t != spm.eos).decode()

    assert re.fullmatch(REGEX, text(0)), text(0)
    assert text(1) in CHOICES
    doc = json.loads(text(2))
    jsonschema.validate(doc, SCHEMA)


def test_eos_mask_yields_to_a_complete_constraint(spm: gv.VocabSpec, vocab: Vocabulary) -> None:
    n = len(vocab)
    g = Guide.choice(vocab, ["yes", "yes!"])
    ids = spm.encode("yes")
    for kw in ({"min_tokens": 100}, {"ignore_eos": True}):
        s = Sampler(n)
        s.add_sequence(0, SamplingParams(temperature=0.0, eos_token_ids=[spm.eos], **kw), [], g)
        logits = np.zeros((1, n), dtype=np.float32)
        logits[0, spm.eos] = 30.0
        for t in ids:
            logits[0, t] = 20.0
        outs = [s.step(logits, [0])[0] for _ in ids]
        assert [o.token_id for o in outs] == ids
        assert not outs[-1].guide_finished  # `!` may follow
        # EOS and `!` are allowed: EOS is masked (min_tokens / ignore_eos), so `!`.
        out = s.step(logits, [0])[0]
        assert spm.token_bytes[out.token_id] == b"!" and out.guide_finished
        # Only EOS is allowed now: the EOS mask yields.
        out = s.step(logits, [0])[0]
        assert out.token_id == spm.eos and out.guide_finished


def test_api(spm: gv.VocabSpec, vocab: Vocabulary) -> None:
    g = Guide.regex(vocab, "a+")
    with pytest.raises(ValueError, match="`guide`"):
        Sampler(100).add_sequence(0, SamplingParams(), [], g)
    s = Sampler(len(vocab))
    s.add_sequence(0, SamplingParams(seed=0), [], guide=g)
    s.add_sequence(1, SamplingParams(seed=0), [])
    s.add_sequence(2, SamplingParams(seed=0), [], None)
    outs: list[StepOutput] = s.step(np.zeros((3, len(vocab)), dtype=np.float32), [0, 1, 2])
    assert b"a" in spm.token_bytes[outs[0].token_id]
    assert [o.guide_finished for o in outs] == [False, False, False]
    assert "guide_finished=False" in repr(outs[0])
    # Every allowed token -inf: nothing can be sampled (ValueError), and nothing moved.
    logits = np.zeros((1, len(vocab)), dtype=np.float32)
    mask = np.zeros((len(vocab) + 31) // 32, dtype=np.uint32)
    st = GuideState(g)
    st.advance(outs[0].token_id)
    st.fill_mask(mask)
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[: len(vocab)].astype(bool)
    logits[0, allowed] = -np.inf
    with pytest.raises(ValueError, match="no token can be sampled for sequence 0"):
        s.step(logits, [0])
    s.remove_sequence(0)
    assert 0 not in s
