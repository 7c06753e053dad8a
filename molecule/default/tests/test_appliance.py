"""The whole appliance on one host: packages, services, sockets, secrets, sandboxing,
TLS, and a notification published through nginx reaching a subscriber."""

from __future__ import annotations

import http.client
import os
import ssl

import pytest
from appliance_checks import assert_unit_active, publish_and_receive, request

DOMAIN = "koerier.gemeente.test"
HTTP_PORT = int(os.environ.get("KOERIER_TEST_HTTP_PORT", "18080"))
HTTPS_PORT = int(os.environ.get("KOERIER_TEST_HTTPS_PORT", "18443"))
API_UNITS = ["koerier-api-1", "koerier-api-2"]
WORKER_UNITS = ["koerier-worker-1", "koerier-worker-2"]


@pytest.fixture(scope="module")
def tls(host) -> ssl.SSLContext:
    """A client context trusting only pebble's root: the served chain must verify."""
    root = host.check_output(
        "python3 -c \"import ssl, urllib.request; print(urllib.request.urlopen("
        "'https://127.0.0.1:15000/roots/0', context=ssl._create_unverified_context())"
        ".read().decode())\""
    )
    context = ssl.create_default_context(cadata=root)
    return context


@pytest.mark.parametrize("package", ["postgresql-15", "rabbitmq-server", "nginx", "certbot"])
def test_package_is_installed(host, package):
    assert host.package(package).is_installed


@pytest.mark.parametrize(
    "unit",
    ["postgresql@15-main", "rabbitmq-server", "nginx", "certbot.timer",
     "koerier-cleanup.timer", "koerier.target", *API_UNITS, *WORKER_UNITS],
)
def test_unit_is_enabled_and_active(host, unit):
    assert_unit_active(host, unit)
    assert host.service(unit).is_enabled, f"{unit} is not enabled"


def _listeners(host, port):
    out = host.check_output(f"ss -Hltn 'sport = :{port}'")
    return [line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()]


@pytest.mark.parametrize("port", [80, 443])
def test_public_port_listens_on_all_addresses(host, port):
    assert "0.0.0.0" in _listeners(host, port)


@pytest.mark.parametrize("port", [9001, 9002, 5432, 5672, 4369, 25672])
def test_internal_port_listens_on_loopback_only(host, port):
    addresses = _listeners(host, port)
    assert addresses, f"nothing listens on {port}"
    assert set(addresses) <= {"127.0.0.1", "::1"}, addresses


@pytest.mark.parametrize(
    ("path", "owner", "mode"),
    [
        ("/etc/koerier/koerier.env", "koerier", 0o600),
        ("/etc/koerier", "root", 0o750),
        ("/etc/ssl/koerier/selfsigned/privkey.pem", "root", 0o600),
        (f"/etc/letsencrypt/live/{DOMAIN}/privkey.pem", "root", 0o600),
    ],
)
def test_secret_file_is_private(host, path, owner, mode):
    target = host.file(path)
    if target.is_symlink:
        target = host.file(target.linked_to)
    assert target.user == owner
    assert target.mode == mode, oct(target.mode)


def test_env_file_holds_the_production_settings(host):
    content = host.file("/etc/koerier/koerier.env").content_string
    assert "KOERIER_ENVIRONMENT=production" in content
    assert f"KOERIER_PUBLIC_URL=https://{DOMAIN}" in content


@pytest.mark.parametrize("unit", [*API_UNITS, *WORKER_UNITS])
@pytest.mark.parametrize(
    ("setting", "expected"),
    [("User", "koerier"), ("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
     ("PrivateTmp", "yes"), ("ProtectHome", "yes"), ("Restart", "on-failure"),
     ("CapabilityBoundingSet", "")],
)
def test_unit_is_sandboxed(host, unit, setting, expected):
    value = host.check_output(f"systemctl show -P {setting} {unit}.service").strip()
    assert value == expected


@pytest.mark.parametrize(
    "unit",
    [*(f"{unit}.service" for unit in API_UNITS + WORKER_UNITS), "koerier.target",
     "koerier-cleanup.service", "koerier-cleanup.timer"],
)
def test_unit_file_is_valid(host, unit):
    result = host.run(f"systemd-analyze verify /etc/systemd/system/{unit}")
    assert result.rc == 0, result.stderr


def test_cli_reaches_database_and_broker(host):
    result = host.run("koerier check")
    assert result.rc == 0, result.stdout + result.stderr


def test_rabbitmq_has_no_guest_and_has_the_vhost(host):
    assert "guest" not in host.check_output("rabbitmqctl -q list_users").split()
    assert "koerier" in host.check_output("rabbitmqctl -q list_vhosts").split()


def test_http_redirects_to_https():
    connection = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=10)
    connection.request("GET", "/api/v1/kanaal", headers={"Host": DOMAIN})
    response = connection.getresponse()
    assert response.status == 301
    assert response.getheader("Location") == f"https://{DOMAIN}/api/v1/kanaal"


def test_acme_challenge_path_is_not_redirected():
    connection = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=10)
    connection.request("GET", "/.well-known/acme-challenge/missing", headers={"Host": DOMAIN})
    assert connection.getresponse().status == 404


def test_certificate_comes_from_the_acme_server(tls):
    status, headers, _ = request(DOMAIN, HTTPS_PORT, tls, "GET", "/healthz")
    assert status == 200
    assert headers["Strict-Transport-Security"].startswith("max-age=63072000")


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_tls_version_is_offered(tls, version):
    tls_version = getattr(ssl.TLSVersion, version)
    context = ssl.create_default_context()
    context.load_verify_locations(cadata=tls.get_ca_certs(binary_form=True)[0])
    context.minimum_version = context.maximum_version = tls_version
    status, _, _ = request(DOMAIN, HTTPS_PORT, context, "GET", "/healthz")
    assert status == 200


def test_tls_1_1_is_refused(host):
    result = host.run(
        f"echo | openssl s_client -connect 127.0.0.1:443 -servername {DOMAIN} "
        "-tls1_1 -cipher DEFAULT@SECLEVEL=0"
    )
    assert result.rc != 0
    assert "Cipher is (NONE)" in result.stdout or "alert" in result.stderr


def test_readiness_through_nginx(tls):
    status, _, body = request(DOMAIN, HTTPS_PORT, tls, "GET", "/readyz")
    assert status == 200, body


def test_api_without_token_is_forbidden_problem_json(tls):
    status, headers, body = request(DOMAIN, HTTPS_PORT, tls, "GET", "/api/v1/kanaal")
    assert status == 403
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["status"] == 403


def test_oversized_body_is_refused_by_nginx_as_problem_json(tls):
    status, headers, body = request(DOMAIN, HTTPS_PORT, tls, "POST", "/api/v1/notificaties",
                                    b"x" * (2 * 1024 * 1024))
    assert status == 413
    assert headers["Content-Type"] == "application/problem+json"
    assert body["status"] == 413


def test_metrics_are_not_public(tls):
    status, _, _ = request(DOMAIN, HTTPS_PORT, tls, "GET", "/metrics")
    assert status == 403


def test_metrics_on_a_replica(host):
    out = host.check_output(
        "python3 -c \"import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:9001/metrics').read().decode())\""
    )
    assert "# TYPE" in out


def test_notification_reaches_the_subscriber(host, tls):
    message = publish_and_receive(host, DOMAIN, HTTPS_PORT, tls)
    assert message["resource"] == "zaak"
    assert message["kenmerken"] == {"bronorganisatie": "123456782"}


POLLER = """
import ssl, time, urllib.request, os
context = ssl._create_unverified_context()
with open("/root/poll-results.txt", "w") as results:
    while not os.path.exists("/root/poll-stop"):
        try:
            status = urllib.request.urlopen("https://127.0.0.1/healthz", context=context,
                                            timeout=5).status
        except Exception as exc:
            status = getattr(exc, "code", repr(exc))
        results.write(f"{status}\\n")
        results.flush()
        time.sleep(0.02)
"""


def test_rolling_restart_keeps_the_api_up(host):
    """The role's handler restarts replicas one at a time, each healthy before the next;
    requests through nginx meanwhile must all succeed."""
    host.run("rm -f /root/poll-stop /root/poll-results.txt")
    host.check_output(f"cat > /root/poller.py <<'EOF'\n{POLLER}\nEOF")
    host.check_output("systemd-run --unit=e2e-poller --collect python3 /root/poller.py")
    try:
        for unit, port in zip(API_UNITS, (9001, 9002)):
            host.check_output(f"systemctl restart {unit}")
            host.check_output(
                "for i in $(seq 60); do python3 -c \"import urllib.request; urllib.request."
                f"urlopen('http://127.0.0.1:{port}/healthz', timeout=1)\" 2>/dev/null "
                "&& exit 0; sleep 0.5; done; exit 1"
            )
    finally:
        host.run("touch /root/poll-stop; sleep 1; systemctl stop e2e-poller 2>/dev/null")
    statuses = host.file("/root/poll-results.txt").content_string.split()
    assert len(statuses) > 10
    failures = [status for status in statuses if status != "200"]
    assert not failures, f"{len(failures)} of {len(statuses)} requests failed: {failures[:5]}"


def _served_serial(tls) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", HTTPS_PORT), timeout=10) as raw:
        with tls.wrap_socket(raw, server_hostname=DOMAIN) as secure:
            return secure.getpeercert()["serialNumber"]


def test_renewed_certificate_is_served_after_the_deploy_hook(host, tls):
    """certbot's renewal (forced, against pebble) runs the role's hook and nginx serves
    the new certificate."""
    import time

    before = _served_serial(tls)
    result = host.run(
        "REQUESTS_CA_BUNDLE=/etc/pebble-test/tls/cert.pem "
        "certbot renew --force-renewal --no-random-sleep-on-renew"
    )
    assert result.rc == 0, result.stdout + result.stderr
    for _ in range(20):
        if _served_serial(tls) != before:
            return
        time.sleep(0.5)
    raise AssertionError("nginx still serves the certificate from before the renewal")
