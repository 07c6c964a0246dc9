"""The service edge: one validation pass into frozen params, every violation named."""

from __future__ import annotations

import dataclasses

import pytest

from service.errors import InvalidRequest, ModelNotFound
from service.params import LATER, SUPPORTED, ChatParams, Limits, validate
from tokenwire.v1 import chat_pb2

USER = [chat_pb2.ChatMessage(role="user", text="hi")]


def check(streaming: bool = False, **fields: object) -> ChatParams:
    req = chat_pb2.ChatCompletionRequest(messages=fields.pop("messages", USER), **fields)  # type: ignore[arg-type]
    return validate(
        req,
        streaming=streaming,
        served_names=frozenset({"m", "alias"}),
        default_model="m",
        limits=Limits(),
        vocab_size=1000,
    )


def violations(streaming: bool = False, **fields: object) -> dict[str, str]:
    with pytest.raises(InvalidRequest) as exc:
        check(streaming, **fields)
    return {v.field: v.description for v in exc.value.violations}


def test_defaults_and_frozen() -> None:
    p = check()
    assert p.model == "m" and p.max_tokens is None and not p.stream and not p.include_usage
    assert p.sampling.temperature == 1.0 and p.sampling.top_p == 1.0 and p.sampling.seed is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.model = "x"  # type: ignore[misc]


def test_max_completion_tokens_wins() -> None:
    assert check(max_tokens=5, max_completion_tokens=9).max_tokens == 9
    assert check(max_tokens=5).max_tokens == 5


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"temperature": -0.1}, "temperature", "[0, 2]"),
        ({"temperature": 2.5}, "temperature", "got 2.5"),
        ({"temperature": float("nan")}, "temperature", "finite"),
        ({"top_p": 0.0}, "top_p", "(0, 1]"),
        ({"top_p": 1.5}, "top_p", "got 1.5"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
        ({"max_completion_tokens": 10**6}, "max_completion_tokens", "<= 4096"),
        ({"messages": []}, "messages", "at least one"),
        ({"messages": [chat_pb2.ChatMessage(role="robot", text="x")]}, "messages[0].role", "one of"),
        ({"messages": [chat_pb2.ChatMessage(role="user")]}, "messages[0].content", "needs `content`"),
        (
            {"messages": [chat_pb2.ChatMessage(role="tool", text="42")]},
            "messages[0].tool_call_id",
            "tool_call_id",
        ),
        ({"stream": True}, "stream", "does not match"),
        ({"stream_options": chat_pb2.StreamOptions(include_usage=True)}, "stream_options", "only allowed"),
        ({"suffix": "x"}, "suffix", "not supported for chat models"),
        ({"audio_json": "{}"}, "audio", "text-only"),
        ({"modalities": ["text", "audio"]}, "modalities", 'only ["text"]'),
        ({"tools": [chat_pb2.Tool(type="function")]}, "tools", "not supported yet (arrives with tool calling)"),
        ({"peft": "x"}, "peft", "not supported yet (arrives with LoRA adapters)"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one output constraint"),
        ({"guided_json": "[1]"}, "guided_json", "must be an object"),
        (
            {"response_format": chat_pb2.ResponseFormat(type="json_schema")},
            "response_format.json_schema.schema",
            "needs a `schema`",
        ),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "JSON constraints only"),
        ({"guided_decoding_backend": "vllm"}, "guided_decoding_backend", "must be one of"),
        ({"n": 17}, "n", "[1, 16]"),
        ({"n": 3, "best_of": 2}, "best_of", "[n=3, 16]"),
        ({"length_penalty": 2.0}, "length_penalty", "only with `use_beam_search"),
        ({"use_beam_search": True, "temperature": 0.7}, "temperature", "no effect with `use_beam_search`"),
        ({"chat_template_kwargs_json": "[1]"}, "chat_template_kwargs", "JSON object"),
        ({"chat_template_kwargs_json": '{"messages": 1}'}, "chat_template_kwargs.messages", "cannot be overridden"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"stop": ["ok", ""]}, "stop[1]", "empty"),
        ({"top_k": -2}, "top_k", "got -2"),
        ({"min_p": 1.5}, "min_p", "[0, 1]"),
        ({"frequency_penalty": 2.5}, "frequency_penalty", "[-2, 2]"),
        ({"presence_penalty": -3.0}, "presence_penalty", "got -3"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias.abc", "token ids"),
        ({"logit_bias": {"99999": 1.0}}, "logit_bias.99999", "not in the vocabulary"),
        ({"logit_bias": {"5": 101.0}}, "logit_bias.5", "[-100, 100]"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "[0, 20]"),
        ({"top_logprobs": 3}, "top_logprobs", "requires `logprobs: true`"),
        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "<= the max tokens"),
        ({"openai_api_key": "sk"}, "openai_api_key", "no upstream provider"),
    ],
)
def test_violations_name_the_field(fields: dict[str, object], field: str, fragment: str) -> None:
    found = violations(**fields)
    assert field in found, found
    assert fragment in found[field]


def test_all_violations_reported_together() -> None:
    found = violations(messages=[], temperature=-1.0, top_p=2.0, n=40)
    assert set(found) == {"messages", "temperature", "top_p", "n"}


def test_neutral_values_are_accepted() -> None:
    p = check(
        n=1,
        best_of=1,
        logprobs=False,
        top_logprobs=0,
        top_k=-1,
        min_p=0.0,
        repetition_penalty=1.0,
        modalities=["text"],
        response_format=chat_pb2.ResponseFormat(type="text"),
    )
    assert p.model == "m"


def test_streaming_options() -> None:
    p = check(streaming=True, stream=True, stream_options=chat_pb2.StreamOptions(include_usage=True))
    assert p.stream and p.include_usage


def test_unknown_model_and_alias() -> None:
    assert check(model="alias").model == "alias"
    with pytest.raises(ModelNotFound):
        check(model="other")


def test_every_proto_field_is_supported_or_explained() -> None:
    """A field added to the proto must be handled here, or rejected with a reason (meta-test against drift)."""
    handled = SUPPORTED | set(LATER) | {"suffix", "audio_json", "modalities"}
    names = {f.name for f in chat_pb2.ChatCompletionRequest.DESCRIPTOR.fields}
    assert names - handled == set()


def test_negative_seed_maps_to_u64() -> None:
    assert check(seed=-1).sampling.seed == 2**64 - 1


def test_sampler_fields_reach_the_params() -> None:
    p = check(top_k=40, min_p=0.05, frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.2,
              logit_bias={"7": -100.0, "3": 2.5}, logprobs=True, top_logprobs=5, min_tokens=2, ignore_eos=True,
              seed=42)  # fmt: skip
    s = p.sampling
    assert (s.top_k, s.min_p, s.frequency_penalty, s.presence_penalty, s.repetition_penalty) == (
        40,
        0.05,
        0.5,
        -0.5,
        1.2,
    )
    assert s.logit_bias == ((3, 2.5), (7, -100.0)) and s.seed == 42
    assert (s.min_tokens, s.ignore_eos, p.logprobs, p.top_logprobs) == (2, True, True, 5)
    assert check(top_k=-1).sampling.top_k == 0


def test_stop_template_and_loglikelihood_reach_the_params() -> None:
    import json

    p = check(stop=["a", "b"], include_stop_str_in_output=True, loglikelihood=True, chat_template="{{ x }}",
              chat_template_kwargs_json=json.dumps({"x": 1, "lang": "fr"}))  # fmt: skip
    assert p.stop == ("a", "b") and p.include_stop_str_in_output and p.loglikelihood
    assert p.chat_template == "{{ x }}" and p.chat_template_kwargs == (("lang", "fr"), ("x", 1))
    assert "loglikelihood" in violations(streaming=True, loglikelihood=True)


def test_server_can_refuse_request_templates() -> None:
    req = chat_pb2.ChatCompletionRequest(messages=USER, chat_template="{{ 1 }}")
    with pytest.raises(InvalidRequest) as exc:
        validate(req, streaming=False, served_names=frozenset({"m"}), default_model="m",
                 limits=Limits(allow_request_chat_template=False), vocab_size=10)  # fmt: skip
    assert exc.value.violations[0].field == "chat_template"


def test_n_best_of_and_beams() -> None:
    p = check(n=2, best_of=5, temperature=0.5)
    assert (p.n, p.best_of, p.beam) == (2, 5, None)
    assert "best_of" in violations(streaming=True, stream=True, n=2, best_of=3)
    b = check(use_beam_search=True, n=2, best_of=4, length_penalty=0.5, early_stopping=chat_pb2.EARLY_STOPPING_NEVER)
    assert b.beam is not None and (b.beam.width, b.beam.length_penalty, b.beam.early_stopping) == (4, 0.5, "never")
    assert check(use_beam_search=True, n=3).beam.width == 3  # type: ignore[union-attr]
    assert check(streaming=True, use_beam_search=True, n=2).beam is not None  # final beams are streamed


def test_guides_reach_the_params() -> None:
    g = check(guided_choice=["a", "b"], guided_decoding_backend="xgrammar").guide
    assert g is not None and (g.kind, g.spec, g.field, g.requested_backend) == ("choice", ("a", "b"), "guided_choice",
                                                                                   "xgrammar")  # fmt: skip
    j = check(response_format=chat_pb2.ResponseFormat(type="json_object"), guided_whitespace_pattern=" ?").guide
    assert j is not None and (j.kind, j.whitespace_pattern) == ("json_object", " ?")
