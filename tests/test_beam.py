"""`sampler_rs.BeamSearch` against transformers' own beam search (`generate(num_beams=...)`).

Each case drives a tiny random-weight `LlamaForCausalLM` two ways: with `model.generate`, and with
a loop that does what tokenwire's engine does (prefill the prompt repeated `num_beams` times into
a KV cache; each step `BeamSearch.step(logits)`, reorder the cache by `parent`, feed `token`; stop
at `is_done()`). The returned sequences must be equal and `sequences_scores` within 1e-4.

Two models:
- `mistral`: hidden 64, 2 layers, the real 32,768-token Mistral vocabulary (the embedded model's
  architecture). Its EOS (`</s>`, id 2) is never among the best continuations of these random
  weights: every hypothesis ends at `max_new_tokens`.
- `peaky`: a 1,000-token vocabulary with larger weights (peaked distributions), and an EOS id
  chosen as the token greedy decoding emits at step 3 of the prompt, so that hypotheses do end
  with EOS; the test asserts some do (and that some do not).
- `eosy`: `peaky` with a bias of +5 on token 2 (its EOS) in the LM head, so that beams finish
  often: the early-stopping rules end searches before `max_new_tokens`, differently for
  `early_stopping` True / False / "never" (asserted).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch

sampler_rs = pytest.importorskip("sampler_rs")

from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
PAD = 7  # a pad id that is not EOS, so generate() pads with it (it pads with EOS when pad is 0)


@functools.cache
def mistral() -> tuple[Any, list[int], list[int]]:
    """(model, prompt, eos ids) for the Mistral-vocabulary model."""
    from service import tiny_model

    torch.set_num_threads(2)
    model, tok = tiny_model.build(seed=1234, overrides=SMALL)
    prompt = tok("The quick brown fox jumps over")["input_ids"]
    return model, prompt, [2]


@functools.cache
def peaky() -> tuple[Any, list[int], list[int]]:
    """(model, prompt, eos ids) for the 1,000-token model whose EOS gets chosen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    cfg = LlamaConfig(
        **SMALL,
        vocab_size=1000,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    torch.manual_seed(99)
    model = LlamaForCausalLM(cfg).eval()  # type: ignore[no-untyped-call]
    prompt = [1, 17, 345, 801, 52, 9]
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=3,
            eos_token_id=None,
            pad_token_id=PAD,
        )[0, len(prompt) :].tolist()
    return model, prompt, [greedy[2]]


@functools.cache
def eosy() -> tuple[Any, list[int], list[int]]:
    """(model, prompt, eos ids): `peaky` with an LM-head bias of +5 on its EOS, token 2."""
    import copy

    base, prompt, _ = peaky()
    model = copy.deepcopy(base)
    head = torch.nn.Linear(base.lm_head.in_features, base.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(base.lm_head.weight)
        head.bias.zero_()
        head.bias[2] = 5.0
    model.lm_head = head
    return model, prompt, [2]


MODELS = {"mistral": mistral, "peaky": peaky, "eosy": eosy}


@functools.cache
def tekken() -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt): a random Llama over the Tekken vocabulary (131,072 byte-level BPE tokens, from
    mistral-common), another shape than the others: 3 layers, multi-query attention, tied embeddings."""
    import mistral_common
    from transformers import LlamaConfig, LlamaForCausalLM, MistralCommonBackend

    torch.set_num_threads(2)
    path = mistral_common.__file__.rsplit("/", 1)[0] + "/data/tekken_240911.json"
    tok = MistralCommonBackend(tokenizer_path=path)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()  # type: ignore[no-untyped-call]
    prompt = [1, *tok.encode("Décris la mer, s'il te plaît 🌊", add_special_tokens=False)]
    return model, tok, prompt


class EosBias(LogitsProcessor):
    """+`bias` on one token after log-softmax (where beam search applies processors): beams then end with it."""

    def __init__(self, token: int, bias: float) -> None:
        self.token, self.bias = token, bias

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token] += self.bias
        return scores  # type: ignore[return-value]


@pytest.mark.parametrize(("k", "n", "lp", "es"), [(2, 2, 1.0, True), (4, 2, 0.7, False), (8, 4, 1.5, "never")])
def test_matches_generate_on_tekken(k: int, n: int, lp: float, es: bool | str) -> None:
    """The second tokenizer and model shape: sequences equal and scores within 1e-4, some ending with EOS."""
    model, _, prompt = tekken()
    params = sampler_rs.SamplingParams(logit_bias={2: 6.0}, eos_token_ids=[2])
    rows, scores = run_generate(model, prompt, [2], k=k, n=n, lp=lp, es=es, m=8, processors=[EosBias(2, 6.0)])
    ours = run_ours(model, prompt, [2], k=k, n=n, lp=lp, es=es, m=8, params=params)
    check(ours, rows, scores, [2])
    assert any(h.finished_by_eos for h in ours)


def run_generate(
    model: Any,
    prompt: list[int],
    eos: list[int],
    *,
    k: int,
    n: int,
    lp: float,
    es: bool | str,
    m: int,
    processors: list[Any] | None = None,
    **gen_kwargs: Any,
) -> tuple[list[list[int]], list[float]]:
    """transformers' beam search: the generated part of each returned row, and its score."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=k,
            num_return_sequences=n,
            length_penalty=lp,
            early_stopping=es,
            do_sample=False,
            max_new_tokens=m,
            eos_token_id=eos,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
            logits_processor=LogitsProcessorList(processors or []),
            **gen_kwargs,
        )
    rows = [r[len(prompt) :].tolist() for r in out.sequences]
    return rows, out.sequences_scores.tolist()


def run_ours(
    model: Any,
    prompt: list[int],
    eos: list[int],
    *,
    k: int,
    n: int,
    lp: float,
    es: bool | str,
    m: int,
    params: Any = None,
    steps: list[int] | None = None,
) -> list[Any]:
    """The engine's loop around `sampler_rs.BeamSearch` (appends the steps taken to `steps`)."""
    vocab = model.config.vocab_size
    bs = sampler_rs.BeamSearch(
        num_beams=k,
        num_return=n,
        length_penalty=lp,
        early_stopping=es,
        eos_token_ids=eos,
        max_new_tokens=m,
        vocab_size=vocab,
        params=params,
        prompt_token_ids=prompt,
    )
    ids = torch.tensor([prompt] * k)
    mask = torch.ones(k, len(prompt), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        while True:
            logits = out.logits[:, -1].float().contiguous().numpy()
            parent, token = bs.step(logits)
            if bs.is_done():
                break
            cache = out.past_key_values
            cache.reorder_cache(torch.tensor(parent))
            mask = torch.cat([mask, torch.ones(k, 1, dtype=torch.long)], dim=1)
            out = model(
                input_ids=torch.tensor(token)[:, None],
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
            )
    if steps is not None:
        steps.append(bs.steps)
    return list(bs.finalize())


def check(ours: list[Any], rows: list[list[int]], scores: list[float], eos: list[int]) -> None:
    assert len(ours) == len(rows)
    for h, row, score in zip(ours, rows, scores, strict=True):
        got = h.token_ids
        assert row[: len(got)] == got, (row, got)
        assert all(t == PAD for t in row[len(got) :]), (row, got)
        assert h.finished_by_eos == (got[-1] in eos)
        assert abs(h.score - score) <= 1e-4, (h.score, score)


GRID = [
    (k, n, lp, es) for k in (2, 4, 8) for n in sorted({1, k}) for lp in (0.5, 1.0, 2.0) for es in (True, False, "never")
]
eos_reached: dict[str, list[bool]] = {name: [] for name in MODELS}
# eosy: (k, n, lp) -> {early_stopping: steps taken}
eosy_steps: dict[tuple[int, int, float], dict[str, int]] = {}


@pytest.mark.parametrize(("k", "n", "lp", "es"), GRID)
@pytest.mark.parametrize("which", list(MODELS))
def test_matches_generate(which: str, k: int, n: int, lp: float, es: bool | str) -> None:
    model, prompt, eos = MODELS[which]()
    m = 10
    rows, scores = run_generate(model, prompt, eos, k=k, n=n, lp=lp, es=es, m=m)
    steps: list[int] = []
    ours = run_ours(model, prompt, eos, k=k, n=n, lp=lp, es=es, m=m, steps=steps)
    check(ours, rows, scores, eos)
    eos_reached[which].extend(h.finished_by_eos for h in ours)
    if which == "eosy":
        eosy_steps.setdefault((k, n, lp), {})[str(es)] = steps[0]


def test_eos_and_early_stopping_cases_are_covered() -> None:
    """`peaky` reaches EOS in some hypotheses and not in others; `mistral` never does; in `eosy`
    the early-stopping rules end some searches early, and the three modes differ somewhere."""
    if not eos_reached["peaky"] or len(eosy_steps) < 9:
        pytest.skip("run with the whole grid")
    assert any(eos_reached["peaky"]) and not all(eos_reached["peaky"])
    assert not any(eos_reached["mistral"])
    by_mode = list(eosy_steps.values())
    assert any(s < 10 for d in by_mode for s in d.values())
    assert any(d["True"] != d["False"] for d in by_mode)
    assert any(d["False"] != d["never"] for d in by_mode)


class FreqPresence(LogitsProcessor):
    """OpenAI frequency/presence penalties over the generated tokens (after the prompt)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for r in range(scores.shape[0]):
            toks, counts = torch.unique(input_ids[r, self.prompt_len :], return_counts=True)
            if len(toks):
                out[r, toks] = out[r, toks] - counts.float() * self.frequency - self.presence
        return out  # type: ignore[return-value]


@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize(("k", "es"), [(2, False), (4, True), (8, "never")])
def test_processors_match_generate(which: str, k: int, es: bool | str) -> None:
    """Logit bias, repetition penalty, min_tokens and frequency/presence compose as in transformers."""
    model, prompt, eos = MODELS[which]()
    m = 10
    rows, _ = run_generate(model, prompt, eos, k=k, n=k, lp=1.0, es=es, m=m)
    # Bias against the two most common tokens of the unprocessed search, and for a third.
    seen = [t for r in rows for t in r if t != PAD]
    common = [int(t) for t in np.bincount(seen).argsort()[::-1][:2]]
    boosted = (prompt[-1] + 5) % model.config.vocab_size
    bias = {common[0]: -3.0, common[1]: -50.0, boosted: 1.5}
    params = sampler_rs.SamplingParams(
        temperature=0.0,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        presence_penalty=0.3,
        logit_bias=bias,
        min_tokens=2,
    )
    rows, scores = run_generate(
        model,
        prompt,
        eos,
        k=k,
        n=k,
        lp=1.0,
        es=es,
        m=m,
        processors=[FreqPresence(len(prompt), 0.4, 0.3)],
        repetition_penalty=1.3,
        sequence_bias={(t,): b for t, b in bias.items()},
        min_new_tokens=2,
    )
    ours = run_ours(model, prompt, eos, k=k, n=k, lp=1.0, es=es, m=m, params=params)
    check(ours, rows, scores, eos)


def test_ignore_eos_never_finishes_by_eos() -> None:
    model, prompt, eos = peaky()
    params = sampler_rs.SamplingParams(ignore_eos=True)
    ours = run_ours(model, prompt, eos, k=4, n=4, lp=1.0, es=False, m=6, params=params)
    assert all(len(h.token_ids) == 6 and not h.finished_by_eos for h in ours)


def test_step_contract() -> None:
    v = 50
    bs = sampler_rs.BeamSearch(num_beams=3, num_return=2, eos_token_ids=[0], max_new_tokens=2, vocab_size=v)
    rng = np.random.default_rng(0)
    wide = np.full((3, v + 14), 1e4, dtype=np.float32)  # padding columns are never chosen
    wide[:, :v] = rng.standard_normal((3, v)).astype(np.float32)
    parent, token = bs.step(wide)
    assert parent == [0, 0, 0]  # only beam 0 is live at the first step
    assert all(0 < t < v for t in token) and len(set(token)) == 3
    assert not bs.is_done()
    bs.step(np.ascontiguousarray(wide[:, :v]))
    assert bs.is_done()
    hyps = bs.finalize()
    assert len(hyps) == 2 and hyps[0].score >= hyps[1].score
    with pytest.raises(RuntimeError, match="done"):
        bs.step(wide)


def test_finalize_early_returns_running_beams() -> None:
    v = 40
    bs = sampler_rs.BeamSearch(num_beams=2, num_return=2, eos_token_ids=[], max_new_tokens=10, vocab_size=v)
    with pytest.raises(ValueError, match="finalize"):
        bs.finalize()
    logits = np.random.default_rng(1).standard_normal((2, v)).astype(np.float32)
    bs.step(logits)
    bs.step(logits)
    hyps = bs.finalize()
    assert [len(h.token_ids) for h in hyps] == [2, 2]
    assert not any(h.finished_by_eos for h in hyps)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"num_beams": 0}, "num_beams"),
        ({"num_return": 0}, "num_return"),
        ({"num_return": 5}, "num_return"),
        ({"early_stopping": "always"}, "early_stopping"),
        ({"early_stopping": 1}, "early_stopping"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"length_penalty": float("nan")}, "length_penalty"),
        ({"eos_token_ids": [100]}, "eos_token_ids"),
        ({"eos_token_ids": [-1]}, "eos_token_ids"),
        ({"prompt_token_ids": [100]}, "prompt_token_ids"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"params": sampler_rs.SamplingParams(logit_bias={100: 1.0})}, "logit_bias"),
    ],
)
def test_validation_names_the_parameter(kwargs: dict[str, Any], parameter: str) -> None:
    args: dict[str, Any] = {
        "num_beams": 4,
        "num_return": 2,
        "eos_token_ids": [2],
        "max_new_tokens": 4,
        "vocab_size": 100,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{parameter}`"):
        sampler_rs.BeamSearch(**args)


def test_step_rejects_bad_logits() -> None:
    bs = sampler_rs.BeamSearch(num_beams=2, num_return=1, eos_token_ids=[2], max_new_tokens=4, vocab_size=10)
    for bad in (
        np.zeros((3, 10), dtype=np.float32),
        np.zeros((2, 9), dtype=np.float32),
        np.zeros((2, 10), dtype=np.float64),
        np.asfortranarray(np.zeros((2, 10), dtype=np.float32)),
    ):
        with pytest.raises(ValueError, match="`logits`"):
            bs.step(bad)
