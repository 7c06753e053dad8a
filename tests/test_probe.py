"""The subscription probe: a callback must take a test notification with its auth and
refuse one without; every way it can fail is a 400 that says what happened."""

from __future__ import annotations

import json
import time

import pytest

from tests.apiharness import SUBSCRIBER_AUTH, Api, ApiServer, insert_clients
from tests.conftest import PROBE_TIMEOUT_SECONDS
from tests.harness import free_port


@pytest.fixture
def zaken(api):
    api.post("/api/v1/kanaal", json={"naam": "zaken"}, client="publisher")


def subscribe(api, callback_url, auth=SUBSCRIBER_AUTH):
    return api.post("/api/v1/abonnement", client="consumer", json={
        "callbackUrl": callback_url, "auth": auth, "kanalen": [{"naam": "zaken"}]})


def assert_probe_failure(response, code, name="callbackUrl"):
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    param = response.json()["invalidParams"][0]
    assert param["name"] == name
    assert param["code"] == code
    return param["reason"]


def test_probe_sends_a_test_notification_with_and_without_auth(api, zaken, subscriber):
    url = subscriber.callback("good", "both")

    assert subscribe(api, url).status_code == 201

    received = subscriber.requests_to("/good/both")
    assert [item.authorization for item in received] == [SUBSCRIBER_AUTH, None]
    assert json.loads(received[0].body)["kanaal"] == "test"


def test_callback_that_accepts_anyone_is_rejected(api, zaken, subscriber):
    reason = assert_probe_failure(subscribe(api, subscriber.callback("open")),
                                  "probe_accepts_anyone")

    assert "200" in reason


def test_callback_that_answers_500_is_rejected(api, zaken, subscriber):
    reason = assert_probe_failure(subscribe(api, subscriber.callback("error")), "probe_rejected")

    assert "500" in reason


def test_callback_that_rejects_the_auth_is_rejected(api, zaken, subscriber):
    response = subscribe(api, subscriber.callback("good"), auth="Bearer wrong")

    assert "403" in assert_probe_failure(response, "probe_rejected")


def test_callback_on_a_refused_port_is_rejected(api, zaken):
    response = subscribe(api, f"http://127.0.0.1:{free_port()}/callback")

    assert "cannot connect" in assert_probe_failure(response, "probe_unreachable")


def test_callback_with_unresolvable_host_is_rejected(api, zaken):
    response = subscribe(api, "http://no-such-host.invalid/callback")

    assert_probe_failure(response, "probe_unreachable")


def test_slow_callback_is_rejected_after_the_timeout(api, zaken, subscriber):
    started = time.monotonic()

    response = subscribe(api, subscriber.callback("slow"))

    assert_probe_failure(response, "probe_timeout")
    assert time.monotonic() - started < PROBE_TIMEOUT_SECONDS + 2


def test_redirecting_callback_is_rejected_and_not_followed(api, zaken, subscriber):
    before = len(subscriber.requests_to("/good"))

    reason = assert_probe_failure(subscribe(api, subscriber.callback("redirect")),
                                  "probe_redirected")

    assert "302" in reason
    assert len(subscriber.requests_to("/good")) == before


def test_callback_with_tls_error_is_rejected(api, zaken, subscriber):
    # A plain HTTP server spoken to over TLS fails the handshake.
    response = subscribe(api, f"https://127.0.0.1:{subscriber.port}/good")

    assert_probe_failure(response, "probe_tls_error")


def test_failed_probe_stores_nothing(api, zaken, subscriber, db):
    subscribe(api, subscriber.callback("error"))

    assert db.execute("SELECT count(*) FROM abonnement").fetchone()[0] == 0


def test_patch_of_callback_probes_with_the_stored_auth(api, zaken, subscriber):
    created = subscribe(api, subscriber.callback("good", "before")).json()

    response = api.patch(created["url"], json={"callbackUrl": subscriber.callback("good", "after")},
                         client="consumer")

    assert response.status_code == 200, response.text
    received = subscriber.requests_to("/good/after")
    assert [item.authorization for item in received] == [SUBSCRIBER_AUTH, None]


def test_patch_to_a_failing_callback_is_rejected_and_keeps_the_old(api, zaken, subscriber):
    created = subscribe(api, subscriber.callback("good")).json()

    response = api.patch(created["url"], json={"callbackUrl": subscriber.callback("open")},
                         client="consumer")

    assert_probe_failure(response, "probe_accepts_anyone")
    assert api.get(created["url"]).json()["callbackUrl"] == created["callbackUrl"]


def test_patch_of_auth_only_that_the_callback_rejects_names_auth(api, zaken, subscriber):
    created = subscribe(api, subscriber.callback("good")).json()

    response = api.patch(created["url"], json={"auth": "Token wrong"}, client="consumer")

    assert_probe_failure(response, "probe_rejected", name="auth")


def test_patch_of_kanalen_only_does_not_probe(api, zaken, subscriber):
    created = subscribe(api, subscriber.callback("good", "kanalen-only")).json()
    before = len(subscriber.requests_to("/good/kanalen-only"))

    api.patch(created["url"], json={"kanalen": [{"naam": "zaken"}]}, client="consumer")

    assert len(subscriber.requests_to("/good/kanalen-only")) == before


@pytest.fixture
def probe_server(base_env, tmp_path):
    servers = []

    def start(**env):
        server = ApiServer(base_env | env, tmp_path / f"koerier-{len(servers)}.log")
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def test_probe_can_be_switched_off(probe_server, clean_db, subscriber):
    insert_clients(clean_db)
    api = Api(probe_server(KOERIER_PROBE_ENABLED="false").url)
    api.post("/api/v1/kanaal", json={"naam": "zaken"}, client="publisher")

    assert subscribe(api, subscriber.callback("open", "unprobed")).status_code == 201
    assert subscriber.requests_to("/open/unprobed") == []


def test_unauthenticated_probe_only_goes_to_allowed_hosts(probe_server, clean_db, subscriber):
    insert_clients(clean_db)
    api = Api(probe_server(KOERIER_PROBE_UNAUTHENTICATED_HOSTS="callbacks.example.nl").url)
    api.post("/api/v1/kanaal", json={"naam": "zaken"}, client="publisher")

    assert subscribe(api, subscriber.callback("good", "allow-list")).status_code == 201
    received = subscriber.requests_to("/good/allow-list")
    assert [item.authorization for item in received] == [SUBSCRIBER_AUTH]
