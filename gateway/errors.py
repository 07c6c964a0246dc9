"""HTTP error bodies, and the mapping from gRPC status to HTTP.

Validation failures (the gateway's own, or the service's INVALID_ARGUMENT with google.rpc.BadRequest) are 422
with both FastAPI's `detail` list and OpenAI's `error` object in one body. Other failures are
`{"error": {message, type, param, code}}` with the canonical status:

    INVALID_ARGUMENT 422 (field violations) / 400   UNAUTHENTICATED 401   PERMISSION_DENIED 403
    NOT_FOUND 404   ALREADY_EXISTS/ABORTED 409   RESOURCE_EXHAUSTED 429 (+ Retry-After)   CANCELLED 499
    UNIMPLEMENTED 501   UNAVAILABLE 503   DEADLINE_EXCEEDED 504 (+ x-should-retry: false)   others 500
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

Loc = tuple[str | int, ...]

_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    501: "not_implemented",
    503: "service_unavailable",
    504: "timeout",
}
_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def field_to_loc(field: str) -> Loc:
    """`messages[2].content` -> ("body", "messages", 2, "content")."""
    loc: list[str | int] = ["body"]
    for name, index in _PATH_TOKEN.findall(field):
        loc.append(int(index) if index else name)
    return tuple(loc)


def _param(loc: Loc) -> str:
    parts = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def validation_body(violations: list[tuple[Loc, str, str]]) -> dict[str, Any]:
    """The 422 body: FastAPI's `detail` and OpenAI's `error`, naming the (first) field."""
    detail = [{"loc": list(loc), "msg": msg, "type": kind} for loc, msg, kind in violations]
    first_loc, _, first_kind = violations[0]
    param = _param(first_loc)
    message = "; ".join(f"{_param(loc) or 'body'}: {msg}" for loc, msg, _ in violations)
    return {
        "detail": detail,
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param or None,
            "code": first_kind,
        },
    }


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}


def from_rpc_error(err: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, body, extra headers) for a failed gRPC call."""
    code = err.code()
    message = err.details() or code.name
    status = _HTTP.get(code, 500)
    headers: dict[str, str] = {}
    param: str | None = None
    error_code: str | None = code.name.lower()
    rich: status_pb2.Status | None = None
    try:
        rich = rpc_status.from_call(err)
    except ValueError:
        rich = None
    if rich is not None:
        for detail in rich.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = [
                    (field_to_loc(v.field), v.description, v.reason or "value_error") for v in bad.field_violations
                ]
                if violations:
                    return 422, validation_body(violations), headers
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                headers["Retry-After"] = str(max(1, round(retry.retry_delay.ToMilliseconds() / 1000)))
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                param = info.metadata.get("param") or None
                error_code = info.reason.lower() or error_code
    if status == 429:
        headers.setdefault("Retry-After", "1")
    if status == 504:
        headers["x-should-retry"] = "false"
    return status, error_body(status, message, param, error_code), headers
