"""The Tornado application: routes, shared context, and the access log."""

from __future__ import annotations

import ipaddress
from typing import Any

import tornado.web

from koerier import logs
from koerier.api.abonnement import AbonnementDetailHandler, AbonnementListHandler
from koerier.api.base import ApiContext, ApiHandler, NotFoundHandler
from koerier.api.kanaal import KanaalDetailHandler, KanaalListHandler
from koerier.api.meta import HealthHandler, ReadyHandler, SpecHandler
from koerier.api.notificaties import NotificatiesHandler
from koerier.auth import Authenticator
from koerier.clients import ClientCache
from koerier.config import Settings
from koerier.intake import Intake
from koerier.routing import DeliveryPublisher

access_log = logs.get("koerier.access")

PREFIX = "/api/v1"


def make_app(
    settings: Settings,
    publisher: DeliveryPublisher | None = None,
    extra_handlers: list[Any] | None = None,
) -> tornado.web.Application:
    """The API application for one process.

    ``publisher`` receives the delivery ids of every stored notification after its
    transaction commits; without one, deliveries stay ``scheduled`` for the relay.
    ``extra_handlers`` are more Tornado URL specs (such as ``/metrics``), matched first.
    """
    context = ApiContext(
        settings=settings,
        authenticator=Authenticator(
            ClientCache(settings.client_cache_seconds),
            expiry_seconds=settings.jwt_expiry_seconds,
            leeway_seconds=settings.jwt_leeway_seconds,
        ),
        publisher=publisher,
        intake=Intake(settings.intake_batch_max, settings.intake_transactions,
                      settings.db_connect_timeout_seconds),
        trusted_networks=[
            ipaddress.ip_network(item, strict=False) for item in settings.trusted_proxies
        ],
    )
    uuid_part = r"([^/]+)"
    routes: list[Any] = [
        (rf"{PREFIX}/kanaal", KanaalListHandler),
        (rf"{PREFIX}/kanaal/{uuid_part}", KanaalDetailHandler),
        (rf"{PREFIX}/abonnement", AbonnementListHandler),
        (rf"{PREFIX}/abonnement/{uuid_part}", AbonnementDetailHandler),
        (rf"{PREFIX}/notificaties", NotificatiesHandler),
        (rf"{PREFIX}/openapi\.yaml", SpecHandler),
        (rf"{PREFIX}/schema/openapi\.yaml", SpecHandler),
        (rf"{PREFIX}/?", SpecHandler),
        (r"/healthz", HealthHandler),
        (r"/readyz", ReadyHandler),
    ]
    handlers = [*(extra_handlers or []), *[(path, cls, {"context": context})
                                          for path, cls in routes]]
    return tornado.web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        default_handler_args={"context": context},
        log_function=log_request,
        compress_response=False,
        xheaders=False,
    )


def log_request(handler: tornado.web.RequestHandler) -> None:
    """One line per request; its level follows the status class."""
    status = handler.get_status()
    fields: dict[str, Any] = {
        "method": handler.request.method,
        "path": handler.request.path,
        "status": status,
        "duration_ms": round(handler.request.request_time() * 1000, 1),
        "remote_ip": handler.request.remote_ip,
    }
    if isinstance(handler, ApiHandler):
        if handler.principal is not None:
            fields["client_id"] = handler.principal.client_id
        error = getattr(handler, "_error", None)
        if error is not None:
            fields["error_code"] = error.code
            fields["error_detail"] = error.detail
            fields["error_instance"] = handler.error_instance
    if status < 400:
        access_log.info("request", **fields)
    elif status < 500:
        access_log.warning("request", **fields)
    else:
        access_log.error("request", **fields)
