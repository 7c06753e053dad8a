"""``/kanaal``: register, list, read and update kanalen."""

from __future__ import annotations

import uuid

import pytest

KANAAL = {
    "naam": "zaken",
    "documentatieLink": "https://example.com/zaken",
    "filters": ["bronorganisatie", "zaaktype", "vertrouwelijkheidaanduiding"],
}


def create(api, body=None, client="publisher"):
    response = api.post("/api/v1/kanaal", json=body or KANAAL, client=client)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_kanaal_returns_it_with_url_and_location(api, api_server):
    response = api.post("/api/v1/kanaal", json=KANAAL, client="publisher")

    assert response.status_code == 201
    body = response.json()
    assert body["naam"] == "zaken"
    assert body["filters"] == KANAAL["filters"]
    assert body["documentatieLink"] == KANAAL["documentatieLink"]
    assert body["url"].startswith(f"{api_server.url}/api/v1/kanaal/")
    assert response.headers["Location"] == body["url"]
    assert response.headers["API-version"] == "1.0.1"


def test_create_kanaal_with_only_naam_has_empty_filters_and_no_link(api):
    body = create(api, {"naam": "minimal"})

    assert body["filters"] == []
    assert "documentatieLink" not in body


def test_create_kanaal_with_existing_naam_is_rejected_as_unique(api):
    create(api)

    response = api.post("/api/v1/kanaal", json=KANAAL, client="publisher")

    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["invalidParams"] == [
        {"name": "naam", "code": "unique", "reason": "a kanaal named 'zaken' exists"}
    ]


def test_create_kanaal_with_naam_over_50_characters_is_rejected(api):
    response = api.post("/api/v1/kanaal", json={"naam": "x" * 51}, client="publisher")

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "naam"
    assert response.json()["invalidParams"][0]["code"] == "max_length"


def test_create_kanaal_without_naam_names_the_field(api):
    response = api.post("/api/v1/kanaal", json={"filters": []}, client="publisher")

    assert response.status_code == 400
    assert response.json()["invalidParams"] == [
        {"name": "naam", "code": "required", "reason": "this field is required"}
    ]


@pytest.mark.parametrize("names", [["a", "a"], ["a", "A"], ["object_type", "objectType"]])
def test_create_kanaal_with_filters_equal_in_canonical_form_is_rejected(api, names):
    response = api.post("/api/v1/kanaal", json={"naam": "zaken", "filters": names},
                        client="publisher")

    assert response.status_code == 400, response.text
    assert response.json()["invalidParams"][0]["name"] == "filters"


def test_patch_kanaal_with_filters_equal_in_canonical_form_is_rejected(api):
    created = create(api)

    response = api.patch(created["url"], json={"filters": ["a_", "a"]}, client="publisher")

    assert response.status_code == 400, response.text
    assert response.json()["invalidParams"][0]["name"] == "filters"


def test_list_kanalen_is_a_plain_array(api):
    create(api)
    create(api, {"naam": "documenten"})

    response = api.get("/api/v1/kanaal", client="consumer")

    assert response.status_code == 200
    assert [item["naam"] for item in response.json()] == ["zaken", "documenten"]


def test_list_kanalen_filtered_by_naam(api):
    create(api)
    create(api, {"naam": "documenten"})

    response = api.get("/api/v1/kanaal", params={"naam": "documenten"}, client="consumer")

    assert [item["naam"] for item in response.json()] == ["documenten"]


def test_read_kanaal_by_its_url(api):
    created = create(api)

    response = api.get(created["url"], client="consumer")

    assert response.status_code == 200
    assert response.json() == created


def test_read_unknown_kanaal_is_404(api):
    response = api.get(f"/api/v1/kanaal/{uuid.uuid4()}")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_put_kanaal_replaces_filters_and_documentation(api):
    created = create(api)

    response = api.put(created["url"], json={"naam": "zaken", "filters": ["a"]},
                       client="publisher")

    assert response.status_code == 200, response.text
    assert response.json()["filters"] == ["a"]
    assert "documentatieLink" not in response.json()


def test_patch_kanaal_changes_only_what_it_names(api):
    created = create(api)

    response = api.patch(created["url"], json={"filters": ["a", "b"]}, client="publisher")

    assert response.status_code == 200, response.text
    assert response.json()["filters"] == ["a", "b"]
    assert response.json()["documentatieLink"] == KANAAL["documentatieLink"]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_changing_the_naam_of_a_kanaal_is_rejected(api, method):
    created = create(api)

    response = api.request(method, created["url"], json={"naam": "other"}, client="publisher")

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "naam"
    assert response.json()["invalidParams"][0]["code"] == "immutable"


def test_delete_kanaal_is_not_allowed(api):
    created = create(api)

    response = api.delete(created["url"], client="publisher")

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET, PUT, PATCH"


def test_kanaal_url_honours_forwarded_headers_from_a_trusted_proxy(api):
    response = api.post(
        "/api/v1/kanaal", json=KANAAL, client="publisher",
        headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "nrc.example.nl"},
    )

    assert response.json()["url"].startswith("https://nrc.example.nl/api/v1/kanaal/")
