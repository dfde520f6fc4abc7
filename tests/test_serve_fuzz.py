"""Schema-driven fuzz of the server's own OpenAPI document (schemathesis) on the fake engine.

Every operation in ``/openapi.json`` gets generated requests, valid and invalid (plus other HTTP
methods); none may answer 5xx, a request that breaks the schema must be refused, every error must
come back in OpenAI's shape, and the server must still answer afterwards (~600 requests).
Remote media fetching is off (generated URLs must not leave this machine) and replies are short,
so the whole run stays well under a minute on two cores.
"""

from __future__ import annotations

import os

import pytest
from serve_fake import FakeEngine, LiveServer

from omnistream.serve.app import create_app
from omnistream.serve.config import ServeConfig

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")
from schemathesis.checks import negative_data_rejection, not_a_server_error  # noqa: E402

# generated requests per operation and phase; OMNISTREAM_FUZZ_EXAMPLES=1000 for a deeper run
EXAMPLES = int(os.environ.get("OMNISTREAM_FUZZ_EXAMPLES", "60"))
CASES: list[tuple[str, str, int]] = []  # (method, path, status) of every request sent
FALSE_ALARMS: list = []  # bodies labelled negative that satisfy the schema (see _check)


@pytest.fixture(scope="module")
def fuzz_server():
    with LiveServer(create_app(FakeEngine(), _cfg())) as s:
        yield s


def _cfg() -> ServeConfig:
    return ServeConfig(allow_remote_media=False, default_max_tokens=16,
                       max_body_bytes=2**20, max_concurrent=64, max_audio_s=5, max_video_s=5)


# the document the server serves at /openapi.json (test_openapi_served checks they are equal)
DOC = create_app(FakeEngine(), _cfg()).openapi()
schema = schemathesis.openapi.from_dict(DOC)


def _body_is_valid(case) -> bool:
    """The request body satisfies the schema (JSON Schema 2020-12, as OpenAPI 3.1 says)."""
    import jsonschema_rs

    body_schema = DOC["paths"][case.path][case.method.lower()]["requestBody"]["content"][
        "application/json"]["schema"]
    return jsonschema_rs.validator_for({**body_schema, "components": DOC["components"]}
                                       ).is_valid(case.body)


def _check(case, response) -> None:
    """schemathesis' checks, less a known false alarm: a case generated as negative that
    shrinking turned valid (the label stays) is no schema-violating request."""
    from schemathesis.core.failures import AcceptedNegativeData, FailureGroup

    try:
        case.validate_response(response, checks=[not_a_server_error, negative_data_rejection])
    except FailureGroup as e:
        if not (all(isinstance(x, AcceptedNegativeData) for x in e.exceptions)
                and _body_is_valid(case)):
            raise
        FALSE_ALARMS.append(case.body)


def _assert_openai_error_shape(response) -> None:
    """4xx/5xx bodies are ``{"error": {"message", "type", "param", "code"}}``."""
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["message"], body


def test_openapi_served(fuzz_server):
    import httpx

    assert httpx.get(fuzz_server.url + "/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_fuzz_openapi(case, fuzz_server):
    """No 5xx; requests that break the schema are refused (4xx); errors in OpenAI's shape."""
    r = case.call(base_url=fuzz_server.url, timeout=30)
    CASES.append((case.method, case.path, r.status_code))
    _check(case, r)
    _assert_openai_error_shape(r)


def test_server_answers_after_fuzz(fuzz_server):
    import httpx

    r = httpx.post(fuzz_server.url + "/v1/chat/completions", timeout=30,
                   json={"model": "m", "messages": [{"role": "user", "content": "still there"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from Chelsie. You said: still " \
                                                            "there"
    assert httpx.get(fuzz_server.url + "/health", timeout=10).json()["active"] == 0
    if CASES:  # the fuzz ran in this session: it reached every operation
        paths = {p for _, p, _ in CASES}
        assert {"/v1/chat/completions", "/v1/models", "/health"} <= paths, paths
        from collections import Counter

        print(f"\nfuzz: {len(CASES)} requests ({len(FALSE_ALARMS)} valid bodies labelled "
              "negative):", dict(Counter(CASES)))
