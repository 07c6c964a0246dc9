"""Guided decoding end to end, on the random tiny model (so the mask does all the work), stream and not."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from .conftest import Servers

MESSAGES = [{"role": "user", "content": "Answer."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def complete(servers: Servers, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=120)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def stream(servers: Servers, **body: Any) -> str:
    client = openai.OpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
    out = client.chat.completions.create(model=servers.model_name, messages=MESSAGES, stream=True,  # type: ignore[call-overload]
                                         max_tokens=body.pop("max_tokens"), temperature=body.pop("temperature"),
                                         extra_body=body)  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in out if c.choices)


SAMPLING = [{"temperature": 0}, {"temperature": 1.0, "seed": 11}, {"temperature": 1.3, "top_p": 0.9, "seed": 5}]


@pytest.mark.parametrize("sampling", SAMPLING)
def test_regex(servers: Servers, sampling: dict[str, Any]) -> None:
    pattern = r"(yes|no), [a-z]{2,5} #[0-9]{3}"
    r = complete(servers, guided_regex=pattern, max_tokens=60, **sampling)
    content = r["choices"][0]["message"]["content"]
    assert re.fullmatch(pattern, content), content
    assert r["choices"][0]["finish_reason"] == "stop"
    assert stream(servers, guided_regex=pattern, max_tokens=60, **sampling) == content


@pytest.mark.parametrize("sampling", SAMPLING)
def test_choice(servers: Servers, sampling: dict[str, Any]) -> None:
    choices = ["positive", "negative", "neutral 🙂", "说不清"]
    content = complete(servers, guided_choice=choices, max_tokens=20, **sampling)["choices"][0]["message"]["content"]
    assert content in choices


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("field", ["guided_json", "response_format"])
def test_json_schema(servers: Servers, sampling: dict[str, Any], field: str) -> None:
    spec: dict[str, Any] = (
        {"guided_json": PERSON}
        if field == "guided_json"
        else {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    )
    r = complete(servers, max_tokens=120, **spec, **sampling)
    content = r["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), PERSON, format_checker=jsonschema.FormatChecker())
    assert stream(servers, max_tokens=120, **spec, **sampling) == content


def test_json_object(servers: Servers) -> None:
    # Random weights never close a JSON string by themselves: favour the closing characters with a logit bias
    # (the mask still decides where each may go).
    tok = servers.service.state.served.tokenizer
    bias = {str(tok.convert_tokens_to_ids(t)): 12 for t in ['"', ":", "}", "1"]}
    for sampling in SAMPLING:
        r = complete(servers, response_format={"type": "json_object"}, max_tokens=60, logit_bias=bias,
                     guided_whitespace_pattern=" ?", **sampling)  # fmt: skip
        content = r["choices"][0]["message"]["content"]
        assert isinstance(json.loads(content), dict) and r["choices"][0]["finish_reason"] == "stop", content


@pytest.mark.parametrize(
    ("grammar", "check"),
    [
        ('start: "ok" | "fine" NUMBER\nNUMBER: /[0-9]{1,3}/', r"ok|fine[0-9]{1,3}"),  # Lark-style
        ('root ::= "go " dir\ndir ::= "north" | "south"', r"go (north|south)"),  # GBNF
    ],
)
def test_grammars(servers: Servers, grammar: str, check: str) -> None:
    for sampling in SAMPLING:
        content = complete(servers, guided_grammar=grammar, max_tokens=30, **sampling)["choices"][0]["message"][
            "content"
        ]
        assert re.fullmatch(check, content), content


def test_guides_compose_with_penalties_bias_and_logprobs(servers: Servers) -> None:
    r = complete(servers, guided_regex=r"[a-c]{6}", max_tokens=20, temperature=0.9, seed=3, top_k=20,
                 repetition_penalty=1.3, frequency_penalty=0.5, logit_bias={"29476": 5}, logprobs=True)  # fmt: skip
    content = r["choices"][0]["message"]["content"]
    assert re.fullmatch(r"[a-c]{6}", content)
    assert "".join(bytes(t["bytes"]).decode() for t in r["choices"][0]["logprobs"]["content"]) == content


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"guided_regex": "(unclosed"}, ["body", "guided_regex"]),
        ({"guided_json": {"type": "array", "uniqueItems": True, "items": {"not": {"minimum": 1}}}},
         ["body", "guided_json"]),
        ({"guided_json": "{not json"}, ["body", "guided_json"]),
        ({"guided_grammar": "start: @@@"}, ["body", "guided_grammar"]),
        ({"guided_regex": "a", "guided_choice": ["a"]}, ["body", "guided_choice"]),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         ["body", "response_format", "json_schema", "schema"]),
        ({"response_format": {"type": "xml"}}, ["body", "response_format", "type"]),
        ({"guided_decoding_backend": "magic", "guided_regex": "a"}, ["body", "guided_decoding_backend"]),
        ({"guided_whitespace_pattern": " ", "guided_regex": "a"}, ["body", "guided_whitespace_pattern"]),
    ],
)  # fmt: skip
def test_bad_specs_are_422_naming_the_field(servers: Servers, body: dict[str, Any], loc: list[str]) -> None:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=60)
    assert r.status_code == 422, r.text
    assert loc in [d["loc"] for d in r.json()["detail"]], r.text


def test_backend_names_are_all_served(servers: Servers) -> None:
    for backend in ("auto", "outlines", "lm-format-enforcer", "xgrammar", "llguidance"):
        r = complete(servers, guided_choice=["x", "y"], guided_decoding_backend=backend, max_tokens=5)
        assert r["choices"][0]["message"]["content"] in ("x", "y")
