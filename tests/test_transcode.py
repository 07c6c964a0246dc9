"""The gateway's JSON -> proto mapping and the proto -> JSON shapes OpenAI clients expect."""

from __future__ import annotations

import json

import pytest

from gateway.errors import field_to_loc, validation_body
from gateway.transcode import TranscodeError, chunk_json, completion_json, parse_request
from tokenwire.v1 import chat_pb2


def parse(**body: object) -> chat_pb2.ChatCompletionRequest:
    return parse_request({"messages": [{"role": "user", "content": "hi"}], **body})


def locs(body: object) -> list[tuple[object, ...]]:
    with pytest.raises(TranscodeError) as exc:
        parse_request(body)
    return [loc for loc, _, _ in exc.value.violations]


def test_unions_are_normalised() -> None:
    assert list(parse(stop="END").stop) == ["END"]
    assert list(parse(stop=["a", "b"]).stop) == ["a", "b"]
    assert parse(tool_choice="auto").tool_choice.mode == "auto"
    assert parse(tool_choice={"type": "function", "function": {"name": "f"}}).tool_choice.function.name == "f"
    assert parse(early_stopping="never").early_stopping == chat_pb2.EARLY_STOPPING_NEVER
    assert parse(early_stopping=True).early_stopping == chat_pb2.EARLY_STOPPING_TRUE
    parts = parse_request(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    )
    assert [p.text for p in parts.messages[0].parts.parts] == ["a", "b"]


def test_json_values_travel_as_text_without_losing_integers() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    req = parse(
        guided_json=schema,
        chat_template_kwargs={"k": 1},
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    assert json.loads(req.guided_json) == schema and '"minimum":1' in req.guided_json
    assert json.loads(req.chat_template_kwargs_json) == {"k": 1}
    assert json.loads(req.response_format.json_schema.schema_json) == schema
    assert parse(guided_json='{"type": "string"}').guided_json == '{"type": "string"}'


def test_nulls_mean_unset_and_maps_parse() -> None:
    req = parse(temperature=None, logit_bias={"42": -100, "7": 2.5}, seed=None)
    assert not req.HasField("temperature") and not req.HasField("seed")
    assert dict(req.logit_bias) == {"42": -100.0, "7": 2.5}


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, ("body", "temperature")),
        ({"messages": [{"role": "user", "content": "x"}], "n": 1.5}, ("body", "n")),
        ({"messages": [{"role": "user", "content": "x"}], "n": True}, ("body", "n")),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": 1}, ("body", "logprobs")),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, ("body", "max_tokens")),
        ({"messages": [{"role": "user", "content": "x"}], "bogus": 1}, ("body", "bogus")),
        (
            {"messages": [{"role": "user", "content": "x", "colour": "red"}]},
            ("body", "messages", 0, "colour"),
        ),
        ({"messages": [{"role": "user", "content": 3}]}, ("body", "messages", 0, "content")),
        ({"messages": "hi"}, ("body", "messages")),
        ({}, ("body", "messages")),
        ([], ("body",)),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, ("body", "stop")),
        (
            {"messages": [{"role": "user", "content": "x"}], "early_stopping": "sometimes"},
            ("body", "early_stopping"),
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "x"}},
            ("body", "tool_choice"),
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": "a"}},
            ("body", "logit_bias", "1"),
        ),
    ],
)
def test_type_errors_name_the_field(body: object, loc: tuple[object, ...]) -> None:
    assert loc in locs(body)


def test_field_paths_become_locs() -> None:
    assert field_to_loc("messages[2].content") == ("body", "messages", 2, "content")
    assert field_to_loc("temperature") == ("body", "temperature")
    body = validation_body([(("body", "messages", 2, "content"), "bad", "value_error")])
    assert body["detail"] == [{"loc": ["body", "messages", 2, "content"], "msg": "bad", "type": "value_error"}]
    assert body["error"]["param"] == "messages[2].content"


def test_response_shapes() -> None:
    c = chat_pb2.ChatCompletion(
        id="chatcmpl-1",
        object="chat.completion",
        created=1_700_000_000,
        model="m",
        system_fingerprint="fp",
        choices=[
            chat_pb2.Choice(
                index=0,
                message=chat_pb2.AssistantMessage(role="assistant", content="hi"),
                finish_reason=chat_pb2.FINISH_REASON_LENGTH,
            )
        ],
        usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    )
    out = completion_json(c)
    assert out["created"] == 1_700_000_000 and isinstance(out["created"], int)
    assert out["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "logprobs": None,
        "finish_reason": "length",
    }
    chunk = chunk_json(
        chat_pb2.ChatCompletionChunk(
            id="chatcmpl-1",
            object="chat.completion.chunk",
            created=1,
            model="m",
            system_fingerprint="fp",
            choices=[chat_pb2.ChunkChoice(index=0, delta=chat_pb2.Delta(role="assistant", content=""))],
        )
    )
    assert chunk["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in chunk
