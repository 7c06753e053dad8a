"""``/abonnement``: subscribe callbacks to kanalen; auth write-only, owner-only changes."""

from __future__ import annotations

import uuid

import pytest

from tests.apiharness import SUBSCRIBER_AUTH


@pytest.fixture
def kanalen(api):
    for body in ({"naam": "zaken", "filters": ["bronorganisatie", "zaaktype"]},
                 {"naam": "documenten", "filters": []}):
        assert api.post("/api/v1/kanaal", json=body, client="publisher").status_code == 201


def abonnement(subscriber, tag="", **overrides):
    body = {
        "callbackUrl": subscriber.callback("good", tag),
        "auth": SUBSCRIBER_AUTH,
        "kanalen": [{"naam": "zaken", "filters": {"bronorganisatie": "123456789"}}],
    }
    return body | overrides


def create(api, subscriber, client="consumer", **overrides):
    response = api.post("/api/v1/abonnement", json=abonnement(subscriber, **overrides),
                        client=client)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_abonnement_returns_it_without_auth(api, kanalen, subscriber):
    response = api.post("/api/v1/abonnement", json=abonnement(subscriber), client="consumer")

    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"url", "callbackUrl", "kanalen"}
    assert body["kanalen"] == [{"naam": "zaken", "filters": {"bronorganisatie": "123456789"}}]
    assert response.headers["Location"] == body["url"]


@pytest.mark.parametrize("view", ["list", "detail"])
def test_auth_of_an_abonnement_is_never_returned(api, kanalen, subscriber, view):
    created = create(api, subscriber)

    response = api.get("/api/v1/abonnement" if view == "list" else created["url"])

    assert SUBSCRIBER_AUTH not in response.text
    assert "auth" not in (response.json()[0] if view == "list" else response.json())


def test_create_abonnement_without_filters_subscribes_to_everything(api, kanalen, subscriber):
    body = create(api, subscriber, kanalen=[{"naam": "zaken"}])

    assert body["kanalen"] == [{"naam": "zaken", "filters": {}}]


def test_create_abonnement_for_unknown_kanaal_is_rejected(api, kanalen, subscriber):
    response = api.post("/api/v1/abonnement", client="consumer",
                        json=abonnement(subscriber, kanalen=[{"naam": "nope"}]))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "kanalen.0.naam"


def test_create_abonnement_with_inconsistent_filters_is_rejected(api, kanalen, subscriber):
    groups = [{"naam": "zaken", "filters": {"bronorganisatie": "1", "onbekend": "x"}}]

    response = api.post("/api/v1/abonnement", client="consumer",
                        json=abonnement(subscriber, kanalen=groups))

    assert response.status_code == 400
    param = response.json()["invalidParams"][0]
    assert param["name"] == "kanalen.0.filters"
    assert param["code"] == "inconsistent-abonnement-filters"


def test_filters_in_camel_case_fit_a_kanaal_declared_in_snake_case(api, subscriber):
    api.post("/api/v1/kanaal", json={"naam": "objecten", "filters": ["object_type"]},
             client="publisher")

    response = api.post("/api/v1/abonnement", client="consumer", json=abonnement(
        subscriber, kanalen=[{"naam": "objecten", "filters": {"objectType": "A"}}]))

    assert response.status_code == 201, response.text


def test_duplicate_callback_urls_are_allowed(api, kanalen, subscriber):
    first = create(api, subscriber)
    second = create(api, subscriber)

    assert first["callbackUrl"] == second["callbackUrl"]
    assert first["url"] != second["url"]


@pytest.mark.parametrize("field", ["callbackUrl", "auth", "kanalen"])
def test_create_abonnement_without_required_field_names_it(api, kanalen, subscriber, field):
    body = abonnement(subscriber)
    del body[field]

    response = api.post("/api/v1/abonnement", json=body, client="consumer")

    assert response.status_code == 400
    assert {"name": field, "code": "required", "reason": "this field is required"} in (
        response.json()["invalidParams"])


def test_callback_url_longer_than_200_is_accepted_as_in_1_0_1(api, kanalen, subscriber):
    body = create(api, subscriber, tag="x" * 300)

    assert len(body["callbackUrl"]) > 300


@pytest.mark.parametrize("field,value", [
    ("callbackUrl", "http://127.0.0.1/" + "x" * 2000),
    ("auth", "Bearer " + "x" * 8000),
])
def test_values_past_the_sane_upper_bound_are_rejected(api, kanalen, subscriber, field, value):
    response = api.post("/api/v1/abonnement", json=abonnement(subscriber, **{field: value}),
                        client="consumer")

    assert response.status_code == 400
    assert response.json()["invalidParams"] == [
        {"name": field, "code": "max_length", "reason": response.json()["invalidParams"][0][
            "reason"]}
    ]


def test_callback_url_that_is_not_http_is_rejected(api, kanalen, subscriber):
    response = api.post("/api/v1/abonnement", client="consumer",
                        json=abonnement(subscriber, callbackUrl="ftp://example.com/x"))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "callbackUrl"


def test_patch_changes_only_what_it_names_and_keeps_kanalen(api, kanalen, subscriber):
    created = create(api, subscriber)

    response = api.patch(created["url"], json={"callbackUrl": subscriber.callback("good", "b")},
                         client="consumer")

    assert response.status_code == 200, response.text
    assert response.json()["callbackUrl"].endswith("/good/b")
    assert response.json()["kanalen"] == created["kanalen"]


def test_put_replaces_the_kanalen(api, kanalen, subscriber):
    created = create(api, subscriber)

    response = api.put(created["url"], client="consumer",
                       json=abonnement(subscriber, kanalen=[{"naam": "documenten"}]))

    assert response.status_code == 200, response.text
    assert response.json()["kanalen"] == [{"naam": "documenten", "filters": {}}]


def test_delete_abonnement_by_its_owner(api, kanalen, subscriber):
    created = create(api, subscriber)

    response = api.delete(created["url"], client="consumer")

    assert response.status_code == 204
    assert api.get(created["url"]).status_code == 404


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_other_client_may_not_change_an_abonnement(api, kanalen, subscriber, method):
    created = create(api, subscriber)

    response = api.request(method, created["url"], json=abonnement(subscriber),
                           client="other-consumer")

    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"


def test_other_client_may_read_an_abonnement(api, kanalen, subscriber):
    created = create(api, subscriber)

    response = api.get(created["url"], client="other-consumer")

    assert response.status_code == 200


def test_patch_of_unknown_abonnement_is_404(api, kanalen, subscriber):
    response = api.patch(f"/api/v1/abonnement/{uuid.uuid4()}", json={}, client="consumer")

    assert response.status_code == 404


def test_changing_kanalen_to_an_unknown_kanaal_is_rejected(api, kanalen, subscriber):
    created = create(api, subscriber)

    response = api.patch(created["url"], json={"kanalen": [{"naam": "nope"}]},
                         client="consumer")

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "kanalen.0.naam"
