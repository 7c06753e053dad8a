"""Authentication and authorisation: ZGW JWTs, scopes, and the client cache."""

from __future__ import annotations

import time
import uuid

import jwt
import jwt.warnings
import pytest

from tests.apiharness import bearer, secret_of
from tests.conftest import CLIENT_CACHE_SECONDS


def token(claims=None, client_id="admin", secret=None, algorithm="HS256", **header):
    payload = {"iss": client_id, "iat": int(time.time()), "client_id": client_id}
    payload.update(claims or {})
    payload = {key: value for key, value in payload.items() if value is not None}
    return jwt.encode(payload, secret or secret_of(client_id), algorithm=algorithm,
                      headers=header or None)


def get_kanalen(api, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    return api.get("/api/v1/kanaal", client=None, headers=headers)


def assert_forbidden(response, code="not_authenticated"):
    assert response.status_code == 403, response.text
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == code


def test_request_without_token_is_403(api):
    assert_forbidden(get_kanalen(api, None))


def test_request_with_basic_auth_is_403(api):
    assert_forbidden(get_kanalen(api, "Basic YWRtaW46YWRtaW4="))


def test_request_with_garbage_token_is_403(api):
    assert_forbidden(get_kanalen(api, "Bearer not.a.jwt"))


def test_unsigned_token_with_alg_none_is_403(api):
    unsigned = jwt.encode({"client_id": "admin", "iat": int(time.time())}, None,
                          algorithm="none")

    assert_forbidden(get_kanalen(api, f"Bearer {unsigned}"))


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_token_signed_with_another_algorithm_is_403(api):
    assert_forbidden(get_kanalen(api, f"Bearer {token(algorithm='HS512')}"))


def test_token_signed_with_the_wrong_secret_is_403(api):
    assert_forbidden(get_kanalen(api, f"Bearer {token(secret='wrong-secret-' * 3)}"))


def test_token_of_unknown_client_is_403(api):
    assert_forbidden(get_kanalen(api, f"Bearer {token(client_id='stranger')}"))


def test_token_without_client_id_is_403(api):
    assert_forbidden(get_kanalen(api, f"Bearer {token({'client_id': None})}"))


def test_token_with_a_numeric_client_id_is_403_saying_it_must_be_a_string(api):
    response = get_kanalen(api, f"Bearer {token({'client_id': 5})}")

    assert_forbidden(response)
    assert "must be a non-empty string" in response.json()["detail"]


def test_token_without_iat_is_403(api):
    assert_forbidden(get_kanalen(api, f"Bearer {token({'iat': None})}"))


def test_token_issued_more_than_an_hour_ago_is_403(api):
    old = int(time.time()) - 3600 - 301

    assert_forbidden(get_kanalen(api, f"Bearer {token({'iat': old})}"))


def test_token_issued_within_the_hour_is_accepted(api):
    recent = int(time.time()) - 3000

    assert get_kanalen(api, f"Bearer {token({'iat': recent})}").status_code == 200


def test_token_with_iat_in_the_future_is_accepted(api):
    # VNG's own Postman collections sign with iat = now + 257 s.
    ahead = int(time.time()) + 257

    assert get_kanalen(api, f"Bearer {token({'iat': ahead})}").status_code == 200


def test_removed_client_stops_working_within_seconds(api, clean_db):
    # A client of its own: the server's cache remembers the removal for a moment, and the
    # shared test clients must not be affected by that.
    clean_db.execute("INSERT INTO api_client (client_id, secret, all_scopes)"
                     " VALUES ('ephemeral', %s, true)", (secret_of("ephemeral"),))
    headers = bearer("ephemeral")
    assert api.get("/api/v1/kanaal", client=None, headers=headers).status_code == 200

    clean_db.execute("DELETE FROM api_client WHERE client_id = 'ephemeral'")
    time.sleep(CLIENT_CACHE_SECONDS + 0.5)

    assert_forbidden(api.get("/api/v1/kanaal", client=None, headers=headers))


SOME_UUID = str(uuid.uuid4())

# (method, path, body) and which clients may call it.
OPERATIONS = {
    "kanaal_list": ("GET", "/api/v1/kanaal", None, {"publisher", "consumer", "admin"}),
    "kanaal_create": ("POST", "/api/v1/kanaal", {}, {"publisher", "admin"}),
    "kanaal_read": ("GET", f"/api/v1/kanaal/{SOME_UUID}", None,
                    {"publisher", "consumer", "admin"}),
    "kanaal_update": ("PUT", f"/api/v1/kanaal/{SOME_UUID}", {}, {"publisher", "admin"}),
    "abonnement_list": ("GET", "/api/v1/abonnement", None,
                        {"publisher", "consumer", "admin"}),
    "abonnement_create": ("POST", "/api/v1/abonnement", {}, {"consumer", "admin"}),
    "abonnement_read": ("GET", f"/api/v1/abonnement/{SOME_UUID}", None,
                        {"publisher", "consumer", "admin"}),
    "abonnement_update": ("PATCH", f"/api/v1/abonnement/{SOME_UUID}", {},
                          {"consumer", "admin"}),
    "abonnement_delete": ("DELETE", f"/api/v1/abonnement/{SOME_UUID}", None,
                          {"consumer", "admin"}),
    "notificaties_create": ("POST", "/api/v1/notificaties", {}, {"publisher", "admin"}),
}


@pytest.mark.parametrize("client", ["publisher", "consumer", "admin", "no-scopes"])
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_scope_matrix(api, operation, client):
    method, path, body, allowed = OPERATIONS[operation]

    response = api.request(method, path, json=body, client=client)

    if client in allowed:
        assert response.status_code != 403, response.text
    else:
        assert_forbidden(response, "permission_denied")
