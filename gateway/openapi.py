"""GET /openapi.json: an OpenAPI 3.1 document derived from the proto contract (one source of truth).

Request schemas come from the same descriptor walk the transcoder uses (`transcode.fields_of`), so a field added
to the proto appears in the document and is accepted by the gateway at once; descriptions are the proto's own
field comments (from the descriptor set `scripts/gen_proto.py` writes with source info). The API's JSON unions
(`stop`, `content`, `tool_choice`, `early_stopping`, JSON-valued `*_json` fields) are spelled out here, where the
transcoder special-cases them too. Response schemas follow the hand-written proto -> JSON mapping of
`transcode.py`: numbers for int64, explicit nulls, `bytes` as integer lists, `finish_reason` as a string or null.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from service.params import BOUNDS, LATER, NEUTRAL_JSON, ROLES, json_name
from tokenwire.v1 import chat_pb2, models_pb2

from .transcode import _JSON_OR_TEXT, _JSON_TEXT_SUFFIX, fields_of

_T = FieldDescriptor
_SCALARS: dict[int, dict[str, Any]] = {
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_DOUBLE: {"type": "number"},
    _T.TYPE_FLOAT: {"type": "number"},
    _T.TYPE_INT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    _T.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    _T.TYPE_INT64: {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    _T.TYPE_UINT64: {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
}
_NULL = {"type": "null"}
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "tool_calls", "content_filter", None]}


@cache
def _comments() -> dict[str, str]:
    """Full name of each message and field -> its leading comment in the .proto."""
    raw = (resources.files("tokenwire.v1") / "descriptors.binpb").read_bytes()
    fds = descriptor_pb2.FileDescriptorSet.FromString(raw)
    out: dict[str, str] = {}
    for f in fds.file:
        by_path = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}
        for i, msg in enumerate(f.message_type):
            name = f"{f.package}.{msg.name}"
            out[name] = by_path.get((4, i), "")
            for j, fld in enumerate(msg.field):
                out[f"{name}.{fld.name}"] = by_path.get((4, i, 2, j), "")
    return out


def _ref(desc: Descriptor, suffix: str = "") -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{desc.name}{suffix}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _NULL]}


# -- requests ------------------------------------------------------------------------------------------------

_CONTENT_PARTS = {"type": "array", "items": _ref(chat_pb2.ContentPart.DESCRIPTOR)}
_REQUEST_UNIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("tokenwire.v1.ChatMessage", "content"): {"anyOf": [{"type": "string"}, _CONTENT_PARTS]},
    ("tokenwire.v1.Prediction", "content"): {"anyOf": [{"type": "string"}, _CONTENT_PARTS]},
    ("tokenwire.v1.ChatCompletionRequest", "stop"): {
        "anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]
    },
    ("tokenwire.v1.ChatCompletionRequest", "tool_choice"): {
        "anyOf": [
            {"type": "string", "enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "properties": {
                    "type": {"const": "function"},
                    "function": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                        "additionalProperties": False,
                    },
                },
                "required": ["type", "function"],
                "additionalProperties": False,
            },
        ]
    },
    ("tokenwire.v1.ChatCompletionRequest", "early_stopping"): {"anyOf": [{"type": "boolean"}, {"const": "never"}]},
}
_REQUIRED = {"tokenwire.v1.ChatCompletionRequest": ["messages"], "tokenwire.v1.ChatMessage": ["role"]}


def _request_field(fd: FieldDescriptor, seen: dict[str, Descriptor]) -> dict[str, Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value = fd.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _SCALARS[value.type]}
    if fd.type == _T.TYPE_STRING and (fd.name.endswith(_JSON_TEXT_SUFFIX) or fd.name in _JSON_OR_TEXT):
        item: dict[str, Any] = {"description": "any JSON value"}  # carried as JSON text in the proto
        if fd.name in _JSON_OR_TEXT:
            item = {"anyOf": [{"type": "object"}, {"type": "string"}]}
    elif fd.message_type is not None:
        seen[fd.message_type.full_name] = fd.message_type
        item = _ref(fd.message_type)
    else:
        item = dict(_SCALARS[fd.type])
    return {"type": "array", "items": item} if fd.is_repeated else item


def _constrain(desc: Descriptor, fd: FieldDescriptor, name: str, schema: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The service's simple rules for a field (bounds, enums, not-yet-supported), and a note for its description."""
    if desc is chat_pb2.ChatMessage.DESCRIPTOR and name == "role":
        return {"type": "string", "enum": list(ROLES)}, ""
    if desc is not chat_pb2.ChatCompletionRequest.DESCRIPTOR:
        return schema, ""
    if name == "messages":
        return {**schema, "minItems": 1}, ""
    if fd.name in LATER:  # only the neutral value passes until the feature lands
        note = f" Not supported yet (arrives with {LATER[fd.name]}): only its neutral value is accepted."
        return ({"const": NEUTRAL_JSON[name]} if name in NEUTRAL_JSON else {"not": {}}), note
    if name in BOUNDS:
        lo, hi, exclusive = BOUNDS[name]
        bounded = {**schema, ("exclusiveMinimum" if exclusive else "minimum"): lo}
        if hi != float("inf"):
            bounded["maximum"] = hi
        return bounded, ""
    return schema, ""


def _request_schema(desc: Descriptor, seen: dict[str, Descriptor]) -> dict[str, Any]:
    comments = _comments()
    props: dict[str, Any] = {}
    for name, fd in fields_of(desc).items():
        schema = _REQUEST_UNIONS.get((desc.full_name, name)) or _request_field(fd, seen)
        schema, note = _constrain(desc, fd, json_name(fd.name), schema)
        required = name in _REQUIRED.get(desc.full_name, ())  # null means "unset", so required ones are not nullable
        props[name] = {
            **(schema if required else _nullable(schema)),
            "description": comments.get(fd.full_name, "") + note,
        }
    if (desc.full_name, "content") in _REQUEST_UNIONS:  # the `content` oneof: a string or a list of text parts
        seen[chat_pb2.ContentPart.DESCRIPTOR.full_name] = chat_pb2.ContentPart.DESCRIPTOR
        union = _REQUEST_UNIONS[(desc.full_name, "content")]
        props["content"] = {**_nullable(union), "description": "Text, or a list of `text` content parts."}
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if desc.full_name in _REQUIRED:
        out["required"] = _REQUIRED[desc.full_name]
    if comments.get(desc.full_name):
        out["description"] = comments[desc.full_name]
    return out


# -- responses (as transcode.completion_json / chunk_json / models_json write them) -------------------------


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required}


_TOP = _obj(
    {
        "token": {"type": "string"},
        "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
    }
)
_TOKEN = _obj({**_TOP["properties"], "top_logprobs": {"type": "array", "items": _TOP}})
_LOGPROBS = {"anyOf": [_obj({"content": {"type": "array", "items": _TOKEN}}), _NULL]}
_USAGE = _obj({k: {"type": "integer", "minimum": 0} for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
_TOOL_CALL = _obj(
    {
        "id": {"type": "string"},
        "type": {"type": "string"},
        "function": _obj({"name": {"type": "string"}, "arguments": {"type": "string"}}),
    }
)
_HEAD = {
    "id": {"type": "string"},
    "object": {"type": "string"},
    "created": {"type": "integer"},
    "model": {"type": "string"},
    "system_fingerprint": {"type": "string"},
}
_COMPLETION = _obj(
    {
        **_HEAD,
        "choices": {
            "type": "array",
            "items": _obj(
                {
                    "index": {"type": "integer", "minimum": 0},
                    "message": _obj(
                        {
                            "role": {"type": "string"},
                            "content": {"type": ["string", "null"]},
                            "tool_calls": {"type": "array", "items": _TOOL_CALL},
                        },
                        ["role", "content"],
                    ),
                    "logprobs": _LOGPROBS,
                    "finish_reason": _FINISH,
                }
            ),
        },
        "usage": _USAGE,
        "prompt_logprobs": {"type": "array", "items": _TOP},
    },
    [*_HEAD, "choices", "usage"],
)
_CHUNK = _obj(
    {
        **_HEAD,
        "choices": {
            "type": "array",
            "items": _obj(
                {
                    "index": {"type": "integer", "minimum": 0},
                    "delta": _obj(
                        {
                            "role": {"type": "string"},
                            "content": {"type": "string"},
                            "tool_calls": {"type": "array", "items": {"type": "object"}},
                        },
                        [],
                    ),
                    "logprobs": _LOGPROBS,
                    "finish_reason": _FINISH,
                }
            ),
        },
        "usage": _USAGE,
    },
    [*_HEAD, "choices"],
)
_MODELS = _obj(
    {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": _obj(
                {
                    "id": {"type": "string"},
                    "object": {"const": "model"},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "max_context_length": {"type": "integer", "minimum": 0},
                }
            ),
        },
    }
)
_ERROR = _obj(
    {
        "error": _obj(
            {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            }
        )
    }
)
_VALIDATION = _obj(
    {
        "detail": {
            "type": "array",
            "items": _obj(
                {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                }
            ),
        },
        "error": _ERROR["properties"]["error"],
    }
)


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for code in codes:
        ref = "ValidationError" if code == 422 else "Error"
        out[str(code)] = {
            "description": {
                401: "missing or wrong API key",
                404: "unknown model",
                413: "body too large",
                422: "invalid request (every violation, each naming its field)",
                429: "overloaded",
                503: "unavailable",
                504: "timeout",
            }.get(code, "error"),
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
        }
    return out


@cache
def document(chat_paths: tuple[str, ...], version: str) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    seen: dict[str, Descriptor] = {}
    schemas: dict[str, Any] = {
        "ChatCompletionRequest": _request_schema(chat_pb2.ChatCompletionRequest.DESCRIPTOR, seen)
    }
    while len(schemas) < len(seen) + 1:
        for desc in list(seen.values()):
            if desc.name not in schemas:
                schemas[desc.name] = _request_schema(desc, seen)
    schemas.update(
        ChatCompletion=_COMPLETION,
        ChatCompletionChunk=_CHUNK,
        ModelList=_MODELS,
        Error=_ERROR,
        ValidationError=_VALIDATION,
    )
    chat_op = {
        "summary": "Create a chat completion",
        "description": "With `stream: true` the answer is `text/event-stream`: `data: {ChatCompletionChunk}` events, "
        "then `data: [DONE]`.",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        },
        "responses": {
            "200": {
                "description": "the completion (or its chunks as server-sent events)",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletion"}},
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            },
            **_errors(400, 401, 404, 413, 422, 429, 503, 504),
        },
        "security": [{"bearer": []}, {"apiKey": []}, {}],
    }
    paths: dict[str, Any] = {
        p: {"post": {**chat_op, "operationId": "createChatCompletion" + ("" if i == 0 else f"_{i}")}}
        for i, p in enumerate(chat_paths)
    }
    paths["/v1/models"] = {
        "get": {
            "operationId": "listModels",
            "summary": "List the served models",
            "security": [{"bearer": []}, {"apiKey": []}, {}],
            "responses": {
                "200": {
                    "description": "the models",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ModelList"}}},
                },
                **_errors(401, 503),
            },
        }
    }
    paths["/health"] = {
        "get": {
            "operationId": "health",
            "summary": "Whether the service behind is SERVING",
            "responses": {"200": {"description": "serving"}, "503": {"description": "not serving"}},
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "text exposition format"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokenwire",
            "version": version,
            "description": "OpenAI-compatible chat completions with the hosted providers' extended fields.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }


_ = models_pb2  # the model list schema mirrors models.proto's Model (as models_json writes it)
