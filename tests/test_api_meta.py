"""The served spec and the health endpoints."""

from __future__ import annotations

import pytest
import yaml

from tests.harness import OFFICIAL_SPEC, SHIPPED_SPEC


@pytest.mark.skipif(not OFFICIAL_SPEC.exists(), reason="no official spec beside the checkout")
def test_shipped_spec_is_the_official_1_0_1_file_byte_for_byte():
    assert SHIPPED_SPEC.read_bytes() == OFFICIAL_SPEC.read_bytes()


@pytest.mark.parametrize("path", [
    "/api/v1/openapi.yaml", "/api/v1/schema/openapi.yaml?v=3", "/api/v1/"])
def test_spec_is_served_without_a_token(api, path):
    response = api.get(path, client=None)

    assert response.status_code == 200
    assert response.text == SHIPPED_SPEC.read_text()
    assert yaml.safe_load(response.text)["info"]["version"] == "1.0.1"


def test_healthz_answers(api):
    response = api.get("/healthz", client=None)

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_answers_when_database_and_broker_are_up(api):
    response = api.get("/readyz", client=None)

    assert response.status_code == 200, response.text


def test_access_log_has_one_line_per_request_at_the_level_of_its_status(api, api_server):
    api.get("/api/v1/kanaal/not-a-uuid", params={}, headers={"X-Test": "access-log"})

    lines = api_server.wait_for_events(event="request", path="/api/v1/kanaal/not-a-uuid")
    assert lines[-1]["status"] == 404
    assert lines[-1]["level"] == "warning"
    assert lines[-1]["client_id"] == "admin"
