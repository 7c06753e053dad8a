"""The split layout: the data host serves PostgreSQL and RabbitMQ to the app host over
the scenario's network; the app host runs nginx and Koerier and nothing else."""

from __future__ import annotations

import os
import ssl

import pytest
import testinfra
from appliance_checks import assert_unit_active, publish_and_receive, request

DOMAIN = "koerier-split.gemeente.test"
HTTPS_PORT = int(os.environ.get("KOERIER_SPLIT_HTTPS_PORT", "28443"))


@pytest.fixture(scope="module")
def data_host():
    return testinfra.get_host("podman://koerier-data")


@pytest.fixture(scope="module")
def tls(host) -> ssl.SSLContext:
    """Trust exactly the app host's self-signed certificate."""
    certificate = host.file("/etc/ssl/koerier/selfsigned/fullchain.pem").content_string
    return ssl.create_default_context(cadata=certificate)


def _listeners(target, port):
    out = target.check_output(f"ss -Hltn 'sport = :{port}'")
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines()}


@pytest.mark.parametrize("unit", ["postgresql@15-main", "rabbitmq-server"])
def test_data_host_runs_database_and_broker(data_host, unit):
    assert_unit_active(data_host, unit)


@pytest.mark.parametrize("port", [5432, 5672])
def test_data_host_serves_the_network(data_host, port):
    address = data_host.interface("eth0").addresses[0]
    assert address in _listeners(data_host, port)


@pytest.mark.parametrize("port", [4369, 25672])
def test_data_host_keeps_erlang_ports_on_loopback(data_host, port):
    assert _listeners(data_host, port) <= {"127.0.0.1", "::1"}


@pytest.mark.parametrize("package", ["nginx", "python3-venv"])
def test_data_host_has_no_app_packages(data_host, package):
    assert not data_host.package(package).is_installed


@pytest.mark.parametrize("package", ["postgresql-15", "rabbitmq-server"])
def test_app_host_has_no_data_packages(host, package):
    assert not host.package(package).is_installed


@pytest.mark.parametrize("unit", ["nginx", "koerier-api-1", "koerier-api-2", "koerier-worker-1"])
def test_app_host_runs_nginx_and_koerier(host, unit):
    assert_unit_active(host, unit)


def test_app_connects_to_the_database_over_tls(host, data_host):
    host.check_output("koerier check")
    ssl_sessions = data_host.check_output(
        "runuser -u postgres -- psql -tAc \"select count(*) from pg_stat_ssl "
        "join pg_stat_activity using (pid) where usename = 'koerier' and ssl\""
    )
    assert int(ssl_sessions) > 0


def test_readiness_through_nginx(tls):
    status, _, body = request(DOMAIN, HTTPS_PORT, tls, "GET", "/readyz")
    assert status == 200, body


def test_notification_reaches_the_subscriber(host, tls):
    message = publish_and_receive(host, DOMAIN, HTTPS_PORT, tls)
    assert message["kenmerken"] == {"bronorganisatie": "123456782"}
