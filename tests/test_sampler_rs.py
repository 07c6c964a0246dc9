"""Differential and behavioural tests of the `sampler_rs` extension module.

The processed scores come from `sampler_rs.process_logits`, the same code `Sampler.step` runs;
the references are transformers' own logits processors.
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import sampler_rs
from sampler_rs import Sampler, SamplingParams

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Logits with ties (small integers) and -inf, at least one finite value per row.
_element = st.one_of(
    st.floats(-20, 20, width=32),
    st.floats(-20, 20, width=32),
    st.integers(-3, 3).map(float),
    st.just(-math.inf),
)


@st.composite
def logit_rows(draw: st.DrawFn, max_rows: int = 3, max_vocab: int = 80) -> np.ndarray:
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(2, max_vocab))
    x = draw(arrays(np.float32, (rows, vocab), elements=_element))
    x[:, draw(st.integers(0, vocab - 1))] = draw(st.floats(-5, 5, width=32))
    return x


def _reference(
    logits: np.ndarray,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    input_ids: list[list[int]] | None = None,
) -> np.ndarray:
    scores = torch.from_numpy(logits.copy())
    if repetition_penalty != 1.0:
        assert input_ids is not None
        width = max(len(ids) for ids in input_ids)
        # Pad with a repeat of each row's first id, which changes nothing (distinct tokens).
        ids = torch.tensor([row + row[:1] * (width - len(row)) for row in input_ids])
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(ids, scores)
    dummy = cast(torch.LongTensor, torch.zeros((logits.shape[0], 1), dtype=torch.long))
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(dummy, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(dummy, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(dummy, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(dummy, scores)
    return scores.numpy()


def _process(logits: np.ndarray, params: SamplingParams, prompts: list[list[int]] | None = None) -> np.ndarray:
    rows = logits.shape[0]
    prompts = prompts if prompts is not None else [[] for _ in range(rows)]
    return sampler_rs.process_logits(logits, params, prompts, [[] for _ in range(rows)])


def _boundary_ok(scores_before: np.ndarray, token: int, top_p: float, min_p: float) -> bool:
    """Whether `token` sits (to rounding) on a top-p or min-p boundary of the pre-filter scores."""
    s = scores_before.astype(np.float64)
    finite = np.isfinite(s)
    m = s[finite].max()
    w = np.where(finite, np.exp(s - m), 0.0)
    z = w.sum()
    above = w[s > s[token]].sum() / z
    same = w[s == s[token]].sum() / z
    near_top_p = top_p < 1.0 and above - 1e-5 <= top_p <= above + same + 1e-5
    near_min_p = min_p > 0.0 and abs(w[token] - min_p) <= 1e-5 * max(min_p, 1e-3)
    return bool(near_top_p or near_min_p)


def _assert_same_scores(got: np.ndarray, want: np.ndarray, before: np.ndarray, top_p: float, min_p: float) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    for r in range(got.shape[0]):
        g_kept, w_kept = np.isfinite(got[r]) | (got[r] > 0), np.isfinite(want[r]) | (want[r] > 0)
        for t in np.flatnonzero(g_kept != w_kept):
            assert _boundary_ok(before[r], int(t), top_p, min_p), (r, int(t), got[r], want[r])
        both = g_kept & w_kept
        np.testing.assert_allclose(got[r][both], want[r][both], rtol=1e-5, atol=1e-6)


@SETTINGS
@given(logit_rows(), st.floats(0.05, 3.0))
def test_temperature_matches_transformers(logits: np.ndarray, temperature: float) -> None:
    got = _process(logits, SamplingParams(temperature=temperature))
    want = _reference(logits, temperature=temperature)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@SETTINGS
@given(logit_rows(), st.integers(1, 100), st.floats(0.3, 2.0))
def test_top_k_matches_transformers(logits: np.ndarray, top_k: int, temperature: float) -> None:
    got = _process(logits, SamplingParams(top_k=top_k, temperature=temperature))
    want = _reference(logits, top_k=top_k, temperature=temperature)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_allclose(got, want, rtol=1e-6)


@SETTINGS
@given(logit_rows(), st.floats(0.01, 0.99))
def test_top_p_matches_transformers(logits: np.ndarray, top_p: float) -> None:
    got = _process(logits, SamplingParams(top_p=top_p))
    want = _reference(logits, top_p=top_p)
    _assert_same_scores(got, want, logits, top_p, 0.0)


@SETTINGS
@given(logit_rows(), st.floats(0.001, 1.0))
def test_min_p_matches_transformers(logits: np.ndarray, min_p: float) -> None:
    got = _process(logits, SamplingParams(min_p=min_p))
    want = _reference(logits, min_p=min_p)
    _assert_same_scores(got, want, logits, 1.0, min_p)


@SETTINGS
@given(logit_rows(max_vocab=40), st.floats(0.2, 3.0), st.data())
def test_repetition_penalty_matches_transformers(logits: np.ndarray, penalty: float, data: st.DataObject) -> None:
    vocab = logits.shape[1]
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12)) for _ in range(logits.shape[0])]
    got = _process(logits, SamplingParams(repetition_penalty=penalty), prompts)
    want = _reference(logits, repetition_penalty=penalty, input_ids=prompts)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@SETTINGS
@given(
    logit_rows(),
    st.floats(0.3, 2.0),
    st.integers(0, 30),
    st.floats(0.05, 1.0),
    st.sampled_from([0.0, 0.01, 0.1, 0.5]),
    st.floats(0.5, 2.0),
    st.data(),
)
def test_full_chain_matches_transformers(
    logits: np.ndarray,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    penalty: float,
    data: st.DataObject,
) -> None:
    vocab = logits.shape[1]
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=8)) for _ in range(logits.shape[0])]
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty)
    got = _process(logits, params, prompts)
    want = _reference(
        logits,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=penalty,
        input_ids=prompts,
    )
    before = _reference(logits, temperature=temperature, top_k=top_k, repetition_penalty=penalty, input_ids=prompts)
    _assert_same_scores(got, want, before, top_p, min_p)


@pytest.mark.parametrize(
    "kw",
    [
        {"top_k": 50},
        {"top_k": 1000, "temperature": 0.7},
        {"top_p": 0.9},
        {"top_p": 0.5, "temperature": 1.7},
        {"min_p": 0.05},
        {"top_k": 200, "top_p": 0.95, "min_p": 0.01, "temperature": 0.8},
    ],
)
def test_wide_rows_match_transformers(kw: dict[str, float]) -> None:
    # Rows much wider than a chunk exercise the chunk skipping, the banded top-p gather and the
    # quickselect on the top-p prefix; a quantised copy adds ties.
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((3, 20000)) * 3).astype(np.float32)
    logits[1] = np.round(logits[1] * 2) / 2
    logits[2, ::7] = -np.inf
    got = _process(logits, SamplingParams(**kw))  # type: ignore[arg-type]
    want = _reference(logits, **kw)  # type: ignore[arg-type]
    before = _reference(logits, temperature=kw.get("temperature", 1.0), top_k=int(kw.get("top_k", 0)))
    _assert_same_scores(got, want, before, kw.get("top_p", 1.0), kw.get("min_p", 0.0))


def test_frequency_presence_and_bias() -> None:
    logits = np.linspace(-2, 2, 10, dtype=np.float32)[None, :]
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={0: 3.0, 9: -1.0})
    got = sampler_rs.process_logits(logits, params, [[4]], [[1, 1, 2]])
    want = logits.copy()
    want[0, 0] += 3.0
    want[0, 9] -= 1.0
    want[0, 1] -= 2 * 0.5 + 0.25
    want[0, 2] -= 1 * 0.5 + 0.25
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _sampler(vocab: int, n: int = 1, **kw: object) -> Sampler:
    s = Sampler(vocab)
    for i in range(n):
        s.add_sequence(i, SamplingParams(**kw), [])  # type: ignore[arg-type]
    return s


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax() -> None:
    rng = np.random.default_rng(0)
    vocab, width, rows = 1000, 1024, 8
    logits = (rng.standard_normal((rows, width)) * 4).astype(np.float32)
    logits[:, vocab:] = 1e9  # padding columns are never read
    logits[3, 10] = logits[3, 20] = logits[3, :vocab].max() + 1  # tie: lowest id wins
    s = _sampler(vocab, rows, temperature=0.0, top_logprobs=5)
    outs = s.step(logits, list(range(rows)))
    ref = torch.log_softmax(torch.from_numpy(logits[:, :vocab]), dim=-1).numpy()
    for r, out in enumerate(outs):
        assert out.token_id == int(np.argmax(logits[r, :vocab]))
        assert out.logprob == pytest.approx(float(ref[r, out.token_id]), abs=1e-5)
        order = np.lexsort((np.arange(vocab), -logits[r, :vocab]))[:5]
        assert [t for t, _ in out.top_logprobs] == order.tolist()
        for t, lp in out.top_logprobs:
            assert lp == pytest.approx(float(ref[r, t]), abs=1e-5)
    assert outs[3].token_id == 10


def test_logprob_is_from_unprocessed_row() -> None:
    logits = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    s = Sampler(4)
    s.add_sequence(0, SamplingParams(logit_bias={0: 100.0}, temperature=0.5, top_k=1, seed=1), [])
    (out,) = s.step(logits, [0])
    assert out.token_id == 0
    assert out.logprob == pytest.approx(float(torch.log_softmax(torch.from_numpy(logits), -1)[0, 0]), abs=1e-6)


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    rng = np.random.default_rng(1)
    vocab, steps = 3000, 12
    rows = rng.standard_normal((steps, vocab)).astype(np.float32) * 2
    kw = dict(temperature=0.9, top_p=0.95, top_k=100, seed=1234)
    alone = Sampler(vocab)
    alone.add_sequence(5, SamplingParams(**kw), [])  # type: ignore[arg-type]
    solo = [alone.step(rows[i : i + 1], [5])[0].token_id for i in range(steps)]
    batched = Sampler(vocab)
    for i in range(8):
        batched.add_sequence(100 + i, SamplingParams(seed=i), [])
    batched.add_sequence(5, SamplingParams(**kw), [])  # type: ignore[arg-type]
    got = []
    for i in range(steps):
        buf = rng.standard_normal((9, vocab)).astype(np.float32)
        buf[4] = rows[i]
        ids = [100, 101, 102, 103, 5, 104, 105, 106, 107]
        got.append(batched.step(buf, ids)[4].token_id)
    assert got == solo


def test_samples_follow_filtered_distribution() -> None:
    # Chi-square goodness of fit of 8000 draws against the processed distribution.
    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -8.0]], dtype=np.float32)
    params = dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, seed=99)
    processed = sampler_rs.process_logits(logits, SamplingParams(**params), [[]], [[]])[0]  # type: ignore[arg-type]
    probs = torch.softmax(torch.from_numpy(processed.astype(np.float64)), -1).numpy()
    s = Sampler(8)
    s.add_sequence(0, SamplingParams(**params), [])  # type: ignore[arg-type]
    n = 8000
    batch = np.repeat(logits, 1, axis=0)
    counts = np.zeros(8)
    for _ in range(n):
        counts[s.step(batch, [0])[0].token_id] += 1
    kept = probs > 0
    assert counts[~kept].sum() == 0
    expected = probs[kept] * n
    chi2 = float((((counts[kept] - expected) ** 2) / expected).sum())
    # 99.9th percentile of chi-square with (kept - 1) <= 5 degrees of freedom is 20.5.
    assert chi2 < 20.5, (counts, expected)


def test_min_tokens_and_ignore_eos_mask_eos() -> None:
    logits = np.zeros((1, 6), dtype=np.float32)
    logits[0, 2] = 30.0
    s = Sampler(6)
    s.add_sequence(0, SamplingParams(min_tokens=3, eos_token_ids=[2], seed=0), [])
    toks = [s.step(logits, [0])[0].token_id for _ in range(4)]
    assert 2 not in toks[:3] and toks[3] == 2
    s.add_sequence(1, SamplingParams(ignore_eos=True, eos_token_ids=[2], temperature=0.0), [])
    assert s.step(logits, [1])[0].token_id != 2


def test_sequence_registry() -> None:
    s = Sampler(10)
    p = SamplingParams(seed=1)
    s.add_sequence(1, p, [1, 2])
    assert len(s) == 1 and 1 in s and 2 not in s
    with pytest.raises(ValueError, match="already"):
        s.add_sequence(1, p, [])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        s.add_sequence(2, p, [10])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        s.add_sequence(2, p, [-1])
    s.remove_sequence(1)
    with pytest.raises(KeyError):
        s.remove_sequence(1)
    assert len(s) == 0


def test_step_rejects_bad_input() -> None:
    s = _sampler(8, 2)
    good = np.zeros((2, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="float32"):
        s.step(good.astype(np.float64), [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        s.step(np.zeros(16, dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match="rows"):
        s.step(good, [0])
    with pytest.raises(ValueError, match="columns"):
        s.step(np.zeros((2, 4), dtype=np.float32), [0, 1])
    with pytest.raises(ValueError, match="contiguous"):
        s.step(np.zeros((8, 2), dtype=np.float32).T, [0, 1])
    with pytest.raises(ValueError, match="unknown"):
        s.step(good, [0, 7])
    with pytest.raises(ValueError, match="more than once"):
        s.step(good, [0, 0])
    ro = good.copy()
    ro.flags.writeable = False
    assert len(s.step(ro, [0, 1])) == 2
    assert len(s.step(torch.zeros(2, 8).numpy(), [0, 1])) == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -2),
        ("min_p", 1.5),
        ("seed", -1),
        ("top_logprobs", 21),
        ("repetition_penalty", 0.0),
        ("frequency_penalty", 2.1),
        ("presence_penalty", -2.1),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {1: 101.0}),
        ("min_tokens", -1),
        ("eos_token_ids", [-5]),
    ],
)
def test_params_validation_names_the_parameter(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"`?{name}`?"):
        SamplingParams(**{name: value})  # type: ignore[arg-type]


def test_params_properties_round_trip() -> None:
    p = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.1,
        seed=2**64 - 1,
        top_logprobs=3,
        repetition_penalty=1.2,
        frequency_penalty=0.1,
        presence_penalty=-0.2,
        logit_bias={3: 1.5},
        min_tokens=2,
        ignore_eos=True,
        eos_token_ids=[7, 8],
    )
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.7, 0.9, 40, 0.1, 2**64 - 1)
    assert (p.top_logprobs, p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (3, 1.2, 0.1, -0.2)
    assert (p.logit_bias, p.min_tokens, p.ignore_eos, p.eos_token_ids) == ({3: 1.5}, 2, True, [7, 8])
    with pytest.raises(AttributeError):
        p.temperature = 1.0  # type: ignore[misc]
    assert SamplingParams().seed != SamplingParams().seed  # drawn from OS entropy
