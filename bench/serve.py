"""bench/serve: end-to-end serving, tokenwire vs `transformers serve` vs sequential `model.generate`, same model.

    .venv/bin/python bench/serve.py [--concurrency 1,4,16,64] [--requests N] [--max-tokens 64]
                                    [--targets tokenwire,transformers,naive] [--out bench/results/serve.json]

Model: the embedded model (random-weight Llama, ~57M parameters, Mistral SentencePiece tokenizer), exported once with
`tokenwire tiny-model export` to a temporary directory (or `--model-dir DIR`); every target loads that directory, in
float32 on the CPU, with HF_HUB_OFFLINE=1. Targets, one at a time, each its own process on a loopback port, stopped
(SIGTERM) before the next starts:
1. tokenwire: `tokenwire up --model DIR` (gRPC service + HTTP gateway in one process; `--tokenwire-mode split` runs
   `serve` and `gateway` as two processes), measured through the gateway's OpenAI HTTP API;
2. transformers: `transformers serve DIR --continuous-batching --device cpu` (needs fastapi and accelerate, the
   `transformers[serving]` extra). It rejects unknown fields (422), so top_k and the fixed length travel in its own
   `generation_config` field (a GenerationConfig JSON): {do_sample, temperature, top_p, top_k, max_new_tokens} and no
   eos_token_id, which its continuous batching turns into "EOS disabled" (-1). Its CB manager takes its sampling
   parameters from the first request it sees, so the warm-up sends the same ones;
3. naive: a baseline in this file (`--naive-server`, a starlette app): one `model.generate` per request (do_sample,
   temperature/top_p/top_k, min_new_tokens = max_tokens for ignore_eos), strictly one after another, streamed as SSE.

Load: the `openai` SDK (AsyncOpenAI, streaming, stream_options.include_usage), closed loop: C workers, each sending
its next request when the previous one ends, until N requests are done (N = max(`--requests`, C), default max(16, 2C)).
Every request: a distinct prompt of `--prompt-words` words, max_tokens M, temperature 0.8, top_p 0.95, top_k 50, and
ignore_eos (tokenwire and naive: `ignore_eos: true` in extra_body) so all generate M tokens. Before the levels, each
target gets 1 request alone, then `--warmup` requests at concurrency 4, not counted.

Client-side metrics per (target, C): output tokens/s = completion tokens (from the stream's usage chunk; the count of
content events if there is none) ÷ wall time of the level; TTFT = send → first non-empty content delta; ITL = gaps
between consecutive content deltas (what a streaming client sees: a delta carrying two tokens counts once); TPOT =
(last − first delta) ÷ (tokens − 1) per request; completed/failed; CPU seconds of the target and of this client.
Roofline (measured here, before any target starts): F = best float32 `torch.mm` FLOP/s (n=2048), B = best bytes/s
of a 256 MiB tensor copy (read + write). FLOPs per token = 2 × the parameters a decode step multiplies (all but the
input embedding table, which is a gather; attention over the context, ~4·layers·hidden·context ≈ 2% here, is not
counted); weight bytes = those parameters × 4. Roofline tokens/s = min(F ÷ FLOPs per token, C × B ÷ weight bytes).
The load generator shares the machine's cores with the target; on a small machine its CPU time is in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from benchutil import cpu_seconds, free_port, pct  # bench/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parent.parent
WORDS = (  # prompts are drawn from these words
    "the quick brown fox jumps over a lazy dog while seven tired wizards brew strong coffee near old river banks "
    "under bright summer stars and distant mountains echo with quiet songs of forgotten cities built from glass"
)
TARGETS = ("tokenwire", "transformers", "naive")


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# -- roofline ---------------------------------------------------------------------------------------------------------


def machine_roofline(n: int = 2048, copy_mib: int = 256, repeats: int = 8) -> dict[str, Any]:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)
    mm_s = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        mm_s.append(time.perf_counter() - t0)
    src = torch.ones(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy_s = []
    for _ in range(repeats * 2):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    return {
        "matmul_n": n, "copy_bytes": src.numel() * src.element_size(), "torch_threads": torch.get_num_threads(),
        "flops_per_s": 2 * n**3 / min(mm_s), "flops_per_s_median": 2 * n**3 / statistics.median(mm_s),
        "bytes_per_s": moved / min(copy_s), "bytes_per_s_median": moved / statistics.median(copy_s),
    }  # fmt: skip


def model_cost(model_dir: Path) -> dict[str, Any]:
    """Parameters from the safetensors headers: the ones a decode step multiplies, and their bytes."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    total = embed = weight_bytes_total = 0
    embed_bytes = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                size = {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
                total += numel
                weight_bytes_total += numel * size
                if "embed_tokens" in key:
                    embed, embed_bytes = numel, numel * size
    tied = bool(config.get("tie_word_embeddings", False))
    matmul = total if tied else total - embed  # a tied table is read again as lm_head
    matmul_bytes = weight_bytes_total if tied else weight_bytes_total - embed_bytes
    return {
        "params_total": total, "params_input_embedding": embed, "tied_embeddings": tied, "params_counted": matmul,
        "flops_per_token": 2 * matmul, "weight_bytes": matmul_bytes,
        "counted": "2 x every parameter except the input embedding table (a gather); attention over the context "
                   "is not counted",
    }  # fmt: skip


def roofline_tokens_per_s(machine: dict[str, Any], cost: dict[str, Any], batch: int) -> float:
    return min(machine["flops_per_s"] / cost["flops_per_token"], batch * machine["bytes_per_s"] / cost["weight_bytes"])


# -- the naive baseline server ---------------------------------------------------------------------------------------


def naive_server(model_dir: Path, host: str, port: int) -> None:
    """One `model.generate` per request, one after another (a single worker thread), streamed as OpenAI SSE."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    from tokenizers.decoders import DecodeStream
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    backend = tokenizer.backend_tokenizer
    worker = ThreadPoolExecutor(max_workers=1)  # the one generate at a time, in arrival order
    name = str(model_dir)

    class QueueStreamer:
        """generate's streamer protocol: put(prompt ids) first, then put(new ids) each step, then end()."""

        def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
            self.loop, self.queue, self.prompt_seen = loop, queue, False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

        def end(self) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def run_generate(inputs: Any, kwargs: dict[str, Any], streamer: QueueStreamer) -> None:
        try:
            with torch.inference_mode():
                model.generate(**inputs, **kwargs, streamer=streamer)
        finally:
            streamer.end()

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def chat(request: Request) -> Response:
        body = await request.json()
        if not body.get("stream"):
            return JSONResponse({"error": {"message": "this baseline only streams"}}, status_code=400)
        max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        inputs = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        temperature = float(body.get("temperature", 1.0))
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)))
        if body.get("ignore_eos"):
            kwargs["min_new_tokens"] = max_tokens
        elif body.get("min_tokens"):
            kwargs["min_new_tokens"] = int(body["min_tokens"])
        rid, created = f"chatcmpl-naive-{time.monotonic_ns()}", int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [choice]})  # fmt: skip

        async def events() -> Any:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[int | None] = asyncio.Queue()
            done = loop.run_in_executor(worker, run_generate, inputs, kwargs, QueueStreamer(loop, queue))
            decoder = DecodeStream(skip_special_tokens=True)
            yield chunk({"role": "assistant", "content": ""})
            generated = 0
            while (token := await queue.get()) is not None:
                generated += 1
                text = decoder.step(backend, token)
                if text:
                    yield chunk({"content": text})
            await done  # re-raises a failed generate: the stream then breaks off
            yield chunk({}, "length" if generated >= max_tokens else "stop")
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                     "total_tokens": prompt_tokens + generated}  # fmt: skip
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                       "choices": [], "usage": usage})  # fmt: skip
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/health", health), Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host=host, port=port, log_level="warning")


# -- targets ----------------------------------------------------------------------------------------------------------


class Target:
    """One server under test: its processes, its ready probe, and the request fields it accepts."""

    def __init__(self, name: str, args: argparse.Namespace, model_dir: Path, logs: Path) -> None:
        self.name, self.args, self.model_dir = name, args, model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logs / f"{name}.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.commands: list[list[str]] = []
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    def extra_body(self) -> dict[str, Any]:
        a = self.args
        if self.name == "transformers":
            config = {"do_sample": True, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
                      "max_new_tokens": a.max_tokens}  # fmt: skip
            return {"generation_config": json.dumps(config)}
        return {"top_k": a.top_k, "ignore_eos": True}

    def _spawn(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        with self.log_path.open("ab") as log:
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self) -> float:
        t0 = time.monotonic()
        py, model = sys.executable, str(self.model_dir)
        if self.name == "tokenwire":
            tw = [py, "-m", "service.cli", "--log-level", "warning"]
            running = ["--max-running", str(max(self.args.concurrency)), "--max-waiting", "1024"]
            model_args = ["--model", model, "--drain-seconds", "0", "--shutdown-grace", "5", *running]
            grpc_port = str(free_port())
            if self.args.tokenwire_mode == "up":
                self._spawn([*tw, "up", *model_args, "--grpc-port", grpc_port, "--http-port", str(self.port)])
            else:
                self._spawn([*tw, "serve", *model_args, "--grpc-port", grpc_port])
                self._spawn([*tw, "gateway", "--upstream", f"127.0.0.1:{grpc_port}", "--http-port", str(self.port)])
        elif self.name == "transformers":
            exe = Path(sys.executable).parent / "transformers"
            cli = [str(exe)] if exe.exists() else [shutil.which("transformers") or "transformers"]
            self._spawn([*cli, "serve", model, "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                         "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                         *shlex.split(self.args.transformers_args)])  # fmt: skip
        else:
            self._spawn([py, str(Path(__file__).resolve()), "--naive-server", "--model-dir", model,
                         "--port", str(self.port)])  # fmt: skip
        self._wait_ready()
        return time.monotonic() - t0

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.args.startup_timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {self.args.startup_timeout}s: {self.log_tail()}")

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(OSError):
                total += cpu_seconds(proc.pid)
        return total

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- load generator ---------------------------------------------------------------------------------------------------


def prompt(i: int, words: int) -> str:
    rng, vocabulary = random.Random(i), WORDS.split()
    return f"Request {i}: " + " ".join(rng.choice(vocabulary) for _ in range(words))


async def one_request(client: Any, target: Target, i: int) -> dict[str, Any]:
    a = target.args
    t0 = time.perf_counter()
    deltas: list[float] = []
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=str(target.model_dir), messages=[{"role": "user", "content": prompt(i, a.prompt_words)}],
            max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, stream=True,
            stream_options={"include_usage": True}, extra_body=target.extra_body(),
        )  # fmt: skip
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if any(c.delta is not None and c.delta.content for c in chunk.choices):
                deltas.append(now)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    tokens = usage.completion_tokens if usage is not None else len(deltas)
    if not deltas or tokens == 0:
        return {"ok": False, "error": "no content in the stream"}
    return {
        "ok": True, "tokens": tokens, "usage": usage is not None, "events": len(deltas),
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "ttft": deltas[0] - t0, "gaps": [y - x for x, y in itertools.pairwise(deltas)],
        "tpot": (deltas[-1] - deltas[0]) / (tokens - 1) if tokens > 1 else None,
    }  # fmt: skip


async def run_level(target: Target, concurrency: int, requests: int, first: int) -> tuple[list[dict[str, Any]], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{target.url}/v1", api_key="bench", max_retries=0,
                                timeout=target.args.request_timeout)  # fmt: skip
    results: list[dict[str, Any]] = []
    counter = iter(range(first, first + requests))

    async def worker() -> None:
        for i in counter:
            results.append(await one_request(client, target, i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def summarize(results: list[dict[str, Any]], wall: float, concurrency: int, roofline: float) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] * 1e3 for r in ok]
    gaps = [g * 1e3 for r in ok for g in r["gaps"]]
    tpot = [r["tpot"] * 1e3 for r in ok if r["tpot"] is not None]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    per_request = [r["tokens"] for r in ok]
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
        "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99), "tpot_p50_ms": pct(tpot, 0.5),
        "tokens_per_request_min": min(per_request, default=None),
        "tokens_per_request_max": max(per_request, default=None),
        "content_events_per_token": sum(r["events"] for r in ok) / tokens if tokens else None,
        "usage_reported": all(r["usage"] for r in ok),
        "prompt_tokens_mean": statistics.fmean(p) if (p := [r["prompt_tokens"] for r in ok if r["prompt_tokens"]])
        else None,
        "roofline_tokens_per_s": roofline, "roofline_fraction": tokens / wall / roofline,
        "errors": errors,
    }  # fmt: skip


def bench_target(target: Target, machine: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    a = target.args
    out: dict[str, Any] = {"levels": []}
    print(f"\n[{target.name}] starting ...", flush=True)
    try:
        out["extra_body"] = target.extra_body()
        out["startup_s"] = target.start()
        print(f"[{target.name}] ready in {out['startup_s']:.1f}s; warming up", flush=True)
        warm, _ = asyncio.run(run_level(target, 1, 1, 10**6))
        more, _ = asyncio.run(run_level(target, min(4, max(a.concurrency)), a.warmup, 10**6 + 1))
        warm += more
        if not all(r["ok"] for r in warm):
            raise RuntimeError(f"warm-up failed: {[r['error'] for r in warm if not r['ok']][:3]}")
        first = 0
        for c in a.concurrency:
            n = max(a.requests, c) if a.requests else max(16, 2 * c)
            time.sleep(a.pause)
            cpu0, client0 = target.cpu_seconds(), time.process_time()
            results, wall = asyncio.run(run_level(target, c, n, first))
            level = summarize(results, wall, c, roofline_tokens_per_s(machine, cost, c))
            level["target_cpu_s"], level["client_cpu_s"] = target.cpu_seconds() - cpu0, time.process_time() - client0
            out["levels"].append(level)
            first += n
            print(f"[{target.name}] c={c}: {level['completed']}/{n} ok, {level['output_tokens_per_s']:.1f} tok/s, "
                  f"{wall:.1f}s", flush=True)  # fmt: skip
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"[{target.name}] FAILED: {out['error']}", flush=True)
    finally:
        out["commands"] = target.commands
        target.stop()
    return out


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(targets: dict[str, dict[str, Any]]) -> None:
    head = (f"{'target':<13}{'conc':>5}{'ok/fail':>9}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}"
            f"{'ITL p99':>9}{'TPOT p50':>10}{'tok/req':>9}{'roofline':>10}{'% roof':>8}")  # fmt: skip
    print("\n" + head + "\n" + "-" * len(head))
    for name, t in targets.items():
        if "error" in t and not t["levels"]:
            print(f"{name:<13} FAILED: {t['error'][:200]}")
            continue
        for lv in t["levels"]:
            lo, hi = lv["tokens_per_request_min"], lv["tokens_per_request_max"]
            per_req = "-" if lo is None else (str(lo) if lo == hi else f"{lo}-{hi}")
            print(f"{name:<13}{lv['concurrency']:>5}{lv['completed']:>5}/{lv['failed']:<3}"
                  f"{fmt(lv['output_tokens_per_s']):>9}{fmt(lv['ttft_p50_ms']):>10}{fmt(lv['ttft_p99_ms']):>10}"
                  f"{fmt(lv['itl_p50_ms']):>9}{fmt(lv['itl_p99_ms']):>9}{fmt(lv['tpot_p50_ms']):>10}{per_req:>9}"
                  f"{fmt(lv['roofline_tokens_per_s'], '.0f'):>10}{fmt(100 * lv['roofline_fraction']):>7}%")  # fmt: skip
        if "error" in t:
            print(f"{name:<13} stopped early: {t['error'][:200]}")
    print("(times in ms; tok/s = output tokens per second; roofline in tokens/s at batch = concurrency)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 64])
    ap.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per level, at least the concurrency (default max(16, 2 x concurrency))",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=4, help="uncounted requests at concurrency 4 before the levels")
    ap.add_argument("--pause", type=float, default=1.0, help="idle seconds before each level")
    ap.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS), help=",".join(TARGETS))
    ap.add_argument("--tokenwire-mode", choices=["up", "split"], default="up")
    ap.add_argument("--transformers-args", default="", help="extra `transformers serve` flags, e.g. --cb-block-size")
    ap.add_argument("--model-dir", type=Path, default=None, help="an exported model (default: export to a temp dir)")
    ap.add_argument("--logs", type=Path, default=None, help="keep each target's log here (default: a temp dir)")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    ap.add_argument("--naive-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_server:
        naive_server(args.model_dir, "127.0.0.1", args.port)
        return 0
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")

    with tempfile.TemporaryDirectory(prefix="tw-bench-serve-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = Path(tmp) / "model"
            export = [sys.executable, "-m", "service.cli", "--log-level", "warning", "tiny-model", "export"]
            done = subprocess.run([*export, str(model_dir)], cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"tiny-model export failed:\n{done.stdout}{done.stderr}")
        model_dir = model_dir.resolve()
        print("measuring the machine's roofline (float32 matmul, tensor copy) ...", flush=True)
        machine_peak = machine_roofline()
        cost = model_cost(model_dir)
        peak, counted = machine_peak, cost["params_counted"]
        print(
            f"  {peak['flops_per_s'] / 1e9:.1f} GFLOP/s, {peak['bytes_per_s'] / 1e9:.1f} GB/s (best of repeats); "
            f"{counted / 1e6:.1f}M of {cost['params_total'] / 1e6:.1f}M parameters counted: "
            f"{cost['flops_per_token'] / 1e6:.0f} MFLOP/token, {cost['weight_bytes'] / 1e6:.0f} MB of weights"
        )
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        results = {name: bench_target(Target(name, args, model_dir, logs), machine_peak, cost) for name in args.targets}

    print_table(results)
    import torch

    machine = {
        "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": version("transformers"), "openai": version("openai"), "tokenwire": version("tokenwire"),
    }  # fmt: skip
    protocol = {
        "concurrency": args.concurrency, "requests": f"max({args.requests or 16}, {'C' if args.requests else '2 x C'})",
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
        "prompt_words": args.prompt_words, "warmup": args.warmup, "tokenwire_mode": args.tokenwire_mode,
        "transformers_args": args.transformers_args,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "roofline": {**machine_peak, **cost}, "protocol": protocol, "targets": results}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0 if all("error" not in t for t in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
