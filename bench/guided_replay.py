"""MaskBench instance replay for ``sampler_rs`` guides: shared by ``tests/test_guide.py`` and
``bench/guided.py``.

A *validation error* is a valid instance rejected at some token or not accepting at the end; an
*invalidation error* is an invalid instance accepted token by token and accepting at the end.
Instances are serialised as MaskBench does (``json.dumps(data, indent=None, ensure_ascii=False)``,
i.e. ``", "`` and ``": "`` separators), so guides are compiled with ``WHITESPACE = " "``: one optional
space between JSON tokens (a superset of that serialisation; compact JSON is also accepted).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MASKBENCH_DEV = os.environ.get("MASKBENCH_DEV", "/work/shared/data/maskbench-dev")
WHITESPACE = " "
# The same whitespace policy for llguidance's JSON Schema compiler (its ``x-guidance`` overrides).
LLG_OVERRIDES = {
    "whitespace_flexible": False,
    "whitespace_pattern": WHITESPACE,
    "item_separator": ",",
    "key_separator": ":",
}


@dataclass
class Schema:
    name: str
    schema: Any
    tests: list[dict[str, Any]] = field(default_factory=list)


def load_maskbench(directory: str = MASKBENCH_DEV) -> list[Schema]:
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        out.append(Schema(os.path.basename(path)[:-5], d["schema"], d.get("tests", [])))
    return out


def serialise(data: Any) -> str:
    return json.dumps(data, indent=None, ensure_ascii=False)


@dataclass
class Replay:
    """One instance's walk: how many tokens were accepted, and whether it ended accepting."""

    n_tokens: int
    accepted_tokens: int
    accepting: bool

    @property
    def accepted(self) -> bool:
        return self.accepted_tokens == self.n_tokens and self.accepting


def replay(state: Any, ids: list[int], mask: Any | None = None, timer: list[int] | None = None) -> Replay:
    """Walks ``ids`` through a fresh ``GuideState``; with ``mask`` (a uint32 buffer) it also fills
    the mask before each token and checks the token's bit (and times both calls into ``timer``
    as ``[mask_ns..., -commit_ns...]`` pairs when given)."""
    import time

    for i, t in enumerate(ids):
        if mask is not None:
            t0 = time.perf_counter_ns()
            state.fill_mask(mask)
            t1 = time.perf_counter_ns()
            if timer is not None:
                timer.append(t1 - t0)
            if not (int(mask[t >> 5]) >> (t & 31)) & 1:
                return Replay(len(ids), i, False)
        t0 = time.perf_counter_ns()
        ok = state.advance(t)
        if timer is not None:
            timer.append(-(time.perf_counter_ns() - t0))
        if not ok:
            return Replay(len(ids), i, False)
    return Replay(len(ids), len(ids), state.is_accepting())


def instances(schema: Schema) -> Iterator[tuple[bool, str]]:
    for t in schema.tests:
        yield bool(t["valid"]), serialise(t["data"])
