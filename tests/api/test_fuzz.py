"""Property-based fuzzing of the whole OpenAPI surface (schemathesis) against the real app on PostgreSQL.

Every operation of `/openapi.json` gets generated requests, each sent with a valid key and without one: no
answer may be a server error, every answer must be documented and match its schema (the error envelope
included), and the service must still be ready afterwards. Bounded: a few examples per operation.
"""

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import make_project_key

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 20


def operations(url: str) -> list:
    return [result.ok() for result in schemathesis.openapi.from_url(url + "/openapi.json").get_all_operations()]


def fuzz(operation, key: str) -> None:
    """Generated requests to one operation, each sent with the key and without one."""

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=CHECKS, timeout=30)
        anonymous = case.call_and_validate(headers={"Authorization": ""}, checks=CHECKS, timeout=30)
        if case.path.startswith("/v1/"):
            assert anonymous.status_code == 401, anonymous.text

    run()


def test_every_operation_answers_as_documented_with_and_without_a_key(stack, settings):
    found = operations(stack.url)
    assert len(found) >= 17, [op.label for op in found]
    for operation in found:
        # A key of its own per operation: the fuzzing stays under the per-key rate limit.
        fuzz(operation, make_project_key(settings).key)


def test_the_service_is_still_ready_after_the_fuzzing(stack, project_key):
    ready = httpx.get(stack.url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    files = httpx.get(stack.v1 + "/files", headers={"Authorization": f"Bearer {project_key.key}"}, timeout=10)
    assert files.status_code == 200 and files.json()["object"] == "list"
