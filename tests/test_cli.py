"""The `tokenwire` command itself: `up` as a real subprocess, called with curl, stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import free_port

TOKENWIRE = [sys.executable, "-m", "service.cli"]


def test_help_explains_the_commands() -> None:
    out = subprocess.run([*TOKENWIRE, "--help"], capture_output=True, text=True, check=True).stdout
    for word in ("serve", "gateway", "up", "tiny-model", "curl"):
        assert word in out
    up = subprocess.run([*TOKENWIRE, "up", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--model" in up and "--http-port" in up and "--grpc-port" in up


@pytest.fixture(scope="module")
def running_up(tiny_model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [*TOKENWIRE, "up", "--model", str(tiny_model_dir), "--served-model-name", "tiny-cli",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--drain-seconds", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("tokenwire up did not become healthy")
    yield proc, http_port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_curl_from_the_readme(running_up: tuple[subprocess.Popen[str], int]) -> None:
    _, port = running_up
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("curl -s localhost:8000/v1/chat"))
    body = readme.split(command, 1)[1].split("'", 2)[1]  # the -d '...' payload on the next line
    out = subprocess.run(
        ["curl", "-s", f"localhost:{port}/v1/chat/completions", "-H", "content-type: application/json", "-d", body],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    data = json.loads(out)
    assert data["object"] == "chat.completion" and data["model"] == "tiny-cli"
    assert data["choices"][0]["message"]["role"] == "assistant"


def test_sigterm_exits_cleanly(running_up: tuple[subprocess.Popen[str], int]) -> None:
    proc, port = running_up
    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "SECRET-PROMPT-TEXT"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 200
    # A stream in flight when SIGTERM arrives still completes (health goes NOT_SERVING, in-flight RPCs drain).
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 60, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as s:
        lines = s.iter_lines()
        assert next(lines).startswith("data: {")
        proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in rest[-2]
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "shutting down" for entry in logs)
    assert any(entry["msg"] == "request" for entry in logs)
    assert "SECRET-PROMPT-TEXT" not in out  # prompts are never logged without log_prompt


def test_tiny_model_export_loads_with_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    subprocess.run([*TOKENWIRE, "tiny-model", "export", str(tmp_path / "m")], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "llama" and len(tok) == 32768
    assert tok.chat_template and "[INST]" in tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
