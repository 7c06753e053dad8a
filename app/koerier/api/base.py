"""What every API handler shares: negotiation, authentication, bodies, errors, URLs.

A request passes these steps in :meth:`ApiHandler.prepare`, in this order, and the first
that fails answers with problem+json: method allowed (405), ``Accept`` (406), query
parameters (400), token and scope (403), ``Content-Type`` (415), body size (413), body
decoding (400). Handlers then work with ``self.principal`` and ``self.body``.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import orjson
import psycopg
import tornado.web

from koerier import logs
from koerier.api import errors
from koerier.api.errors import ApiError
from koerier.auth import AuthenticationFailed, Authenticator, Principal
from koerier.config import Settings
from koerier.db import DatabaseUnavailable
from koerier.intake import Intake
from koerier.routing import DeliveryPublisher

API_VERSION = "1.0.1"
JSON_TYPES = ("application/json", "application/problem+json", "application/*", "*/*")
BODY_METHODS = ("POST", "PUT", "PATCH")

log = logs.get("koerier.api")

Row = dict[str, Any]


def one(row: object) -> Row | None:
    """A row of the pool's connections, which make dicts (``dict_row``)."""
    return cast(Row | None, row)


def many(rows: object) -> list[Row]:
    return cast(list[Row], rows)


@dataclass
class ApiContext:
    """The per-process objects handlers need, built once by ``make_app``."""

    settings: Settings
    authenticator: Authenticator
    publisher: DeliveryPublisher | None = None
    intake: Intake = field(default_factory=Intake)
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(
        default_factory=list
    )


class ApiHandler(tornado.web.RequestHandler):
    """Base class of the JSON handlers; subclasses declare scopes and query parameters."""

    # Scopes per method: the caller needs at least one of the listed scopes.
    scopes: ClassVar[dict[str, tuple[str, ...]]] = {}
    query_parameters: ClassVar[frozenset[str]] = frozenset()
    # Whether the handler answers only JSON (406 otherwise) and needs a token.
    negotiate: ClassVar[bool] = True
    public: ClassVar[bool] = False

    context: ApiContext
    principal: Principal | None
    body: Any
    raw_body: str

    def initialize(self, context: ApiContext) -> None:
        self.context = context
        self.principal = None
        self.body = None
        self.raw_body = ""
        self.error_instance: str | None = None

    def set_default_headers(self) -> None:
        self.set_header("API-version", API_VERSION)
        self.clear_header("Server")

    async def prepare(self) -> None:
        allowed = self.allowed_methods()
        if self.request.method not in allowed:
            raise errors.method_not_allowed(str(self.request.method), allowed)
        if self.negotiate:
            self._check_accept()
        self._check_query()
        if not self.public:
            await self._authenticate()
        if self.request.method in BODY_METHODS:
            self._read_body()

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        # Tornado's own error for bad UTF-8 in a query argument or path part is a bare 400.
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.invalid(name or "url", "invalid", "is not valid UTF-8") from None

    # Steps of prepare()

    @classmethod
    def allowed_methods(cls) -> list[str]:
        return [
            method
            for method in ("GET", "POST", "PUT", "PATCH", "DELETE")
            if getattr(cls, method.lower()) is not getattr(tornado.web.RequestHandler,
                                                           method.lower())
        ]

    def _check_accept(self) -> None:
        accept = self.request.headers.get("Accept")
        if accept is None or accept.strip() == "":
            return
        for media_range in accept.split(","):
            media_type, _, parameters = media_range.partition(";")
            if media_type.strip().lower() in JSON_TYPES and _positive_q(parameters):
                return
        raise ApiError(
            406,
            "not_acceptable",
            "Not acceptable.",
            f"this API answers with application/json, but the Accept header asks for {accept!r}",
        )

    def _check_query(self) -> None:
        unknown = sorted(set(self.request.query_arguments) - self.query_parameters)
        if unknown:
            raise errors.validation_error(
                [
                    errors.InvalidParam(name or "nonFieldErrors", "unknown-parameters",
                                        f"unknown query parameter {name!r}")
                    for name in unknown
                ],
                detail=f"unknown query parameters: {', '.join(unknown)}",
            )

    async def _authenticate(self) -> None:
        wanted = self.scopes.get(str(self.request.method), ())
        try:
            principal = await self.context.authenticator.authenticate(
                self.request.headers.get("Authorization")
            )
        except AuthenticationFailed as exc:
            raise errors.forbidden("not_authenticated", exc.reason) from None
        self.principal = principal
        if wanted and not any(principal.has_scope(scope) for scope in wanted):
            raise errors.forbidden(
                "permission_denied",
                f"this operation needs the scope {' or '.join(wanted)}",
            )

    def _read_body(self) -> None:
        content_type = self.request.headers.get("Content-Type", "")
        media_type, _, parameters = content_type.partition(";")
        charset = _parameter(parameters, "charset")
        if media_type.strip().lower() != "application/json" or charset not in (None, "utf-8"):
            raise ApiError(
                415,
                "unsupported_media_type",
                "Unsupported media type.",
                f"the body must be application/json (UTF-8), but got {content_type!r}",
            )
        limit = self.context.settings.max_body_bytes
        if len(self.request.body) > limit:
            raise ApiError(
                413,
                "request_too_large",
                "Request too large.",
                f"the body may be at most {limit} bytes, but has {len(self.request.body)}",
            )
        try:
            text = self.request.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise errors.invalid(
                "nonFieldErrors", "parse_error", f"the body is not valid UTF-8: {exc.reason}"
            ) from None
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise errors.invalid(
                "nonFieldErrors", "parse_error", f"the body is not valid JSON: {exc}"
            ) from None
        # PostgreSQL text cannot hold NUL characters; refuse them here, with a reason,
        # instead of failing in the database.
        if "\\u0000" in text and _contains_nul(body):
            raise errors.invalid(
                "nonFieldErrors", "parse_error", "the body contains a NUL character (\\u0000)"
            )
        self.raw_body = text
        self.body = body

    # Responses

    def base_url(self) -> str:
        """Scheme and host of absolute URLs: the configured public URL, or the request's,
        believing ``X-Forwarded-Proto/Host`` only from trusted proxies."""
        configured = self.context.settings.public_url
        if configured:
            return configured
        scheme = self.request.protocol
        host = self.request.host
        if self._from_trusted_proxy():
            headers = self.request.headers
            scheme = headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip() or scheme
            host = headers.get("X-Forwarded-Host", host).split(",")[0].strip() or host
        return f"{scheme}://{host}"

    def _from_trusted_proxy(self) -> bool:
        try:
            peer = ipaddress.ip_address(self.request.remote_ip or "")
        except ValueError:
            return False
        return any(peer in network for network in self.context.trusted_networks)

    def send_json(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc_info = kwargs.get("exc_info")
        error = _as_api_error(exc_info[1] if exc_info else None, status_code)
        self.error_instance = errors.new_instance()
        self._error = error
        self.set_status(error.status)
        for name, value in error.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/problem+json")
        self.finish(orjson.dumps(error.body(self.error_instance)))

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: Any
    ) -> None:
        # ApiErrors are answers, not faults: the access line records them. Everything else
        # is a fault and logged with its traceback, never shown to the client.
        if isinstance(value, ApiError | tornado.web.HTTPError):
            return
        if isinstance(value, DatabaseUnavailable):
            log.warning("database_unavailable", reason=str(value), path=self.request.path)
            return
        log.error(
            "request_failed",
            method=self.request.method,
            path=self.request.path,
            exc_info=(typ, value, tb) if typ else sys.exc_info(),
        )


def _as_api_error(exc: BaseException | None, status_code: int) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DatabaseUnavailable):
        return errors.unavailable("the database is not reachable; try again shortly")
    if isinstance(exc, psycopg.DataError):
        return errors.invalid("nonFieldErrors", "invalid", "the database refused a value")
    if isinstance(exc, tornado.web.HTTPError) or exc is None:
        code = exc.status_code if isinstance(exc, tornado.web.HTTPError) else status_code
        if code == 404:
            return errors.not_found()
        if code == 413:
            return ApiError(413, "request_too_large", "Request too large.", "the body is too large")
        if 400 <= code < 500:
            return ApiError(code, "invalid", "Bad request.", "the request cannot be handled")
    return errors.server_error()


def _positive_q(parameters: str) -> bool:
    value = _parameter(parameters, "q")
    try:
        return value is None or float(value) > 0
    except ValueError:
        return False


def _parameter(parameters: str, name: str) -> str | None:
    for part in parameters.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == name:
            return value.strip().strip('"').lower()
    return None


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_contains_nul(key) or _contains_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    return False


class NotFoundHandler(ApiHandler):
    """Every path that matches no route: 404 problem+json, no redirects."""

    def prepare(self) -> None:  # type: ignore[override]
        raise errors.not_found()
