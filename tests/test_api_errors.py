"""Every error class is answered with the standard's problem+json, and no input is a 500."""

from __future__ import annotations

import time
import uuid

import jsonschema
import pytest
import yaml

from tests.apiharness import Api, ApiServer, insert_clients
from tests.conftest import koerier_env
from tests.harness import SHIPPED_SPEC, PostgresServer, free_port

SPEC = yaml.safe_load(SHIPPED_SPEC.read_text())


def problem_schema(name):
    return {**SPEC["components"]["schemas"][name], "components": SPEC["components"]}


def assert_problem(response, status, code=None):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.headers["API-version"] == "1.0.1"
    body = response.json()
    schema = "ValidatieFout" if status == 400 else "Fout"
    jsonschema.validate(body, problem_schema(schema))
    assert body["status"] == status
    assert body["instance"].startswith("urn:uuid:")
    if code is not None:
        assert body["code"] == code
    return body


JSON = {"Content-Type": "application/json"}


def test_malformed_json_is_400_parse_error(api):
    response = api.post("/api/v1/kanaal", data=b'{"naam": ', headers=JSON)

    body = assert_problem(response, 400)
    assert body["invalidParams"][0]["code"] == "parse_error"


def test_invalid_utf8_is_400_parse_error(api):
    response = api.post("/api/v1/kanaal", data=b'{"naam": "\xff\xfe"}', headers=JSON)

    body = assert_problem(response, 400)
    assert "UTF-8" in body["invalidParams"][0]["reason"]


def test_invalid_utf8_in_a_query_argument_names_the_argument(api):
    response = api.get("/api/v1/kanaal?naam=%ff")

    body = assert_problem(response, 400)
    assert body["invalidParams"] == [
        {"name": "naam", "code": "invalid", "reason": "is not valid UTF-8"}]


def test_invalid_utf8_in_the_path_is_a_problem_not_a_server_error(api):
    response = api.get("/api/v1/kanaal/%ff")

    assert_problem(response, 400)


def test_nul_character_is_400(api):
    response = api.post("/api/v1/kanaal", data=b'{"naam": "a\\u0000b"}', headers=JSON)

    assert_problem(response, 400)


@pytest.mark.parametrize("body", [b"[]", b'"zaken"', b"42", b"null"])
def test_body_that_is_not_an_object_is_400(api, body):
    response = api.post("/api/v1/kanaal", data=body, headers=JSON)

    assert_problem(response, 400)


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1"])
def test_wrong_content_type_is_415(api, content_type):
    response = api.post("/api/v1/kanaal", data=b'{"naam": "x"}',
                        headers={"Content-Type": content_type})

    assert_problem(response, 415, "unsupported_media_type")


def test_missing_content_type_is_415(api):
    response = api.post("/api/v1/kanaal", data=b'{"naam": "x"}',
                        headers={"Content-Type": ""})

    assert_problem(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "application/json;q=0"])
def test_unacceptable_accept_is_406(api, accept):
    response = api.get("/api/v1/kanaal", headers={"Accept": accept})

    assert_problem(response, 406, "not_acceptable")


@pytest.mark.parametrize("accept", ["application/json", "*/*", "text/html, application/*"])
def test_acceptable_accept_is_answered(api, accept):
    assert api.get("/api/v1/kanaal", headers={"Accept": accept}).status_code == 200


@pytest.mark.parametrize("path", ["/api/v1/kanaal", "/api/v1/abonnement"])
def test_unknown_query_parameter_is_400(api, path):
    response = api.get(path, params={"page": "2"})

    body = assert_problem(response, 400)
    assert body["invalidParams"][0]["name"] == "page"


def test_body_over_the_limit_is_413(api):
    response = api.post("/api/v1/kanaal", data=b'{"naam": "' + b"x" * 70_000 + b'"}',
                        headers=JSON)

    assert_problem(response, 413, "request_too_large")


@pytest.mark.parametrize("path", [
    "/api/v1/kanaal/not-a-uuid", f"/api/v1/kanaal/{uuid.uuid4()}",
    "/api/v1/abonnement/123", f"/api/v1/abonnement/{uuid.uuid4()}",
])
def test_malformed_or_unknown_uuid_is_404(api, path):
    assert_problem(api.get(path), 404, "not_found")


@pytest.mark.parametrize("path", ["/api/v1/kanaal/", "/api/v1/nothing", "/", "/api/v2/kanaal"])
def test_unknown_path_is_404_without_redirect(api, path):
    response = api.get(path, allow_redirects=False)

    assert_problem(response, 404, "not_found")


@pytest.mark.parametrize("method,path,allowed", [
    ("DELETE", "/api/v1/kanaal", "GET, POST"),
    ("GET", "/api/v1/notificaties", "POST"),
    ("PUT", "/api/v1/abonnement", "GET, POST"),
])
def test_method_not_allowed_is_405_with_allow(api, method, path, allowed):
    response = api.request(method, path)

    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == allowed


def test_validation_error_lists_every_field(api):
    response = api.post("/api/v1/notificaties", json={"kanaal": 5, "resource": ""})

    body = assert_problem(response, 400, "invalid")
    names = {param["name"] for param in body["invalidParams"]}
    assert names == {"kanaal", "resource", "hoofdObject", "resourceUrl", "actie",
                     "aanmaakdatum"}


@pytest.fixture
def server_with_its_own_database(tmp_path, base_env):
    pg = PostgresServer()
    pg.start()
    # The session's broker stays up; only this server's database goes down.
    env = base_env | koerier_env(pg) | {"KOERIER_DB_CONNECT_TIMEOUT_SECONDS": "1"}
    from koerier import migrations
    from koerier.config import Settings

    migrations.upgrade(Settings(**{key.removeprefix("KOERIER_").lower(): value
                                   for key, value in env.items()
                                   if key.startswith("KOERIER_DB_")},
                                environment="development", _env_file=None))
    import psycopg

    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        insert_clients(conn)
    server = ApiServer(env, tmp_path / "koerier.log")
    server.start()
    yield pg, server
    server.stop()
    pg.destroy()


def test_database_down_is_503_quickly(server_with_its_own_database):
    pg, server = server_with_its_own_database
    api = Api(server.url)
    assert api.get("/api/v1/kanaal", client="publisher").status_code == 200
    pg.stop()

    started = time.monotonic()
    response = api.post("/api/v1/kanaal", json={"naam": "x"}, client="publisher")
    elapsed = time.monotonic() - started

    assert_problem(response, 503, "service_unavailable")
    assert elapsed < 5
    assert "Traceback" not in response.text


def wait_until_ready(api, timeout=15.0):
    # The broker publisher connects in the background after the server starts listening.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.get("/readyz", client=None).status_code == 200:
            return True
        time.sleep(0.2)
    return False


def test_readyz_reports_database_down(server_with_its_own_database):
    pg, server = server_with_its_own_database
    api = Api(server.url)
    assert wait_until_ready(api)
    pg.stop()

    response = api.get("/readyz", client=None)

    body = assert_problem(response, 503, "service_unavailable")
    assert "database" in body["detail"]


@pytest.fixture
def server_without_broker(tmp_path, base_env):
    # Nothing listens on this port: the publisher never connects.
    env = base_env | {"KOERIER_BROKER_PORT": str(free_port())}
    server = ApiServer(env, tmp_path / "koerier.log")
    server.start()
    yield server
    server.stop()


def test_readyz_with_broker_down_answers_200(server_without_broker):
    response = Api(server_without_broker.url).get("/readyz", client=None)

    assert response.status_code == 200, response.text


def test_readyz_with_broker_down_reports_the_broker_unavailable(server_without_broker):
    response = Api(server_without_broker.url).get("/readyz", client=None)

    assert response.json()["broker"] == "unavailable"
    assert response.json()["database"] == "ok"


def test_database_back_after_restart_is_served_again(server_with_its_own_database):
    pg, server = server_with_its_own_database
    api = Api(server.url)
    pg.restart()

    response = api.get("/api/v1/kanaal", client="publisher")

    assert response.status_code == 200, response.text
