"""The API side of the ``koerier`` command: clients, tokens, checks, and serve."""

from __future__ import annotations

import re

import pytest
import requests

from koerier import sealing
from tests.apiharness import ApiServer
from tests.harness import free_port
from tests.harness import run_koerier as koerier


def field(output, name):
    match = re.search(rf"^{name}:\s+(\S+)$", output, re.MULTILINE)
    assert match, output
    return match.group(1)


@pytest.mark.parametrize("command", [
    [], ["serve"], ["client"], ["client", "add"], ["client", "list"], ["client", "remove"],
    ["token"], ["check"]])
def test_every_command_has_help(command):
    result = koerier({}, *command, "--help")

    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_client_add_without_secret_generates_a_strong_one(base_env, clean_db):
    result = koerier(base_env, "client", "add", "zrc", "--scope", "notificaties.publiceren")

    assert result.returncode == 0, result.stderr
    secret = field(result.stdout, "secret")
    assert len(secret) >= 40
    stored = clean_db.execute("SELECT secret FROM api_client WHERE client_id = 'zrc'")
    assert sealing.unseal(stored.fetchone()[0]) == secret


def test_client_add_with_secret_and_all_scopes(base_env, clean_db):
    result = koerier(base_env, "client", "add", "admin", "--secret", "s3cret", "--all")

    assert result.returncode == 0, result.stderr
    assert field(result.stdout, "secret") == "s3cret"
    assert clean_db.execute("SELECT all_scopes FROM api_client").fetchone()[0] is True


def test_client_add_with_a_short_secret_warns_but_creates_it(base_env, clean_db):
    result = koerier(base_env, "client", "add", "zrc", "--secret", "short", "--all")

    assert result.returncode == 0, result.stderr
    assert "5 characters" in result.stderr
    assert clean_db.execute("SELECT count(*) FROM api_client").fetchone()[0] == 1


def test_client_add_with_all_and_a_scope_is_refused(base_env, clean_db):
    result = koerier(base_env, "client", "add", "zrc", "--all",
                     "--scope", "notificaties.publiceren")

    assert result.returncode == 2
    assert "not both" in result.stderr
    assert clean_db.execute("SELECT count(*) FROM api_client").fetchone()[0] == 0


def test_client_add_of_existing_client_is_refused(base_env, clean_db):
    koerier(base_env, "client", "add", "zrc", "--secret", "first", "--all")

    result = koerier(base_env, "client", "add", "zrc", "--secret", "second", "--all")

    assert result.returncode == 1
    assert "--replace" in result.stderr


def test_client_add_of_existing_client_keeps_its_secret(base_env, clean_db):
    koerier(base_env, "client", "add", "zrc", "--secret", "first", "--all")

    koerier(base_env, "client", "add", "zrc", "--secret", "second", "--all")

    stored = clean_db.execute("SELECT secret FROM api_client WHERE client_id = 'zrc'")
    assert sealing.unseal(stored.fetchone()[0]) == "first"


def test_client_add_with_replace_overwrites_secret_and_scopes(base_env, clean_db):
    koerier(base_env, "client", "add", "zrc", "--secret", "first", "--all")

    result = koerier(base_env, "client", "add", "zrc", "--secret", "second", "--replace",
                     "--scope", "notificaties.consumeren")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("updated client")
    stored = clean_db.execute(
        "SELECT secret, scopes, all_scopes FROM api_client WHERE client_id = 'zrc'").fetchone()
    assert (sealing.unseal(stored[0]), stored[1], stored[2]) == (
        "second", ["notificaties.consumeren"], False)


def test_client_add_without_scope_is_refused(base_env, clean_db):
    result = koerier(base_env, "client", "add", "zrc")

    assert result.returncode == 2
    assert "--scope" in result.stderr


def test_client_add_with_unknown_scope_is_refused(base_env, clean_db):
    result = koerier(base_env, "client", "add", "zrc", "--scope", "zaken.lezen")

    assert result.returncode == 2


def test_client_list_shows_scopes_but_never_secrets(base_env, clean_db):
    koerier(base_env, "client", "add", "zrc", "--secret", "hidden-secret",
            "--scope", "notificaties.publiceren")

    result = koerier(base_env, "client", "list")

    assert "zrc\tnotificaties.publiceren" in result.stdout
    assert "hidden-secret" not in result.stdout


def test_client_remove_deletes_the_client(base_env, clean_db):
    koerier(base_env, "client", "add", "zrc", "--all")

    result = koerier(base_env, "client", "remove", "zrc")

    assert result.returncode == 0
    assert clean_db.execute("SELECT count(*) FROM api_client").fetchone()[0] == 0


def test_client_remove_of_unknown_client_fails(base_env, clean_db):
    assert koerier(base_env, "client", "remove", "nobody").returncode == 1


def test_token_is_accepted_by_the_api(base_env, clean_db, api_server):
    koerier(base_env, "client", "add", "cli-client", "--scope", "notificaties.consumeren")

    result = koerier(base_env, "token", "cli-client")

    assert result.returncode == 0, result.stderr
    response = requests.get(f"{api_server.url}/api/v1/kanaal", timeout=10,
                            headers={"Authorization": f"Bearer {result.stdout.strip()}"})
    assert response.status_code == 200


def test_token_for_unknown_client_fails_with_a_hint(base_env, clean_db):
    result = koerier(base_env, "token", "nobody")

    assert result.returncode == 1
    assert "koerier client add" in result.stderr


def test_check_passes_with_database_and_broker_up(base_env):
    result = koerier(base_env, "check")

    assert result.returncode == 0, result.stderr
    assert "ok: database" in result.stdout
    assert "ok: broker" in result.stdout


@pytest.mark.parametrize("broken,line", [
    ({"KOERIER_DB_PORT": "1"}, "FAIL: database"),
    ({"KOERIER_BROKER_PORT": "1"}, "FAIL: broker"),
    ({"KOERIER_BROKER_PASSWORD": "wrong"}, "FAIL: broker"),
])
def test_check_fails_with_one_line_per_failure(base_env, broken, line):
    result = koerier(base_env | broken, "check")

    assert result.returncode == 1
    assert line in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_bad_configuration(base_env):
    result = koerier(base_env | {"KOERIER_DB_PORT": "not-a-port"}, "check")

    assert result.returncode == 2
    assert "KOERIER_DB_PORT" in result.stderr


def test_serve_with_two_processes_answers(base_env, tmp_path):
    server = ApiServer(base_env, tmp_path / "koerier.log", processes=2)
    server.start()
    try:
        response = requests.get(f"{server.url}/healthz", timeout=10)
    finally:
        server.stop()

    assert response.status_code == 200
    assert response.headers["API-version"] == "1.0.1"


def test_serve_on_a_taken_port_says_why(base_env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]

        result = koerier(base_env, "serve", "--port", str(port))

    assert result.returncode == 1
    assert "cannot listen" in result.stderr
