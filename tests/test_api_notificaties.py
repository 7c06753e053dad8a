"""``POST /notificaties``: validation, storage with deliveries, and routing by filters."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from tests.apiharness import SUBSCRIBER_AUTH


def message(**overrides):
    body = {
        "kanaal": "zaken",
        "hoofdObject": "https://zaken.example.nl/api/v1/zaken/1",
        "resource": "zaak",
        "resourceUrl": "https://zaken.example.nl/api/v1/zaken/1",
        "actie": "create",
        "aanmaakdatum": "2024-05-01T10:00:00+02:00",
        "kenmerken": {"bronorganisatie": "123456789", "zaaktype": "https://zt.example.nl/1"},
    }
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not None}


@pytest.fixture
def zaken(api):
    response = api.post("/api/v1/kanaal", client="publisher", json={
        "naam": "zaken", "filters": ["bronorganisatie", "zaaktype"]})
    assert response.status_code == 201


def subscribe(api, subscriber, groups, tag="s"):
    response = api.post("/api/v1/abonnement", client="consumer", json={
        "callbackUrl": subscriber.callback("good", tag), "auth": SUBSCRIBER_AUTH,
        "kanalen": groups,
    })
    assert response.status_code == 201, response.text
    return response.json()


def deliveries(db):
    return db.execute(
        "SELECT a.uuid::text, d.state FROM delivery d JOIN abonnement a ON a.id = d.abonnement_id"
        " ORDER BY d.id"
    ).fetchall()


def publish(api, body, client="publisher"):
    return api.post("/api/v1/notificaties", json=body, client=client)


def test_publish_answers_201_with_the_message(api, zaken):
    body = message()

    response = publish(api, body)

    assert response.status_code == 201, response.text
    assert response.json() == body
    assert response.headers["Location"].startswith("urn:uuid:")


def test_published_message_is_stored_exactly_as_sent(api, zaken, db):
    raw = '{"kanaal":"zaken", "hoofdObject":"https://h.nl/1","resource":"zaak",' \
          '"resourceUrl":"https://h.nl/1","actie":"create",' \
          '"aanmaakdatum":"2024-05-01T10:00:00+02:00","kenmerken":{"zaaktype":"z"}}'

    response = api.post("/api/v1/notificaties", data=raw.encode(), client="publisher",
                        headers={"Content-Type": "application/json"})

    assert response.status_code == 201
    stored = db.execute("SELECT message::text, uuid::text FROM notification").fetchone()
    assert stored[0] == raw
    assert response.headers["Location"] == f"urn:uuid:{stored[1]}"


def test_publish_with_unknown_kanaal_is_rejected(api, zaken, db):
    response = publish(api, message(kanaal="onbekend"))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "kanaal"
    assert db.execute("SELECT count(*) FROM notification").fetchone()[0] == 0


def test_publish_without_kenmerken_is_accepted(api, zaken):
    response = publish(api, message(kenmerken=None))

    assert response.status_code == 201, response.text


def test_publish_with_kenmerken_neither_subset_nor_superset_is_rejected(api, zaken):
    response = publish(api, message(kenmerken={"bronorganisatie": "1", "other": "x"}))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["code"] == "kenmerken_inconsistent"


@pytest.mark.parametrize("field", [
    "kanaal", "hoofdObject", "resource", "resourceUrl", "actie", "aanmaakdatum"])
def test_publish_without_required_field_names_it(api, zaken, field):
    response = publish(api, message(**{field: None}))

    assert response.status_code == 400
    assert response.json()["invalidParams"] == [
        {"name": field, "code": "required", "reason": "this field is required"}]


def test_publish_with_aanmaakdatum_in_the_future_is_rejected(api, zaken):
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()

    response = publish(api, message(aanmaakdatum=future))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "aanmaakdatum"


def test_publish_with_aanmaakdatum_slightly_ahead_is_accepted(api, zaken):
    ahead = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()

    assert publish(api, message(aanmaakdatum=ahead)).status_code == 201


def test_publish_with_malformed_aanmaakdatum_is_rejected(api, zaken):
    response = publish(api, message(aanmaakdatum="gisteren"))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "aanmaakdatum"


def test_publish_with_non_string_kenmerk_is_rejected(api, zaken):
    response = publish(api, message(kenmerken={"zaaktype": 5}))

    assert response.status_code == 400
    assert response.json()["invalidParams"][0]["name"] == "kenmerken.zaaktype"


def test_publish_with_empty_body_names_each_missing_field_once(api, zaken):
    response = publish(api, {})

    names = [param["name"] for param in response.json()["invalidParams"]]
    assert sorted(names) == sorted(
        ["kanaal", "hoofdObject", "resource", "resourceUrl", "actie", "aanmaakdatum"])


def test_publish_with_empty_body_names_each_missing_field_once_in_detail(api, zaken):
    response = publish(api, {})

    assert response.json()["detail"].count("aanmaakdatum:") == 1


def test_publish_with_thousands_of_invalid_kenmerken_lists_the_first_50_and_a_count(
        api, zaken):
    # 3,000 fit in the 64 KB body limit of the tests.
    kenmerken = {f"k{number}": number for number in range(3_000)}

    params = publish(api, message(kenmerken=kenmerken)).json()["invalidParams"]

    assert len(params) == 51
    assert params[-1]["code"] == "too_many_errors"
    assert "2950 more" in params[-1]["reason"]


def test_publish_with_thousands_of_unknown_kenmerken_answers_a_small_body(api, zaken):
    kenmerken = {f"k{number}": "x" for number in range(3_000)}

    response = publish(api, message(kenmerken=kenmerken))

    assert response.status_code == 400
    assert len(response.content) < 2_000


def test_notification_fans_out_one_delivery_per_matching_abonnement(api, zaken, subscriber, db):
    matching = subscribe(api, subscriber, [{"naam": "zaken",
                                            "filters": {"bronorganisatie": "123456789"}}])
    subscribe(api, subscriber, [{"naam": "zaken", "filters": {"bronorganisatie": "999"}}])

    publish(api, message())

    assert deliveries(db) == [(matching["url"].rsplit("/", 1)[1], "scheduled")]


def test_several_matching_filter_groups_give_one_delivery(api, zaken, subscriber, db):
    subscribe(api, subscriber, [
        {"naam": "zaken", "filters": {"bronorganisatie": "123456789"}},
        {"naam": "zaken", "filters": {"zaaktype": "*"}},
        {"naam": "zaken"},
    ])

    publish(api, message())

    assert len(deliveries(db)) == 1


@pytest.mark.parametrize("filters,kenmerken,delivered", [
    ({}, {"bronorganisatie": "1"}, True),
    ({"bronorganisatie": "*"}, {"bronorganisatie": "1"}, True),
    ({"bronorganisatie": "1"}, {"bronorganisatie": "1"}, True),
    ({"bronorganisatie": "1"}, {"bronorganisatie": "2"}, False),
    ({"bronorganisatie": "1"}, {"zaaktype": "z"}, True),
    ({"bronorganisatie": "1", "zaaktype": "z"}, {"bronorganisatie": "1", "zaaktype": "y"},
     False),
], ids=["no-filter", "wildcard", "equal", "different", "kenmerk-absent", "one-of-two-differs"])
def test_filter_semantics(api, zaken, subscriber, db, filters, kenmerken, delivered):
    subscribe(api, subscriber, [{"naam": "zaken", "filters": filters}])

    publish(api, message(kenmerken=kenmerken))

    assert len(deliveries(db)) == (1 if delivered else 0)


def test_abonnement_on_another_kanaal_gets_nothing(api, zaken, subscriber, db):
    api.post("/api/v1/kanaal", json={"naam": "documenten"}, client="publisher")
    subscribe(api, subscriber, [{"naam": "documenten"}])

    publish(api, message())

    assert deliveries(db) == []


def test_casing_trap_snake_case_filter_does_not_match_other_camel_case_value(
        api, subscriber, db):
    api.post("/api/v1/kanaal", json={"naam": "objecten", "filters": ["object_type"]},
             client="publisher")
    subscribe(api, subscriber, [{"naam": "objecten", "filters": {"object_type": "A"}}])

    publish(api, message(kanaal="objecten", kenmerken={"objectType": "B"}))

    assert deliveries(db) == []


def test_casing_trap_snake_case_filter_matches_same_camel_case_value(api, subscriber, db):
    api.post("/api/v1/kanaal", json={"naam": "objecten", "filters": ["object_type"]},
             client="publisher")
    subscribe(api, subscriber, [{"naam": "objecten", "filters": {"object_type": "A"}}])

    publish(api, message(kanaal="objecten", kenmerken={"objectType": "A"}))

    assert len(deliveries(db)) == 1


def test_deleted_abonnement_gets_no_more_deliveries(api, zaken, subscriber, db):
    created = subscribe(api, subscriber, [{"naam": "zaken"}])
    api.delete(created["url"], client="consumer")

    publish(api, message())

    assert deliveries(db) == []


def test_notification_received_is_logged_with_ids_and_no_token(api, zaken, api_server):
    response = publish(api, message())

    stored = response.headers["Location"].removeprefix("urn:uuid:")
    events = api_server.wait_for_events(event="notification_received", notification=stored)
    assert events and events[0]["kanaal"] == "zaken" and events[0]["client_id"] == "publisher"
    assert "Bearer" not in api_server.log_text()
    assert SUBSCRIBER_AUTH not in api_server.log_text()


def test_publish_response_is_the_body_byte_for_byte(api, zaken):
    raw = json.dumps(message(), indent=2).encode()

    response = api.post("/api/v1/notificaties", data=raw, client="publisher",
                        headers={"Content-Type": "application/json"})

    assert response.content == raw


def received_count(api, kanaal):
    text = api.get("/metrics").text
    prefix = f'koerier_notifications_received_total{{kanaal="{kanaal}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].removeprefix(prefix)) if lines else 0.0


def test_publish_counts_the_notification_per_kanaal_in_metrics(api, zaken):
    before = received_count(api, "zaken")

    assert publish(api, message()).status_code == 201
    assert publish(api, message(kanaal="onbekend")).status_code == 400

    assert received_count(api, "zaken") == before + 1
    assert received_count(api, "onbekend") == 0
