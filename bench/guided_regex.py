"""Regex and choice guides (the tokenwire-dfa engine) on a vocabulary: compile time, first
(uncached) mask, cached mask, and advance, per pattern. ``python bench/guided_regex.py [tekken|sentencepiece]``."""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guided_vocab as gv

import sampler_rs

PATTERNS = {
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "email": r"[a-z0-9._%+-]{1,40}@[a-z0-9.-]{1,30}\.[a-z]{2,6}",
    "json-ish": (
        r'\{"name": "[^"\\]{0,40}", "age": (0|[1-9]\d{0,2}), '
        r'"tags": \[("[a-z]{1,10}"(, "[a-z]{1,10}"){0,4})?\]\}'
    ),
    "iso-date": r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])T\d{2}:\d{2}:\d{2}Z",
    "free-text": r"[^\n]{1,200}\n",
    "unicode-words": r"(\w+ ){1,10}\w+\.",
}


def main() -> None:
    spec = gv.load(sys.argv[1] if len(sys.argv) > 1 else "tekken")
    v = sampler_rs.Vocabulary(spec.token_bytes, [spec.eos], spec.special)
    n = len(v)
    mask = np.zeros((n + 31) // 32, dtype=np.uint32)
    rng = random.Random(0)
    print(f"{spec.name}: {n} tokens")
    print("| pattern | states | compile µs | first mask µs (p50/max) | cached mask µs (p50/p99/max) | advance µs p50 |")
    print("|---|---|---|---|---|---|")
    for name, pat in PATTERNS.items():
        t0 = time.perf_counter_ns()
        g = sampler_rs.Guide.regex(v, pat)
        comp = (time.perf_counter_ns() - t0) / 1e3
        first, cached, adv = [], [], []
        for _ in range(20):  # random walks; the first visit of a state computes its mask
            st = sampler_rs.GuideState(g)
            for _ in range(60):
                t0 = time.perf_counter_ns()
                st.fill_mask(mask)
                dt = (time.perf_counter_ns() - t0) / 1e3
                t0 = time.perf_counter_ns()
                st.fill_mask(mask)
                cached.append((time.perf_counter_ns() - t0) / 1e3)
                first.append(dt)
                ids = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:n])
                ids = [int(t) for t in ids if t != spec.eos]
                if not ids:
                    break
                t = rng.choice(ids)
                t0 = time.perf_counter_ns()
                assert st.advance(t)
                adv.append((time.perf_counter_ns() - t0) / 1e3)
        c = np.array(cached)
        print(
            f"| {name} | {g.dfa_states} | {comp:,.0f} | {np.median(first):.1f} / {max(first):,.0f} "
            f"| {np.median(c):.2f} / {np.percentile(c, 99):.2f} / {c.max():.1f} | {np.median(adv):.2f} |"
        )


if __name__ == "__main__":
    main()
