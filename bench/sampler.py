"""bench/sampler: one full sampling step, sampler_rs vs transformers' processors vs one copy of the logits.

    .venv/bin/python bench/sampler.py [--repeats 30] [--out bench/results/sampler.json]

Every stage is on: logit bias (16 tokens), repetition penalty 1.1 (over 256 prompt + 64 generated tokens),
frequency 0.2 / presence 0.1 penalties, temperature 0.8, top-k 50, top-p 0.9, min-p 0.05, sampling, top-5 logprobs.
Peer in the same run: transformers' LogitsProcessorList (RepetitionPenalty, a vectorised OpenAI-penalty and bias
processor, Temperature, TopK, TopP, MinP) + softmax + torch.multinomial + log_softmax/topk for the logprobs.
Floor: one copy of the [batch, vocab] float32 logits buffer. Reports medians (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import sampler_rs

BATCHES = (1, 16, 64)
VOCABS = (32768, 131072)
PROMPT, GENERATED, BIASED = 256, 64, 16


class OpenAIPenalties:
    """Frequency/presence penalties over generated tokens and a logit bias, vectorised in torch."""

    def __init__(self, prompt_len: int, bias_ids: torch.Tensor, bias: torch.Tensor) -> None:
        self.prompt_len, self.bias_ids, self.bias = prompt_len, bias_ids, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.index_add(1, self.bias_ids, self.bias.expand(scores.shape[0], -1))
        counts = torch.zeros_like(scores).scatter_add_(
            1, input_ids[:, self.prompt_len :], torch.ones_like(input_ids[:, self.prompt_len :], dtype=scores.dtype)
        )
        return scores - counts * 0.2 - (counts > 0).to(scores.dtype) * 0.1


def median_ms(fn: Any, repeats: int, setup: Any = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(times)


def bench_case(batch: int, vocab: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(batch * 7 + vocab)
    logits = (rng.standard_normal((batch, vocab), dtype=np.float32) * 3.0).astype(np.float32)
    history = rng.integers(0, vocab, size=(batch, PROMPT + GENERATED))
    bias_ids = rng.choice(vocab, size=BIASED, replace=False)
    bias = {int(t): float(b) for t, b in zip(bias_ids, rng.uniform(-5, 5, BIASED), strict=True)}

    # -- ours: sequences carry their history, as in the engine
    sampler = sampler_rs.Sampler(vocab)
    params = sampler_rs.SamplingParams(
        temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, seed=1, top_logprobs=5, repetition_penalty=1.1,
        frequency_penalty=0.2, presence_penalty=0.1, logit_bias=bias,
    )  # fmt: skip
    ids = list(range(batch))
    for i in ids:
        sampler.add_sequence(i, params, [int(t) for t in history[i, :PROMPT]])
    work = np.empty_like(logits)
    for t in range(GENERATED):  # replay the generated history through the sampler's own state
        forced = np.full_like(logits, -1e9)
        forced[np.arange(batch), history[:, PROMPT + t]] = 0.0
        sampler.step(forced, ids)

    def refill() -> None:
        np.copyto(work, logits)

    ours = median_ms(lambda: sampler.step(work, ids), repeats, setup=refill)
    copy = median_ms(lambda: np.copyto(work, logits), repeats)

    # -- transformers' chain on the same logits and history
    input_ids = torch.from_numpy(history)
    processors = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.1),
        OpenAIPenalties(PROMPT, torch.from_numpy(bias_ids), torch.tensor(list(bias.values()), dtype=torch.float32)),
        TemperatureLogitsWarper(0.8), TopKLogitsWarper(50), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05),
    ])  # fmt: skip
    scores_in = torch.from_numpy(logits)
    gen = torch.Generator().manual_seed(1)

    def hf_step() -> None:
        scores = processors(input_ids, scores_in)
        probs = torch.softmax(scores, dim=-1)
        chosen = torch.multinomial(probs, 1, generator=gen)
        raw = torch.log_softmax(scores_in, dim=-1)
        raw.gather(1, chosen)
        torch.topk(raw, 5, dim=-1)

    hf = median_ms(hf_step, max(3, repeats // 3 if vocab * batch > 2_000_000 else repeats))
    return {
        "batch": batch, "vocab": vocab, "sampler_rs_ms": ours, "transformers_ms": hf, "copy_ms": copy,
        "speedup_vs_transformers": hf / ours, "ratio_to_copy": ours / copy,
    }  # fmt: skip


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0],
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "rayon_threads":
        os.environ.get("RAYON_NUM_THREADS", "default"), "platform": platform.platform(),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sampler.json")
    args = ap.parse_args()
    rows = [bench_case(b, v, args.repeats) for v in VOCABS for b in BATCHES]
    print(f"{'batch x vocab':>14} | {'sampler_rs ms':>13} | {'transformers ms':>15} | {'copy ms':>8} | "
          f"{'speedup':>8} | {'x copy':>7}")  # fmt: skip
    print("-" * 82)
    for r in rows:
        cells = (
            f"{r['batch']:>5} x {r['vocab']:<6}",
            f"{r['sampler_rs_ms']:>13.3f}",
            f"{r['transformers_ms']:>15.2f}",
            f"{r['copy_ms']:>8.3f}",
            f"{r['speedup_vs_transformers']:>7.1f}x",
            f"{r['ratio_to_copy']:>6.2f}x",
        )
        print(" | ".join(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
