"""Property-based fuzzing of the HTTP edge from its own OpenAPI document (schemathesis, bounded examples).

Every generated request, valid or not, must get a documented status (never a 5xx) and a body that matches the
documented schema for that status. Its positive-data check is off: the document states the simple rules (types,
bounds, enums, required fields), but not the cross-field ones (`top_logprobs` needs `logprobs`, a prompt plus
`max_tokens` must fit the context, `logit_bias` ids must exist), so a schema-valid request may rightly get a 4xx.
(schemathesis's pytest plugin does not load under pytest 9, so the cases are
drawn with its hypothesis strategies directly.)
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import Servers

OPERATIONS = ["POST /v1/chat/completions", "POST /v4/beta/chat/completions", "GET /v1/models", "GET /health"]


@pytest.fixture(scope="module")
def api_schema(servers: Servers) -> Any:
    return schemathesis.openapi.from_url(f"{servers.http_url}/openapi.json")


@pytest.mark.parametrize("label", OPERATIONS)
def test_api_conforms_to_its_document(api_schema: Any, label: str) -> None:
    ops = {op.ok().label: op.ok() for op in api_schema.get_all_operations()}
    operation = ops[label]
    seen: list[int] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def run(case: Any) -> None:
        response = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
        seen.append(response.status_code)

    run()
    assert seen and all(status < 500 for status in seen)
    # derandomized: the same cases every run. Chat bodies mostly break some cross-field rule (422); the 200
    # path's conformance is checked with real completions in test_gateway.test_responses_match_the_document.
    assert (422 if label.startswith("POST") else 200) in seen
