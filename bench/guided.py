"""Guided-decoding benchmark: MaskBench's protocol on maskbench-dev, tokenwire vs llguidance,
xgrammar and outlines-core, one engine per process, one thread.

    python bench/guided.py                                   # everything (hours: the peers are slow)
    python bench/guided.py --limit 200 --vocabs tekken       # a seeded subset
    python bench/guided.py --engines tokenwire,llguidance

As MaskBench's runner does, one long-lived worker process per engine takes the schemas in turn,
with an address-space cap on the process and a per-schema alarm whose default action kills it;
the driver then records that schema as a timeout (or out-of-memory / crash, by the signal) and
starts a new worker at the next schema. Before each schema (untimed) an engine drops what an
earlier schema left in its caches (``Adapter.reset``: tokenwire keeps only its built-in rules),
so no schema compiles faster for its predecessors.

Per schema (the harness's own objects frozen out of Python's cyclic garbage collector, so that no
full collection of them is timed as an engine's): compile (schema -> ready matcher) is timed once;
per instance token, "fill mask" and "commit" are timed separately (``perf_counter_ns``, into a
preallocated int32/uint32 bitmask of ``ceil(V/32)`` words). Instances are ``json.dumps(data)``
(``", "``/``": "`` separators); every engine is told the same whitespace policy (one optional space
between JSON tokens; see ``guided_replay.py``). A schema *passes* when it compiles in time and every
instance is classified right (no validation error: valid rejected or not accepting; no invalidation
error: invalid accepted). Peers come from PyPI (``pip install --target DIR xgrammar outlines-core
llguidance``; ``--peers DIR`` puts DIR on their ``PYTHONPATH``). Results: a table on stdout and
``bench/results/guided.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import guided_replay as gr  # noqa: E402
import guided_vocab as gv  # noqa: E402

ENGINES = ["tokenwire", "llguidance", "xgrammar", "outlines"]


# ---- engine adapters (each imported only in its own worker process) -------------------------


class Adapter:
    name = ""

    def __init__(self, spec: gv.VocabSpec) -> None:
        self.spec = spec
        self.n = len(spec.token_bytes)
        self.mask = np.zeros((self.n + 31) // 32, dtype=np.int32)

    def reset(self) -> None:
        """Drops what earlier schemas left in caches (the peers keep none across schemas)."""

    def compile(self, schema: Any) -> Any:
        raise NotImplementedError

    def state(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, st: Any) -> None:
        raise NotImplementedError

    def allowed(self, t: int) -> bool:
        return bool((int(self.mask[t >> 5]) >> (t & 31)) & 1)

    def commit(self, st: Any, t: int) -> bool:
        raise NotImplementedError

    def accepting(self, st: Any) -> bool:
        raise NotImplementedError


class Tokenwire(Adapter):
    name = "tokenwire"

    def __init__(self, spec: gv.VocabSpec) -> None:
        super().__init__(spec)
        import sampler_rs

        self.rs = sampler_rs
        self.vocab = sampler_rs.Vocabulary(spec.token_bytes, [spec.eos], spec.special)
        # Warm what a serving process builds once and keeps (the peers build their equivalents
        # in __init__ too): the llguidance fallback's tokenizer environment, and our
        # process-wide rule cache with the shared rules' context-free masks (any-JSON, plain
        # strings), by one compile and walk of `{"type": "object"}`.
        sampler_rs.Guide.json_schema(self.vocab, '{"type": "object", "minProperties": 1}')
        warm = sampler_rs.GuideState(self.compile({"type": "object"}))
        for t in spec.encode(gr.serialise({"a": "b", "c": [1, {"d": None}]})):
            warm.fill_mask(self.mask)
            warm.advance(t)

    def reset(self) -> None:
        self.vocab.clear_caches()

    def compile(self, schema: Any) -> Any:
        return self.rs.Guide.json_schema(self.vocab, json.dumps(schema), whitespace_pattern=gr.WHITESPACE)

    def state(self, compiled: Any) -> Any:
        return self.rs.GuideState(compiled)

    def fill(self, st: Any) -> None:
        st.fill_mask(self.mask)

    def commit(self, st: Any, t: int) -> bool:
        return bool(st.advance(t))

    def accepting(self, st: Any) -> bool:
        return bool(st.is_accepting())


class Llguidance(Adapter):
    name = "llguidance"

    def __init__(self, spec: gv.VocabSpec) -> None:
        super().__init__(spec)
        import llguidance

        self.llg = llguidance
        self.tok = gv.llg_tokenizer(spec)
        self.ptr = self.mask.ctypes.data
        self.opts = gr.LLG_OVERRIDES

    def compile(self, schema: Any) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=self.opts)
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def state(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, st: Any) -> None:
        st.unsafe_compute_mask_ptr(self.ptr, self.mask.nbytes)

    def commit(self, st: Any, t: int) -> bool:
        return bool(st.consume_token(t))

    def accepting(self, st: Any) -> bool:
        return bool(st.is_accepting())


class Xgrammar(Adapter):
    name = "xgrammar"

    def __init__(self, spec: gv.VocabSpec) -> None:
        super().__init__(spec)
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(
            list(spec.token_bytes), xgr.VocabType.RAW, vocab_size=self.n, stop_token_ids=[spec.eos]
        )
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, self.n)
        self.mask = self.bitmask.numpy()[0]

    def compile(self, schema: Any) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def state(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, st: Any) -> None:
        st.fill_next_token_bitmask(self.bitmask)

    def commit(self, st: Any, t: int) -> bool:
        return bool(st.accept_token(t))

    def accepting(self, st: Any) -> bool:
        return bool(st.accept_token(self.spec.eos))


class Outlines(Adapter):
    name = "outlines"

    def __init__(self, spec: gv.VocabSpec) -> None:
        super().__init__(spec)
        import outlines_core as oc
        from outlines_core.json_schema import build_regex_from_schema

        self.oc, self.build = oc, build_regex_from_schema
        special = set(spec.special) | {spec.eos}
        m: dict[bytes, list[int]] = {}
        for i, b in enumerate(spec.token_bytes):
            if i not in special and b:
                m.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(spec.eos, m)
        self.ptr = self.mask.ctypes.data

    def compile(self, schema: Any) -> Any:
        return self.oc.Index(self.build(json.dumps(schema), "[ ]?"), self.vocab)

    def state(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, st: Any) -> None:
        st.write_mask_into(self.ptr, self.mask.size, 4)

    def commit(self, st: Any, t: int) -> bool:
        try:
            st.advance(t, return_tokens=False)
        except Exception:
            return False
        return True

    def accepting(self, st: Any) -> bool:
        return bool(st.is_finished())


ADAPTERS = {a.name: a for a in (Tokenwire, Llguidance, Xgrammar, Outlines)}


# ---- one schema, in the engine's worker process -------------------------------------------


def run_schema(ad: Adapter, schema: Any, insts: list[tuple[bool, list[int]]]) -> dict[str, Any]:
    t0 = time.perf_counter_ns()
    try:
        compiled = ad.compile(schema)
    except Exception as e:
        return {"status": "compile_error", "error": str(e)[:300]}
    res: dict[str, Any] = {"status": "ok", "compile_us": (time.perf_counter_ns() - t0) / 1e3}
    mask_ns: list[int] = []
    commit_ns: list[int] = []
    val = inval = 0
    pc = time.perf_counter_ns
    for valid, ids in insts:
        st = ad.state(compiled)
        ok = True
        for t in ids:
            a = pc()
            ad.fill(st)
            b = pc()
            mask_ns.append(b - a)
            if not ad.allowed(t):
                ok = False
                break
            a = pc()
            c = ad.commit(st, t)
            commit_ns.append(pc() - a)
            if not c:
                ok = False
                break
        accepted = ok and ad.accepting(st)
        if valid and not accepted:
            val += 1
        if not valid and accepted:
            inval += 1
    res.update(
        mask_us=[x / 1e3 for x in mask_ns],
        commit_us=[x / 1e3 for x in commit_ns],
        validation_errors=val,
        invalidation_errors=inval,
    )
    return res


def worker(args: argparse.Namespace) -> None:
    """Runs the selected schemas from ``--skip`` on, appending one JSON line per schema to
    ``--out``. A schema past ``--timeout`` ends the process (SIGALRM's default action)."""
    spec = gv.load(args.vocab)
    ad = ADAPTERS[args.worker](spec)
    mem = int(args.mem_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    schemas = select_schemas(args.limit, args.seed)[args.skip :]
    # The harness's long-lived objects (the corpus, the vocabulary, the engine's Python side)
    # are moved out of the cyclic collector's reach: a full collection of them takes
    # milliseconds and would land in whichever engine's timed call allocated last.
    gc.collect()
    gc.freeze()
    with open(args.out, "a") as out:
        for s in schemas:
            insts = [(v, spec.encode(text)) for v, text in gr.instances(s)]
            ad.reset()
            signal.setitimer(signal.ITIMER_REAL, args.timeout)
            try:
                res = run_schema(ad, s.schema, insts)
            except MemoryError:
                res = {"status": "oom"}
            except Exception as e:
                res = {"status": "crash", "error": repr(e)[:300]}
            signal.setitimer(signal.ITIMER_REAL, 0)
            res |= {"name": s.name, "n_valid": sum(v for v, _ in insts), "n_invalid": sum(not v for v, _ in insts)}
            out.write(json.dumps(res) + "\n")
            out.flush()


def drive(cmd: list[str], env: dict[str, str], path: str, schemas: list[gr.Schema]) -> tuple[list[dict[str, Any]], str]:
    """Runs workers until every schema has a row; a worker that dies mid-schema gives that schema
    its status (SIGALRM: timeout; SIGKILL/SIGABRT, as the kernel or an allocator end a process
    past its cap: oom; else crash) and the next worker starts after it."""
    rows: list[dict[str, Any]] = []
    stderr = ""
    while len(rows) < len(schemas):
        proc = subprocess.run([*cmd, "--skip", str(len(rows))], env=env, capture_output=True, text=True)
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) >= len(schemas):
            break
        sig = -proc.returncode
        if proc.returncode >= 0:
            # It exited without finishing (an import error, say): nothing to retry.
            return rows, proc.stderr[-2000:]
        status = "timeout" if sig == signal.SIGALRM else "oom" if sig in (signal.SIGKILL, signal.SIGABRT) else "crash"
        s = schemas[len(rows)]
        insts = list(gr.instances(s))
        row = {"status": status, "name": s.name, "n_valid": sum(v for v, _ in insts)}
        row["n_invalid"] = len(insts) - row["n_valid"]
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        stderr = proc.stderr[-2000:]
    return rows, stderr


def select_schemas(limit: int | None, seed: int) -> list[gr.Schema]:
    schemas = gr.load_maskbench()
    if limit and limit < len(schemas):
        schemas = sorted(random.Random(seed).sample(schemas, limit), key=lambda s: s.name)
    return schemas


# ---- aggregation -----------------------------------------------------------------------------


def pct(xs: np.ndarray, q: float) -> float:
    return float(np.percentile(xs, q)) if xs.size else float("nan")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    comp = np.array([r["compile_us"] for r in ok])
    mask = np.array([x for r in ok for x in r["mask_us"]])
    commit = np.array([x for r in ok for x in r["commit_us"]])
    val = sum(r["validation_errors"] for r in ok)
    inval = sum(r["invalidation_errors"] for r in ok)
    passing = sum(1 for r in ok if r["validation_errors"] == 0 and r["invalidation_errors"] == 0)
    return {
        "schemas": len(rows),
        "passing": passing,
        "compile_errors": sum(r["status"] == "compile_error" for r in rows),
        "timeouts": sum(r["status"] == "timeout" for r in rows),
        "oom": sum(r["status"] == "oom" for r in rows),
        "crashes": sum(r["status"] == "crash" for r in rows),
        "validation_errors": val,
        "invalidation_errors": inval,
        "compile_us": {k: pct(comp, q) for k, q in (("p50", 50), ("p99", 99), ("max", 100))}
        | {"mean": float(comp.mean()) if comp.size else float("nan")},
        "mask_us": {k: pct(mask, q) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9), ("max", 100))}
        | {"mean": float(mask.mean()) if mask.size else float("nan"), "count": int(mask.size)},
        "commit_us": {k: pct(commit, q) for k, q in (("p50", 50), ("p99", 99), ("max", 100))},
    }


def fmt(x: float) -> str:
    if x != x:
        return "-"
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| vocab / engine | pass | cerr | t/o | oom | val | inval | compile p50 / p99 / max (µs) "
        "| mask p50 / p99 / p99.9 / max / mean (µs) |"
    )
    lines = [head, "|" + "---|" * 9]
    for key, s in results.items():
        c, m = s["compile_us"], s["mask_us"]
        lines.append(
            f"| {key} | {s['passing']}/{s['schemas']} | {s['compile_errors']} | {s['timeouts']} "
            f"| {s['oom'] + s['crashes']} "
            f"| {s['validation_errors']} | {s['invalidation_errors']} "
            f"| {fmt(c['p50'])} / {fmt(c['p99'])} / {fmt(c['max'])} "
            f"| {fmt(m['p50'])} / {fmt(m['p99'])} / {fmt(m['p99.9'])} / {fmt(m['max'])} / {fmt(m['mean'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="tekken,sentencepiece")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--limit", type=int, default=None, help="seeded subset of this many schemas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per schema (compile + replay)")
    p.add_argument("--mem-gb", type=float, default=8.0, help="address-space cap of a worker process")
    p.add_argument(
        "--peers", default=os.environ.get("GUIDED_PEERS", "/work/guided-peers"), help="extra PYTHONPATH for the peers"
    )
    p.add_argument("--out", default=os.path.join(HERE, "results", "guided.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--vocab", help=argparse.SUPPRESS)
    p.add_argument("--skip", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    env = dict(os.environ, RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.peers and os.path.isdir(args.peers):
        env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH"), args.peers) if x)
    schemas = select_schemas(args.limit, args.seed)
    results: dict[str, dict[str, Any]] = {}
    per_schema: dict[str, list[dict[str, Any]]] = {}
    for vocab in args.vocabs.split(","):
        for engine in args.engines.split(","):
            key = f"{vocab} / {engine}"
            with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as tmp:
                path = tmp.name
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--vocab",
                vocab,
                "--out",
                path,
                "--seed",
                str(args.seed),
                "--timeout",
                str(args.timeout),
                "--mem-gb",
                str(args.mem_gb),
            ]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            t0 = time.time()
            rows, err = drive(cmd, env, path, schemas)
            os.unlink(path)
            if len(rows) < len(schemas):
                print(f"{key}: worker failed: {err}", file=sys.stderr)
                if not rows:
                    continue
            results[key] = summarise(rows) | {"wall_s": round(time.time() - t0, 1)}
            per_schema[key] = [{k: v for k, v in r.items() if k not in ("mask_us", "commit_us")} for r in rows]
            print(f"{key}: done in {results[key]['wall_s']} s", file=sys.stderr, flush=True)
    print(table(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "python": sys.version.split()[0],
                },
                "args": {k: v for k, v in vars(args).items() if k not in ("worker", "vocab")},
                "protocol": "MaskBench on maskbench-dev; one thread; one worker process per engine with "
                "RLIMIT_AS and a per-schema alarm (a killed worker is restarted at the next schema); "
                "caches reset between schemas; whitespace: one optional space between JSON tokens",
                "summary": results,
                "per_schema": per_schema,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
