"""Errors the service raises at its edge, and their gRPC form.

    ServiceError                  a request that cannot be served; carries a gRPC status code
    ├── InvalidRequest            INVALID_ARGUMENT + google.rpc.BadRequest field violations (HTTP 422)
    ├── ContextLengthExceeded     INVALID_ARGUMENT without field violations (HTTP 400), names both numbers
    ├── ModelNotFound             NOT_FOUND (HTTP 404)
    ├── Overloaded                RESOURCE_EXHAUSTED + google.rpc.RetryInfo (HTTP 429 + Retry-After)
    ├── DeadlineExceeded          DEADLINE_EXCEEDED (HTTP 504): inference_timeout or the call's deadline
    └── ServiceUnavailable        UNAVAILABLE (HTTP 503): model still loading, or shutting down

Field paths use dots and [i] indices (`messages[2].content`), which the gateway turns into FastAPI-style
`loc` lists (`["body", "messages", 2, "content"]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: where, what is wrong, and a machine-readable reason."""

    field: str
    description: str
    reason: str = "value_error"


class ServiceError(Exception):
    """A request that cannot be served."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """google.rpc detail messages attached to the status."""
        return []

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status sent to the client."""
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())


class InvalidRequest(ServiceError):
    """One or more invalid fields."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        assert violations, "an InvalidRequest needs at least one violation"
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=v.reason)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad)
        return [packed]


class ContextLengthExceeded(ServiceError):
    """Prompt + max tokens do not fit the model's context."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason="CONTEXT_LENGTH_EXCEEDED", domain="tokenwire", metadata={"param": self.param}
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class ModelNotFound(ServiceError):
    """The requested model is not served here."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    """The waiting queue is full: retry after `retry_after` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromMilliseconds(int(self.retry_after * 1000))
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class DeadlineExceeded(ServiceError):
    """The request ran past its deadline; its rows were freed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServiceUnavailable(ServiceError):
    """The service cannot take requests now."""

    code = grpc.StatusCode.UNAVAILABLE


assert grpc.StatusCode.INVALID_ARGUMENT.value[0] == code_pb2.INVALID_ARGUMENT
