"""JSON <-> protobuf for the chat API, driven by the proto descriptors (one source of truth).

JSON -> proto walks the request descriptor: each JSON key must name a field (unknown keys are rejected, as
OpenAI does), each value must have the field's JSON type. The API's unions are normalised on the way in:
`stop: str | list`, message `content: str | list[part]`, `tool_choice: str | object`,
`early_stopping: bool | "never"`, and JSON values (schemas, kwargs) that travel as JSON text in `*_json` fields.
A JSON `null` means "unset", as in OpenAI's API.

proto -> JSON is written out per response type, because OpenAI clients expect what proto3's JSON mapping does
not give: numbers for int64, explicit nulls, `bytes` as a list of integers, `finish_reason` as a string or null.
"""

from __future__ import annotations

import json
import math
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from tokenwire.v1 import chat_pb2, models_pb2

Loc = tuple[str | int, ...]


class TranscodeError(Exception):
    """The JSON body does not fit the schema; carries FastAPI-style violations."""

    def __init__(self, violations: list[tuple[Loc, str, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg, _ in violations))
        self.violations = violations


# Proto fields that carry a JSON value as text, keyed by the JSON name clients send.
_JSON_TEXT_SUFFIX = "_json"
_JSON_OR_TEXT = {"guided_json"}  # accepts an object (serialised) or a string (kept as is)

_T = FieldDescriptor
_INTS = {_T.TYPE_INT32, _T.TYPE_INT64, _T.TYPE_UINT32, _T.TYPE_UINT64, _T.TYPE_SINT32, _T.TYPE_SINT64}
_FLOATS = {_T.TYPE_DOUBLE, _T.TYPE_FLOAT}
_INT_BOUNDS = {
    _T.TYPE_INT32: (-(2**31), 2**31 - 1),
    _T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _T.TYPE_UINT32: (0, 2**32 - 1),
    _T.TYPE_INT64: (-(2**63), 2**63 - 1),
    _T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _T.TYPE_UINT64: (0, 2**64 - 1),
}
_TYPE_NAMES = {bool: "boolean", str: "string", int: "integer", float: "number", list: "array", dict: "object"}


def _json_type(value: Any) -> str:
    return "null" if value is None else _TYPE_NAMES.get(type(value), type(value).__name__)


def _field_map(desc: Descriptor) -> dict[str, FieldDescriptor]:
    """JSON name -> field. `*_json` fields are addressed without their suffix."""
    out: dict[str, FieldDescriptor] = {}
    for fd in desc.fields:
        if fd.containing_oneof is not None and fd.containing_oneof.name == "content":
            continue  # the JSON `content` union (a string or a list of parts) is parsed by _Parser.content
        name = fd.name
        if name.endswith(_JSON_TEXT_SUFFIX) and name not in _JSON_OR_TEXT:
            name = name[: -len(_JSON_TEXT_SUFFIX)]
        out[name] = fd
    return out


_FIELD_MAPS: dict[str, dict[str, FieldDescriptor]] = {}


def fields_of(desc: Any) -> dict[str, FieldDescriptor]:
    """The JSON-visible fields of a message type (cached)."""
    cached = _FIELD_MAPS.get(desc.full_name)
    if cached is None:
        cached = _FIELD_MAPS[desc.full_name] = _field_map(desc)
    return cached


class _Parser:
    def __init__(self) -> None:
        self.errors: list[tuple[Loc, str, str]] = []

    def bad(self, loc: Loc, msg: str, kind: str) -> None:
        self.errors.append((loc, msg, kind))

    # -- scalars ---------------------------------------------------------------------------------------------
    def scalar(self, fd: FieldDescriptor, value: Any, loc: Loc) -> Any:
        t = fd.type
        if t == _T.TYPE_BOOL:
            if isinstance(value, bool):
                return value
            return self.bad(loc, f"Input should be a valid boolean, got {_json_type(value)}", "bool_type")
        if t == _T.TYPE_STRING:
            if fd.name.endswith(_JSON_TEXT_SUFFIX) or fd.name in _JSON_OR_TEXT:
                if fd.name in _JSON_OR_TEXT and isinstance(value, str):
                    return value
                return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            if isinstance(value, str):
                return value
            return self.bad(loc, f"Input should be a valid string, got {_json_type(value)}", "string_type")
        if t in _INTS:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                return self.bad(loc, f"Input should be a valid integer, got {_json_type(value)}", "int_type")
            lo, hi = _INT_BOUNDS[t]
            if not lo <= value <= hi:
                what = "a non-negative integer" if lo == 0 else "an integer"
                return self.bad(loc, f"Input should be {what} in [{lo}, {hi}], got {value}", "int_range")
            return value
        if t in _FLOATS:
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    return self.bad(loc, "Input should be a finite number", "finite_number")
                return float(value)
            return self.bad(loc, f"Input should be a valid number, got {_json_type(value)}", "float_type")
        if t == _T.TYPE_ENUM:
            return self.enum(fd, value, loc)
        return self.bad(loc, "unsupported field type", "type_error")  # pragma: no cover (schema bug)

    def enum(self, fd: FieldDescriptor, value: Any, loc: Loc) -> Any:
        if fd.enum_type is chat_pb2.EarlyStopping.DESCRIPTOR:
            mapping = {
                True: chat_pb2.EARLY_STOPPING_TRUE,
                False: chat_pb2.EARLY_STOPPING_FALSE,
                "never": chat_pb2.EARLY_STOPPING_NEVER,
            }
            if isinstance(value, bool) or value == "never":
                return mapping[value]
            return self.bad(loc, 'Input should be true, false or "never"', "enum")
        return self.bad(loc, "unsupported enum", "enum")  # pragma: no cover

    # -- messages --------------------------------------------------------------------------------------------
    def message(self, obj: Any, msg: Message, loc: Loc) -> None:
        if not isinstance(obj, dict):
            self.bad(loc, f"Input should be a valid object, got {_json_type(obj)}", "dict_type")
            return
        fields = fields_of(msg.DESCRIPTOR)
        for key, value in obj.items():
            here = (*loc, key)
            special = _SPECIAL.get((msg.DESCRIPTOR.full_name, key))
            if special is not None:
                if value is not None:
                    special(self, value, msg, here)
                continue
            fd = fields.get(key)
            if fd is None:
                self.bad(here, f"Extra inputs are not permitted: unknown field `{key}`", "extra_forbidden")
                continue
            if value is None:  # null = unset
                continue
            self.assign(fd, value, msg, here)

    def assign(self, fd: FieldDescriptor, value: Any, msg: Message, loc: Loc) -> None:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            self.map(fd, value, msg, loc)
        elif fd.is_repeated:
            if not isinstance(value, list):
                self.bad(loc, f"Input should be a valid array, got {_json_type(value)}", "list_type")
                return
            container = getattr(msg, fd.name)
            for i, item in enumerate(value):
                if fd.message_type is not None:
                    self.message(item, container.add(), (*loc, i))
                else:
                    v = self.scalar(fd, item, (*loc, i))
                    if v is not None:
                        container.append(v)
        elif fd.message_type is not None:
            sub = getattr(msg, fd.name)
            sub.SetInParent()
            self.message(value, sub, loc)
        else:
            v = self.scalar(fd, value, loc)
            if v is not None:
                setattr(msg, fd.name, v)

    def map(self, fd: FieldDescriptor, value: Any, msg: Message, loc: Loc) -> None:
        if not isinstance(value, dict):
            self.bad(loc, f"Input should be a valid object, got {_json_type(value)}", "dict_type")
            return
        entry = fd.message_type
        assert entry is not None
        vfd = entry.fields_by_name["value"]
        container = getattr(msg, fd.name)
        for k, item in value.items():
            v = self.scalar(vfd, item, (*loc, k))
            if v is not None:
                container[k] = v

    # -- the API's unions ------------------------------------------------------------------------------------
    def content(self, value: Any, msg: Message, loc: Loc) -> None:
        if isinstance(value, str):
            msg.text = value  # type: ignore[attr-defined]
        elif isinstance(value, list):
            parts = msg.parts  # type: ignore[attr-defined]
            parts.SetInParent()
            for i, part in enumerate(value):
                if isinstance(part, dict) and part.get("type") not in (None, "text"):
                    self.bad(
                        (*loc, i, "type"),
                        f'content part type {part.get("type")!r} is not supported: only "text" parts (text-only model)',
                        "not_supported",
                    )
                    continue
                self.message(part, parts.parts.add(), (*loc, i))
        else:
            self.bad(
                loc,
                f"Input should be a string or an array of content parts, got {_json_type(value)}",
                "union_type",
            )

    def stop(self, value: Any, msg: Message, loc: Loc) -> None:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            self.bad(loc, "Input should be a string or an array of strings", "union_type")
            return
        msg.stop.extend(items)  # type: ignore[attr-defined]

    def tool_choice(self, value: Any, msg: Message, loc: Loc) -> None:
        choice = msg.tool_choice  # type: ignore[attr-defined]
        if isinstance(value, str):
            choice.mode = value
        elif isinstance(value, dict):
            extra = set(value) - {"type", "function"}
            func = value.get("function")
            if (
                extra
                or value.get("type") != "function"
                or not isinstance(func, dict)
                or set(func) != {"name"}
                or not isinstance(func["name"], str)
            ):
                self.bad(
                    loc,
                    'Input should be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                    "union_type",
                )
                return
            choice.function.name = func["name"]
        else:
            self.bad(loc, f"Input should be a string or an object, got {_json_type(value)}", "union_type")


_SPECIAL = {
    ("tokenwire.v1.ChatMessage", "content"): _Parser.content,
    ("tokenwire.v1.Prediction", "content"): _Parser.content,
    ("tokenwire.v1.ChatCompletionRequest", "stop"): _Parser.stop,
    ("tokenwire.v1.ChatCompletionRequest", "tool_choice"): _Parser.tool_choice,
}


def parse_request(body: Any) -> chat_pb2.ChatCompletionRequest:
    """A decoded JSON body -> ChatCompletionRequest; raise TranscodeError listing every problem."""
    request = chat_pb2.ChatCompletionRequest()
    parser = _Parser()
    parser.message(body, request, ("body",))
    if isinstance(body, dict) and "messages" not in body:
        parser.bad(("body", "messages"), "Field required", "missing")
    if parser.errors:
        raise TranscodeError(parser.errors)
    return request


# -- proto -> JSON -----------------------------------------------------------------------------------------

_FINISH_JSON = {
    chat_pb2.FINISH_REASON_UNSPECIFIED: None,
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    chat_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}


def _usage(u: chat_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def _top(t: chat_pb2.TopLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)}


def _logprobs(lp: chat_pb2.ChoiceLogprobs) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [_top(x) for x in t.top_logprobs],
            }
            for t in lp.content
        ]
    }


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": c.function.arguments}}
        for c in calls
    ]


def _head(c: chat_pb2.ChatCompletion | chat_pb2.ChatCompletionChunk) -> dict[str, Any]:
    """The fields every completion and chunk starts with."""
    return {"id": c.id, "object": c.object, "created": c.created, "model": c.model,
            "system_fingerprint": c.system_fingerprint}  # fmt: skip


def completion_json(c: chat_pb2.ChatCompletion) -> dict[str, Any]:
    """ChatCompletion -> OpenAI's `chat.completion` object."""
    choices = []
    for ch in c.choices:
        message: dict[str, Any] = {
            "role": ch.message.role or "assistant",
            "content": ch.message.content if ch.message.HasField("content") else None,
        }
        if ch.message.tool_calls:
            message["tool_calls"] = _tool_calls(ch.message.tool_calls)
        choices.append(
            {
                "index": ch.index,
                "message": message,
                "logprobs": _logprobs(ch.logprobs) if ch.HasField("logprobs") else None,
                "finish_reason": _FINISH_JSON[ch.finish_reason],
            }
        )
    out = {**_head(c), "choices": choices, "usage": _usage(c.usage)}
    if c.prompt_logprobs:
        out["prompt_logprobs"] = [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in c.prompt_logprobs
        ]
    return out


def chunk_json(c: chat_pb2.ChatCompletionChunk) -> dict[str, Any]:
    """ChatCompletionChunk -> OpenAI's `chat.completion.chunk` object."""
    choices = []
    for ch in c.choices:
        delta: dict[str, Any] = {}
        if ch.delta.HasField("role"):
            delta["role"] = ch.delta.role
        if ch.delta.HasField("content"):
            delta["content"] = ch.delta.content
        if ch.delta.tool_calls:
            delta["tool_calls"] = [
                {
                    "index": t.index,
                    **({"id": t.id} if t.HasField("id") else {}),
                    **({"type": t.type} if t.HasField("type") else {}),
                    **(
                        {
                            "function": {
                                k: getattr(t.function, k) for k in ("name", "arguments") if t.function.HasField(k)
                            }
                        }
                        if t.HasField("function")
                        else {}
                    ),
                }
                for t in ch.delta.tool_calls
            ]
        choices.append(
            {
                "index": ch.index,
                "delta": delta,
                "logprobs": _logprobs(ch.logprobs) if ch.HasField("logprobs") else None,
                "finish_reason": _FINISH_JSON[ch.finish_reason],
            }
        )
    out = {**_head(c), "choices": choices}
    if c.HasField("usage"):
        out["usage"] = _usage(c.usage)
    return out


def models_json(r: models_pb2.ListModelsResponse) -> dict[str, Any]:
    """ListModelsResponse -> OpenAI's model list."""
    return {
        "object": "list",
        "data": [
            {
                "id": m.id,
                "object": m.object,
                "created": m.created,
                "owned_by": m.owned_by,
                "max_context_length": m.max_context_length,
            }
            for m in r.data
        ],
    }
