"""Stored credentials are sealed with the secret key, and the key can be rotated."""

from __future__ import annotations

from pathlib import Path

import pytest

from koerier import sealing
from tests.apiharness import SUBSCRIBER_AUTH
from tests.test_migrations import run_koerier


def test_sealed_value_opens_with_the_same_key_and_hides_the_text():
    sealer = sealing.Sealer("key-one")

    stored = sealer.seal("Bearer abc")

    assert stored.startswith(sealing.PREFIX)
    assert "abc" not in stored
    assert sealer.unseal(stored) == "Bearer abc"


def test_sealed_value_opens_with_the_old_key_listed_as_previous():
    stored = sealing.Sealer("key-one").seal("Bearer abc")

    assert sealing.Sealer("key-two", ("key-one",)).unseal(stored) == "Bearer abc"


def test_sealed_value_with_a_changed_key_is_an_unseal_error():
    stored = sealing.Sealer("key-one").seal("Bearer abc")

    with pytest.raises(sealing.UnsealError):
        sealing.Sealer("key-two").unseal(stored)


def test_value_stored_without_a_key_is_read_as_given():
    assert sealing.Sealer("").seal("Bearer abc") == "Bearer abc"
    assert sealing.Sealer("key-one").unseal("Bearer abc") == "Bearer abc"


def test_client_secret_is_sealed_in_the_database_and_tokens_still_verify(base_env, clean_db):
    added = run_koerier(base_env, "client", "add", "sealed", "--secret", "s3cret-value", "--all")
    token = run_koerier(base_env, "token", "sealed")

    assert added.returncode == 0, added.stderr
    stored = clean_db.execute("SELECT secret FROM api_client WHERE client_id = 'sealed'")
    value = stored.fetchone()[0]
    assert value.startswith(sealing.PREFIX)
    assert "s3cret-value" not in value
    assert token.returncode == 0 and token.stdout.count(".") == 2


def test_abonnement_auth_is_sealed_in_the_database(api, subscriber):
    api.post("/api/v1/kanaal", client="publisher", json={"naam": "zaken"})

    response = api.post("/api/v1/abonnement", client="consumer", json={
        "callbackUrl": subscriber.callback("good", "sealed"), "auth": SUBSCRIBER_AUTH,
        "kanalen": [{"naam": "zaken"}]})

    assert response.status_code == 201, response.text
    stored = api_db_auth(api, response.json()["url"].rsplit("/", 1)[1])
    assert stored.startswith(sealing.PREFIX)
    assert SUBSCRIBER_AUTH not in stored


def api_db_auth(api, abonnement_uuid):
    import psycopg

    from koerier.config import load_settings

    with psycopg.connect(load_settings().database_conninfo) as conn:
        row = conn.execute("SELECT auth FROM abonnement WHERE uuid = %s", (abonnement_uuid,))
        return row.fetchone()[0]


def test_check_names_credentials_that_no_key_opens(base_env, clean_db):
    added = run_koerier(
        base_env, "client", "add", "rotated", "--secret", "s3cret-value", "--all")
    assert added.returncode == 0, added.stderr
    changed = base_env | {"KOERIER_SECRET_KEY": "another-key"}
    rotated = changed | {"KOERIER_SECRET_KEY_PREVIOUS": base_env["KOERIER_SECRET_KEY"]}

    broken = run_koerier(changed, "check")
    fixed = run_koerier(rotated, "check")

    assert broken.returncode == 1
    assert "FAIL: credentials" in broken.stderr and "client rotated" in broken.stderr
    assert "ok: credentials" in fixed.stdout


def test_api_doc_says_client_secrets_are_sealed_with_the_secret_key():
    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    authentication = text.split("## Authentication")[1].split("\n## ")[0]

    assert "sealed" in authentication
    assert "KOERIER_SECRET_KEY" in authentication
