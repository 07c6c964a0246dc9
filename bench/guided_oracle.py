"""Mask oracle: our JSON Schema masks (the tokenwire-json engine) against llguidance's, bit for
bit, at every token of every valid maskbench instance, with every difference classified.

    python bench/guided_oracle.py                        # both vocabularies, every schema
    python bench/guided_oracle.py --vocabs sentencepiece --limit 100

Both engines get the same byte vocabulary and the same whitespace policy. A token one engine
allows and the other does not is a difference; it is *classified* when it is one of the policy
choices below (each documented in ``docs/guided.md``) and *unclassified* otherwise — the target
is none. Classes:

- ``canonical``: llguidance's mask leaves out a non-canonical tokenization of text it forces, yet
  its own matcher consumes the token (``validate_tokens``): not a difference of language.
- ``json-escape``: JSON (RFC 8259) allows more in a string than llguidance does: U+007F unescaped,
  the escape ``\\/``, any ``\\uXXXX`` escape (llguidance takes a subset), and escapes inside a
  string (or a key) with a ``pattern`` (the pattern applies to the unescaped text).
- ``minus-zero``: ``-0`` where a number's lower bound is 0 (``-0 == 0`` satisfies ``minimum: 0``).
- ``exponent``: an exponent on a bounded number (llguidance writes bounded numbers without one).
- ``ecma-classes``: patterns mean what ECMA-262 says where Rust's classes, which llguidance
  uses, differ: ``\\s`` leaves out U+0085 (which ``\\S`` then has), and ``.`` every line
  terminator (CR, U+2028, U+2029 besides LF). (ECMA's ``\\s`` has U+FEFF; ours leaves it out, as Python's ``re`` does.)

Results: a summary on stdout and ``bench/results/guided_oracle.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import guided_replay as gr  # noqa: E402
import guided_vocab as gv  # noqa: E402

POLICIES = ("json-escape", "minus-zero", "exponent", "ecma-classes")


def policy(tok: bytes, prev: bytes, patterned: bool) -> str | None:
    """The documented policy a token ours allows and llguidance does not falls under, if any."""
    if b"\x7f" in tok or b"\\/" in tok or (prev.endswith(b"\\") and tok[:1] in (b"/", b"u")):
        return "json-escape"
    if patterned and b"\\" in tok:
        return "json-escape"
    if patterned and b"\xc2\x85" in tok:
        return "ecma-classes"
    if re.fullmatch(rb"\s*[\[,]?\s*-", tok):
        return "minus-zero"
    if re.fullmatch(rb"[eE][0-9+-]*", tok):
        return "exponent"
    return None


class Oracle:
    """llguidance (the PyPI package) and our engine over one byte vocabulary."""

    def __init__(self, spec: gv.VocabSpec) -> None:
        import llguidance

        import sampler_rs

        self.llg = llguidance
        self.rs = sampler_rs
        self.spec = spec
        self.vocab = sampler_rs.Vocabulary(spec.token_bytes, [spec.eos], spec.special)
        self.n = len(spec.token_bytes)
        self.tok = gv.llg_tokenizer(spec)
        self.opts = gr.LLG_OVERRIDES

    def bits(self, words: np.ndarray) -> np.ndarray:
        b = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.n].astype(bool)
        b[self.spec.special] = False
        return b

    def schema(self, s: gr.Schema, stats: Counter[str], unclassified: list[dict[str, Any]]) -> bool:
        """Compares along the valid instances of `s`; False when one engine does not take it."""
        try:
            g = self.rs.Guide.json_schema(self.vocab, json.dumps(s.schema), whitespace_pattern=gr.WHITESPACE)
        except ValueError:
            return False
        if g.engine != "tokenwire-json":
            return False
        grammar = self.llg.LLMatcher.grammar_from_json_schema(s.schema, overrides=self.opts)  # type: ignore[arg-type]
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            return False
        text_of_schema = json.dumps(s.schema)
        patterned = '"pattern"' in text_of_schema or '"patternProperties"' in text_of_schema
        words = (self.n + 31) // 32
        for valid, text in gr.instances(s):
            if not valid:
                continue
            st = self.rs.GuideState(g)
            mm = m.deep_copy()
            prev = seen = b""
            for t in self.spec.encode(text):
                a = np.zeros(words, np.uint32)
                st.fill_mask(a)
                ours = self.bits(a)
                theirs = self.bits(np.frombuffer(mm.compute_bitmask(), dtype=np.uint32).copy())
                stats["masks"] += 1
                if (ours != theirs).any():
                    stats["masks_differing"] += 1
                    left_out = []
                    for x in np.flatnonzero(theirs & ~ours):
                        tok = self.spec.token_bytes[x]
                        ecma = b"\xc2\x85" in tok or (
                            patterned and (tok.startswith(b"\\r") or b"\xe2\x80\xa8" in tok or b"\xe2\x80\xa9" in tok)
                        )
                        if ecma:
                            stats["ecma-classes"] += 1
                        else:
                            left_out.append(int(x))
                    for x in np.flatnonzero(ours & ~theirs):
                        tok = self.spec.token_bytes[x]
                        if mm.deep_copy().validate_tokens([int(x)]) == 1:
                            stats["canonical"] += 1
                        elif (p := policy(tok, prev, patterned)) is not None:
                            stats[p] += 1
                        else:
                            left_out.append(-int(x) - 1)
                    if left_out:
                        stats["unclassified"] += 1
                        if len(unclassified) < 50:
                            unclassified.append(
                                {
                                    "schema": s.name,
                                    "prefix": seen[-80:].decode("utf-8", "replace"),
                                    "only_llguidance": [
                                        self.spec.token_bytes[x].decode("utf-8", "replace") for x in left_out if x >= 0
                                    ][:8],
                                    "only_ours": [
                                        self.spec.token_bytes[-x - 1].decode("utf-8", "replace")
                                        for x in left_out
                                        if x < 0
                                    ][:8],
                                }
                            )
                prev = self.spec.token_bytes[t]
                seen += prev
                if not (st.advance(t) and mm.consume_token(t)):
                    break
        return True


def run(spec: gv.VocabSpec, schemas: list[gr.Schema]) -> dict[str, Any]:
    o = Oracle(spec)
    stats: Counter[str] = Counter()
    unclassified: list[dict[str, Any]] = []
    t0 = time.time()
    compared = sum(o.schema(s, stats, unclassified) for s in schemas)
    return {
        "schemas_compared": compared,
        "masks": stats["masks"],
        "masks_differing": stats["masks_differing"],
        "unclassified_masks": stats["unclassified"],
        "tokens_by_class": {k: stats[k] for k in ("canonical", *POLICIES)},
        "unclassified": unclassified,
        "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="tekken,sentencepiece")
    ap.add_argument("--limit", type=int, default=None, help="a seeded subset of this many schemas")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "guided_oracle.json"))
    args = ap.parse_args()
    schemas = gr.load_maskbench()
    if args.limit:
        schemas = random.Random(args.seed).sample(schemas, args.limit)
    results = {}
    for v in args.vocabs.split(","):
        r = run(gv.load(v), schemas)
        results[v] = r
        print(
            f"{v}: {r['schemas_compared']} schemas, {r['masks']} masks, {r['masks_differing']} differ, "
            f"{r['unclassified_masks']} unclassified; tokens by class {r['tokens_by_class']} ({r['seconds']} s)"
        )
        for u in r["unclassified"][:10]:
            print("  unclassified:", u)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
