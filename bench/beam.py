"""bench/beam: one beam-search step's bookkeeping, sampler_rs.BeamSearch vs transformers' own.

    .venv/bin/python bench/beam.py [--repeats 50] [--out bench/results/beam.json]

Same random float32 logits `[num_beams, 131072]` for both (one EOS id, no processors). Peer in the
same run: the vectorised code path of transformers' `GenerationMixin._beam_search` for one step,
calling its own helpers (`log_softmax`, `+ running_beam_scores`, `_get_top_k_continuations`, the
EOS/max-length `StoppingCriteriaList`, `_get_running_beams_for_next_iteration`,
`_update_finished_beams`, `_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`)
on CPU torch, from a mid-generation state (prompt 16, step 32 of 64). Ours: `BeamSearch.step`,
including the Python call and the numpy borrow. Reports medians in microseconds.
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
import transformers
from transformers.generation.stopping_criteria import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteriaList,
)
from transformers.generation.utils import GenerationMixin

import sampler_rs

VOCAB = 131072
BEAMS = (4, 8)
PROMPT, STEP, MAX_NEW, EOS = 16, 32, 64, 2


def transformers_step(state: dict[str, Any], logits: torch.Tensor) -> bool:
    """One step of `_beam_search`'s bookkeeping (section 4.b–g, without the model call)."""
    g = GenerationMixin
    k, cur_len = state["k"], state["cur_len"]
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
    log_probs = g._unflatten_beam_dim(log_probs, 1, k)
    log_probs = log_probs + state["running_beam_scores"][:, :, None]
    log_probs = torch.reshape(log_probs, (1, -1))
    topk_log_probs, topk_running_sequences, topk_running_beam_indices = g._get_top_k_continuations(
        g,  # type: ignore[arg-type]  # only its static helpers are used
        accumulated_log_probs=log_probs,
        running_sequences=state["running_sequences"],
        running_beam_indices=state["running_beam_indices"],
        cur_len=cur_len,
        decoder_prompt_len=PROMPT,
        do_sample=False,
        beams_to_keep=state["beams_to_keep"],
        num_beams=k,
        batch_size=1,
    )
    hits = state["stopping"](g._flatten_beam_dim(topk_running_sequences[:, :, : cur_len + 1]), None)
    hits = g._unflatten_beam_dim(hits, 1, state["beams_to_keep"])
    running_sequences, running_beam_scores, running_beam_indices = g._get_running_beams_for_next_iteration(
        g,  # type: ignore[arg-type]
        topk_log_probs=topk_log_probs,
        topk_running_sequences=topk_running_sequences,
        topk_running_beam_indices=topk_running_beam_indices,
        next_token_hits_stopping_criteria=hits,
        num_beams=k,
    )
    _, beam_scores, _, is_sent_finished = g._update_finished_beams(
        g,  # type: ignore[arg-type]
        sequences=state["sequences"],
        topk_running_sequences=topk_running_sequences,
        beam_scores=state["beam_scores"],
        topk_log_probs=topk_log_probs,
        beam_indices=state["beam_indices"],
        topk_running_beam_indices=topk_running_beam_indices,
        is_early_stop_heuristic_unsatisfied=state["unsatisfied"],
        is_sent_finished=state["is_sent_finished"],
        next_token_hits_stopping_criteria=hits,
        top_num_beam_mask=state["top_num_beam_mask"],
        num_beams=k,
        cur_len=cur_len,
        decoder_prompt_len=PROMPT,
        length_penalty=1.0,
        early_stopping=False,
    )
    parent = g._flatten_beam_dim(running_beam_indices[..., cur_len - PROMPT])
    unsatisfied = g._check_early_stop_heuristic(
        is_early_stop_heuristic_unsatisfied=state["unsatisfied"],
        running_beam_scores=running_beam_scores,
        beam_scores=beam_scores,
        is_sent_finished=is_sent_finished,
        cur_len=cur_len + 1,
        max_length=PROMPT + MAX_NEW,
        decoder_prompt_len=PROMPT,
        early_stopping=False,
        length_penalty=1.0,
    )
    more = g._beam_search_has_unfinished_sequences(unsatisfied, is_sent_finished, hits, False)
    # The engine needs `parent` and the next tokens on the host, as ours returns them.
    parent.tolist()
    running_sequences[0, :, cur_len].tolist()
    return bool(more)


def transformers_state(k: int) -> dict[str, Any]:
    max_length = PROMPT + MAX_NEW
    beams_to_keep = 2 * k
    running_sequences = torch.randint(0, VOCAB, (1, k, max_length))
    running_beam_indices = torch.randint(0, k, (1, k, MAX_NEW), dtype=torch.int32)
    return {
        "k": k,
        "cur_len": PROMPT + STEP,
        "beams_to_keep": beams_to_keep,
        "running_sequences": running_sequences,
        "running_beam_indices": running_beam_indices,
        "running_beam_scores": -torch.rand(1, k) * 50,
        "sequences": running_sequences.clone(),
        "beam_scores": torch.full((1, k), -1e9),
        "beam_indices": running_beam_indices.clone(),
        "is_sent_finished": torch.zeros((1, k), dtype=torch.bool),
        "unsatisfied": torch.ones((1, 1), dtype=torch.bool),
        "top_num_beam_mask": torch.cat(
            (torch.ones(k, dtype=torch.bool), torch.zeros(beams_to_keep - k, dtype=torch.bool))
        ),
        "stopping": StoppingCriteriaList(
            [MaxLengthCriteria(max_length=max_length), EosTokenCriteria(eos_token_id=EOS)]
        ),
    }


def median_us(fn: Any, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "beam.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for k in BEAMS:
        logits = (rng.standard_normal((k, VOCAB)) * 3).astype(np.float32)
        tlogits = torch.from_numpy(logits)
        state = transformers_state(k)
        theirs = median_us(lambda s=state, x=tlogits: transformers_step(s, x), args.repeats)
        bs = sampler_rs.BeamSearch(
            num_beams=k,
            num_return=k,
            eos_token_ids=[EOS],
            max_new_tokens=10**6,
            vocab_size=VOCAB,
            early_stopping=False,
        )
        ours = median_us(lambda b=bs, x=logits: b.step(x), args.repeats)
        rows.append(
            {
                "num_beams": k,
                "vocab": VOCAB,
                "sampler_rs_us": round(ours, 1),
                "transformers_us": round(theirs, 1),
                "speedup": round(theirs / ours, 1),
            }
        )
    print(f"{'beams':>5} {'vocab':>7} {'sampler_rs µs':>14} {'transformers µs':>16} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['num_beams']:>5} {r['vocab']:>7} {r['sampler_rs_us']:>14.1f} "
            f"{r['transformers_us']:>16.1f} {r['speedup']:>7.1f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "repeats": args.repeats,
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
