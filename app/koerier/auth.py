"""ZGW JWT authentication: verify a bearer token and say which client sent it.

Tokens are HS256 JWTs signed with a per-client secret; the ``client_id`` claim says which
secret. ``iat`` is required; a token whose ``iat`` lies more than
``KOERIER_JWT_EXPIRY_SECONDS`` (plus leeway) in the past is rejected, one with ``iat`` in
the future is accepted (VNG's own test suites sign such tokens). Every other algorithm,
``alg: none`` and unsigned tokens are rejected.

Verified tokens are cached by their exact text for as long as the client record is cached,
so the hot path (``POST /notificaties``) pays for one HMAC per token and client-cache
period, and a removed client stops working within ``KOERIER_CLIENT_CACHE_SECONDS``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import jwt

from koerier.clients import ApiClient, ClientCache

ALGORITHM = "HS256"
TOKEN_CACHE_SIZE = 10_000

# Short secrets are the operator's choice (``koerier client add --secret``); PyJWT's warning
# about them would otherwise be printed for every verification.
warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)


class AuthenticationFailed(Exception):
    """The request carries no usable token; ``reason`` is safe to show the client."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    client: ApiClient
    issued_at: int

    @property
    def client_id(self) -> str:
        return self.client.client_id

    def has_scope(self, scope: str) -> bool:
        return self.client.has_scope(scope)


class Authenticator:
    """Turns ``Authorization`` header values into principals."""

    def __init__(self, clients: ClientCache, expiry_seconds: int, leeway_seconds: int):
        self.clients = clients
        self.max_age = expiry_seconds + leeway_seconds
        self.leeway_seconds = leeway_seconds
        self._verified: dict[str, tuple[float, Principal]] = {}

    async def authenticate(self, header: str | None) -> Principal:
        token = _bearer_token(header)
        cached = self._verified.get(token)
        if cached is not None and cached[0] > time.monotonic():
            principal = cached[1]
        else:
            principal = await self._verify(token)
            if len(self._verified) >= TOKEN_CACHE_SIZE:
                # Evicting everything is crude but keeps the cache bounded with no
                # bookkeeping on the hot path; live tokens are verified again once.
                self._verified.clear()
            self._verified[token] = (self.clients.expires_at(principal.client_id), principal)
        if time.time() - principal.issued_at > self.max_age:
            raise AuthenticationFailed("the token has expired (iat is too long ago)")
        return principal

    async def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError as exc:
            raise AuthenticationFailed(f"the token is not a valid JWT: {exc}") from None
        if header.get("alg") != ALGORITHM:
            raise AuthenticationFailed(
                f"the token must be signed with {ALGORITHM}, but got {header.get('alg')!r}"
            )
        client_id = claims.get("client_id")
        if client_id is None:
            raise AuthenticationFailed("the token has no client_id claim")
        if not isinstance(client_id, str) or not client_id:
            raise AuthenticationFailed("the token's client_id claim must be a non-empty string")

        client = await self.clients.get(client_id)
        if client is None:
            raise AuthenticationFailed("the client_id is not known")
        try:
            verified = jwt.decode(
                token,
                client.secret,
                algorithms=[ALGORITHM],
                leeway=self.leeway_seconds,
                options={"require": ["iat"], "verify_iat": False, "verify_aud": False},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthenticationFailed(f"the token is rejected: {exc}") from None

        issued_at = verified.get("iat")
        if isinstance(issued_at, bool) or not isinstance(issued_at, int | float):
            raise AuthenticationFailed("the iat claim must be a number")
        return Principal(client=client, issued_at=int(issued_at))


def _bearer_token(header: str | None) -> str:
    if not header:
        raise AuthenticationFailed("no Authorization header with a bearer token")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


def make_token(client_id: str, secret: str, issued_at: int | None = None) -> str:
    """A ZGW JWT for ``client_id``, as a publisher would sign it (``koerier token``)."""
    iat = int(time.time()) if issued_at is None else issued_at
    claims = {
        "iss": client_id,
        "iat": iat,
        "client_id": client_id,
        "user_id": client_id,
        "user_representation": client_id,
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
