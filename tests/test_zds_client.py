"""The real ``gemma-zds-client`` (PyPI) drives Koerier as Open Zaak-era publishers do."""

from __future__ import annotations

from zds_client import Client, ClientAuth

from tests.apiharness import SUBSCRIBER_AUTH, secret_of


def zds(api_server, client_id):
    return Client(
        api_root=f"{api_server.url}/api/v1/",
        oas_location="schema/openapi.yaml?v=3",
        auth=ClientAuth(client_id=client_id, secret=secret_of(client_id)),
    )


def test_zds_client_creates_kanaal_subscribes_and_publishes(api, api_server, subscriber, db):
    publisher = zds(api_server, "publisher")
    consumer = zds(api_server, "consumer")

    kanaal = publisher.create("kanaal", {"naam": "zaken", "filters": ["bronorganisatie"]})
    abonnement = consumer.create("abonnement", {
        "callbackUrl": subscriber.callback("good", "zds"),
        "auth": SUBSCRIBER_AUTH,
        "kanalen": [{"naam": "zaken", "filters": {"bronorganisatie": "123456789"}}],
    })
    published = publisher.create("notificaties", {
        "kanaal": "zaken",
        "hoofdObject": "https://zaken.example.nl/api/v1/zaken/1",
        "resource": "zaak",
        "resourceUrl": "https://zaken.example.nl/api/v1/zaken/1",
        "actie": "create",
        "aanmaakdatum": "2024-05-01T10:00:00Z",
        "kenmerken": {"bronorganisatie": "123456789"},
    })

    assert kanaal["naam"] == "zaken"
    assert abonnement["url"].startswith(f"{api_server.url}/api/v1/abonnement/")
    assert published["kanaal"] == "zaken"
    assert db.execute("SELECT count(*) FROM delivery").fetchone()[0] == 1


def test_zds_client_lists_and_reads_kanalen(api, api_server):
    publisher = zds(api_server, "publisher")
    created = publisher.create("kanaal", {"naam": "documenten"})

    listed = publisher.list("kanaal", query_params={"naam": "documenten"})
    read = publisher.retrieve("kanaal", url=created["url"])

    assert [item["naam"] for item in listed] == ["documenten"]
    assert read == created
