"""The gateway's HTTP surface: auth, OpenAPI (and responses that match it), SSE details, limits, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest
from referencing import Registry, Resource

from gateway.auth import ApiKeys
from tokenwire.v1 import chat_pb2, chat_pb2_grpc

from .conftest import Servers, free_port

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def openapi(servers: Servers) -> dict[str, Any]:
    r = httpx.get(f"{servers.http_url}/openapi.json")
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    registry: Registry[Any] = Registry().with_resource("urn:tokenwire", Resource.from_contents(
        {**doc, "$schema": "https://json-schema.org/draft/2020-12/schema"}))  # fmt: skip
    schema = {"$ref": f"urn:tokenwire#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


# -- auth -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(make_gateway: Any) -> str:
    url: str = make_gateway(api_keys=ApiKeys((b"sk-first", b"sk-second"))).url
    return url


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": "Bearer sk-first"}, 200),
        ({"authorization": "bearer sk-second"}, 200),
        ({"x-api-key": "sk-second"}, 200),
        ({"Authorization": "Bearer sk-wrong"}, 401),
        ({"x-api-key": "sk-firs"}, 401),
        ({"Authorization": "Basic c2stZmlyc3Q="}, 401),
        ({}, 401),
    ],
)
def test_auth_header_styles(locked: str, headers: dict[str, str], status: int) -> None:
    r = httpx.post(f"{locked}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
        assert "sk-" not in err["message"]  # the key is never echoed
    assert httpx.get(f"{locked}/v1/models", headers=headers).status_code == status


def test_auth_with_the_openai_sdk(locked: str) -> None:
    ok = openai.OpenAI(base_url=f"{locked}/v1", api_key="sk-first", max_retries=0)
    assert ok.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=1).choices  # type: ignore[arg-type]
    bad = openai.OpenAI(base_url=f"{locked}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=1)  # type: ignore[arg-type]


def test_health_metrics_and_openapi_stay_open(locked: str) -> None:
    for path in ("/health", "/metrics", "/openapi.json"):
        assert httpx.get(f"{locked}{path}").status_code == 200


def test_keys_from_env_and_file(tmp_path: Any) -> None:
    f = tmp_path / "keys"
    f.write_text("# team keys\nsk-file-1\n\nsk-file-2  # ci\n")
    keys = ApiKeys.load(f, {"TOKENWIRE_API_KEYS": "sk-env, sk-file-1"})
    assert keys.keys == (b"sk-env", b"sk-file-1", b"sk-file-2")
    assert keys.check({"x-api-key": "sk-file-2"}) is None
    assert keys.check({"x-api-key": "sk-file-3"}) == "Incorrect API key provided."
    assert ApiKeys.load(None, {}).open


# -- OpenAPI and responses that match it ---------------------------------------------------------------------


def test_openapi_document_is_derived_from_the_proto(openapi: dict[str, Any]) -> None:
    from tokenwire.v1 import chat_pb2

    assert openapi["openapi"].startswith("3.1")
    req = openapi["components"]["schemas"]["ChatCompletionRequest"]
    assert req["additionalProperties"] is False and req["required"] == ["messages"]
    proto_names = {f.name.removesuffix("_json") for f in chat_pb2.ChatCompletionRequest.DESCRIPTOR.fields}
    assert set(req["properties"]) == (proto_names - {"guided"}) | {"guided_json"}
    assert "Nucleus sampling mass" in req["properties"]["top_p"]["description"]  # the proto's own comment
    assert {"/v1/chat/completions", "/v4/beta/chat/completions", "/v1/models", "/health"} <= set(openapi["paths"])
    jsonschema.Draft202012Validator.check_schema(req)


def test_responses_match_the_document(servers: Servers, openapi: dict[str, Any]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    validator(openapi, "ChatCompletion").validate(
        httpx.post(f"{servers.http_url}/v1/chat/completions", json=body).json()
    )
    validator(openapi, "ModelList").validate(httpx.get(f"{servers.http_url}/v1/models").json())
    chunk_v = validator(openapi, "ChatCompletionChunk")
    with httpx.stream("POST", f"{servers.http_url}/v1/chat/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for e in events[:-1]:
        chunk_v.validate(json.loads(e))
    bad = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": []})
    validator(openapi, "ValidationError").validate(bad.json())
    missing = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, "model": "x"})
    assert missing.status_code == 404
    validator(openapi, "Error").validate(missing.json())


def test_every_request_field_is_accepted_or_rejected_by_name(servers: Servers, openapi: dict[str, Any]) -> None:
    """Each field of the document reaches the service: it works (200) or is refused naming itself (422)."""
    samples: dict[str, Any] = {
        "model": "tiny-test", "stream": False, "stream_options": {"include_usage": True}, "max_tokens": 2,
        "max_completion_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "min_p": 0.1,
        "frequency_penalty": 0.1, "presence_penalty": 0.1, "repetition_penalty": 1.1, "logit_bias": {"5": 1},
        "seed": 1, "logprobs": True, "top_logprobs": 2, "n": 2, "best_of": 3, "use_beam_search": True,
        "length_penalty": 1.2, "early_stopping": "never", "stop": ["x"], "include_stop_str_in_output": True,
        "ignore_eos": True, "min_tokens": 1, "loglikelihood": True, "guided_json": {"type": "object"},
        "guided_regex": "a+", "guided_choice": ["a", "b"], "guided_grammar": "root ::= \"a\"",
        "guided_decoding_backend": "auto", "guided_whitespace_pattern": " ?",
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "parallel_tool_calls": False, "chat_template": "{{ messages }}",
        "chat_template_kwargs": {"a": 1}, "memory_strategy": {"name": "last_k", "params": {"k": 2}},
        "prediction": {"type": "content", "content": "hello"}, "peft": "adapter", "user": "u",
        "log_prompt": False, "inference_timeout": 5, "api_key_ref": "ref", "openai_api_key": "sk",
        "inference_extra_headers": {"a": "b"}, "inference_extra_params": {"a": 1}, "suffix": "s",
        "audio": {"voice": "x"}, "modalities": ["text", "audio"], "store": True, "metadata": {"k": "v"},
        "service_tier": "auto",
    }  # fmt: skip
    props = set(openapi["components"]["schemas"]["ChatCompletionRequest"]["properties"]) - {"messages"}
    assert props == set(samples), props ^ set(samples)
    for name, value in samples.items():
        r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, name: value}, timeout=60)
        if r.status_code == 200:
            continue
        assert r.status_code == 422, (name, r.status_code, r.text)
        assert ["body", name] in [d["loc"][:2] for d in r.json()["detail"]], (name, r.text)


# -- SSE details -----------------------------------------------------------------------------------------------


def test_raw_sse_stream(servers: Servers, make_gateway: Any) -> None:
    url = make_gateway(sse_ping_seconds=0.0005).url  # ping whenever the service is a moment late
    body = {"messages": MESSAGES, "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers={"x-request-id": "abc-123"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-accel-buffering"] == "no" and r.headers["cache-control"] == "no-cache"
        assert r.headers["x-request-id"] == "abc-123"
        raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    data = [b[6:] for b in blocks if b.startswith("data: ")]
    assert all(b.startswith(("data: ", ": ping")) for b in blocks)
    assert any(b.startswith(": ping") for b in blocks)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert len({(c["id"], c["created"], c["system_fingerprint"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    # the openai SDK reads the same stream, comments and all
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-test", messages=MESSAGES, max_tokens=20, stream=True, temperature=0
        )
        if c.choices
    )  # type: ignore[arg-type]
    assert text == client.chat.completions.create(model="tiny-test", messages=MESSAGES, max_tokens=20,  # type: ignore[arg-type]
                                                  temperature=0).choices[0].message.content  # fmt: skip


def test_stream_rejected_by_the_service_gets_its_real_status(servers: Servers) -> None:
    r = httpx.post(f"{servers.http_url}/v1/chat/completions",
                   json={"messages": MESSAGES, "stream": True, "model": "nope"})  # fmt: skip
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"


def test_async_sdk_with_extra_body(servers: Servers) -> None:
    async def main() -> tuple[str | None, str]:
        client = openai.AsyncOpenAI(base_url=f"{servers.http_url}/v1", api_key="x", max_retries=0)
        extra = {"top_k": 1, "min_p": 0.0, "repetition_penalty": 1.0, "min_tokens": 2}
        kwargs: dict[str, Any] = {"model": "tiny-test", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0,
                                  "seed": 3, "extra_body": extra}  # fmt: skip
        full = await client.chat.completions.create(**kwargs)
        stream = await client.chat.completions.create(**kwargs, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        with pytest.raises(openai.UnprocessableEntityError):
            await client.chat.completions.create(model="tiny-test", messages=MESSAGES,  # type: ignore[arg-type]
                                                 extra_body={"guided_regex": "["})  # fmt: skip
        return full.choices[0].message.content, text

    content, streamed = asyncio.run(main())
    assert content == streamed


# -- limits and metrics ------------------------------------------------------------------------------------------


def test_body_limit_is_413(make_gateway: Any) -> None:
    url = make_gateway(max_body_bytes=2000).url
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_message_limits_apply_on_both_paths(servers: Servers) -> None:
    import grpc

    from tokenwire.v1 import chat_pb2, chat_pb2_grpc

    too_many = [{"role": "user", "content": "x"}] * 1025
    r = httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": too_many})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "messages"]
    with grpc.insecure_channel(servers.grpc_address) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            chat_pb2_grpc.ChatServiceStub(ch).CreateChatCompletion(chat_pb2.ChatCompletionRequest(
                messages=[chat_pb2.ChatMessage(role="user", text="x")] * 1025))  # fmt: skip
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_metrics_count_requests(servers: Servers) -> None:
    httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1})
    httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": []})
    text = httpx.get(f"{servers.http_url}/metrics").text
    assert 'tokenwire_gateway_requests_total{route="chat",status="200"}' in text
    assert 'tokenwire_gateway_requests_total{route="chat",status="422"}' in text
    assert "tokenwire_gateway_request_duration_seconds_bucket" in text


# -- failures after the 200, and what gets logged ---------------------------------------------------------------


def test_failure_after_the_200_is_an_error_event(tiny_model_dir: Any) -> None:
    from .conftest import start_stack

    with start_stack(tiny_model_dir, name="doomed") as stack:
        body = {"messages": MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{stack.http_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            stack.service.state.engine.stop()  # the engine dies mid-stream
            rest = [line for line in lines if line.startswith("data: ")]
        error = json.loads(rest[-2][6:])
        assert rest[-1] == "data: [DONE]"
        assert error["error"]["type"] == "service_unavailable" and "shutting down" in error["error"]["message"]
        # openai-python raises on such an event
        client = openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            list(client.chat.completions.create(model="doomed", messages=MESSAGES, stream=True))  # type: ignore[arg-type]


def test_prompts_are_logged_only_with_log_prompt(servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    secret = [{"role": "user", "content": "the secret is 4417"}]
    with caplog.at_level(logging.INFO, logger="tokenwire.service"):
        httpx.post(f"{servers.http_url}/v1/chat/completions", json={"messages": secret, "max_tokens": 1, "user": "u-9"})
        quiet = [r for r in caplog.records if r.getMessage() == "request"]
        caplog.clear()
        httpx.post(f"{servers.http_url}/v1/chat/completions",
                   json={"messages": secret, "max_tokens": 1, "log_prompt": True})  # fmt: skip
        loud = [r for r in caplog.records if r.getMessage() == "request"]
    assert len(quiet) == 1 and "4417" not in json.dumps(quiet[0].fields)  # type: ignore[attr-defined]
    assert quiet[0].fields["user"] == "u-9"  # type: ignore[attr-defined]
    assert len(loud) == 1 and "the secret is 4417" in loud[0].fields["prompt"]  # type: ignore[attr-defined]


def test_guided_requests_log_their_engine(servers: Servers, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    def logged(schema: dict[str, Any]) -> dict[str, Any]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="tokenwire.service"):
            r = httpx.post(f"{servers.http_url}/v1/chat/completions",
                           json={"messages": MESSAGES, "max_tokens": 1, "guided_json": schema})  # fmt: skip
        assert r.status_code == 200, r.text
        (rec,) = [r for r in caplog.records if r.getMessage() == "request"]
        return rec.fields  # type: ignore[attr-defined,no-any-return]

    ours = logged({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert ours["guide_engine"] == "tokenwire-json" and "guide_fallback" not in ours
    fallback = logged({"type": "number", "multipleOf": 0.5})
    assert fallback["guide_engine"] == "llguidance" and fallback["guide_fallback"] == "`multipleOf` on a number"


# -- gRPC status -> HTTP status, end to end ------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_in_front_of(servicer: Any) -> Iterator[str]:
    """A real gateway (uvicorn, the gateway app, a grpc.aio channel) in front of a grpc.aio server with `servicer`
    as its ChatService, both on loopback ports on a thread of their own; yields the gateway's URL."""
    import uvicorn

    from gateway.app import GatewayConfig, create_app

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}
    http_port = free_port()

    async def main() -> None:
        server = grpc.aio.server()
        chat_pb2_grpc.add_ChatServiceServicer_to_server(servicer, server)
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        app = create_app(GatewayConfig(upstream=f"127.0.0.1:{grpc_port}"))
        http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning"))
        task = asyncio.create_task(http.serve())
        while not http.started:  # noqa: ASYNC110 (uvicorn exposes a flag, not an event)
            await asyncio.sleep(0.01)
        box["stop"] = asyncio.Event()
        ready.set()
        await box["stop"].wait()
        http.should_exit = True
        await task
        await server.stop(grace=None)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the gateway did not start"
    try:
        yield f"http://127.0.0.1:{http_port}"
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)


class CancellingChat(chat_pb2_grpc.ChatServiceServicer):
    """A ChatService whose every call ends with the CANCELLED status, as a server that gives a call up sends it."""

    async def CreateChatCompletion(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.CANCELLED, "the engine gave the request up")

    async def StreamChatCompletion(self, request: Any, context: Any) -> AsyncIterator[chat_pb2.ChatCompletionChunk]:
        await context.abort(grpc.StatusCode.CANCELLED, "the engine gave the request up")
        yield chat_pb2.ChatCompletionChunk()  # not reached: abort raises


def test_cancelled_from_the_service_is_499() -> None:
    with gateway_in_front_of(CancellingChat()) as url:
        doc = httpx.get(f"{url}/openapi.json").json()
        for stream in (False, True):  # the stream fails before its first chunk, so it still gets a real status
            r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "stream": stream},
                           headers={"x-request-id": f"cancel-{stream}"}, timeout=30)  # fmt: skip
            assert r.status_code == 499, (stream, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json"
            assert r.headers["x-request-id"] == f"cancel-{stream}"
            validator(doc, "Error").validate(r.json())
            assert r.json()["error"] == {"message": "the engine gave the request up", "type": "cancelled",
                                         "param": None, "code": "cancelled"}  # fmt: skip
        metrics = httpx.get(f"{url}/metrics").text
        assert 'tokenwire_gateway_requests_total{route="chat",status="499"} 2.0' in metrics
