"""Schemathesis over the app's own OpenAPI schema, against a real server: no 5xx, responses match the schema."""

from __future__ import annotations

import httpx
import hypothesis
import pytest
import schemathesis
from http_fixtures import make_settings, thread_server, upload
from schemathesis import checks

from server.app import create_app
from server.settings import Settings

CONFIG = schemathesis.Config.from_dict({
    "generation": {"max-examples": 8, "deterministic": True},
    "phases": {"coverage": {"enabled": True}},  # boundary values of every field, deterministic
})
schema = schemathesis.openapi.from_dict(create_app(Settings.model_construct()).openapi(), config=CONFIG)
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tiny_adapter_dirs, tmp_path_factory):
    settings = make_settings(tiny_model_dir, tmp_path_factory.mktemp("store-schema"), max_model_len=64,
                             vllm_lora_dir=next(iter(tiny_adapter_dirs.values())).parent)
    with thread_server(settings) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert upload(c, tiny_adapter_dirs["a0"], "a0").status_code == 201
        yield srv


@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
def test_api_conforms_to_its_schema(case, server):
    case.call_and_validate(base_url=server.url, checks=CHECKS)
