"""The subscription probe: does a new or changed callback really receive notifications?

When an abonnement is created, or its ``callbackUrl`` or ``auth`` changes, Koerier POSTs a
test notification (``kanaal: "test"``) to the callback twice:

1. with the abonnement's ``auth`` as ``Authorization``: the callback must answer 2xx;
2. without credentials: it must answer 401 or 403, because a callback that accepts anyone
   would accept forged notifications too. This request is only sent to hosts in
   ``KOERIER_PROBE_UNAUTHENTICATED_HOSTS`` when that list is set.

Both requests are bounded by ``KOERIER_PROBE_TIMEOUT_SECONDS`` and follow no redirects. A
failure is a :class:`ProbeFailed` that says which request failed and what came back.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from koerier import logs

log = logs.get("koerier.probe")

ACCEPTED_WITH_AUTH = range(200, 300)
ACCEPTED_WITHOUT_AUTH = (401, 403)


class ProbeFailed(Exception):
    """The callback did not behave; ``reason`` is shown to the client."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def test_notification() -> dict[str, object]:
    """The message the probe sends; subscribers recognise it by ``kanaal: "test"``."""
    return {
        "kanaal": "test",
        "hoofdObject": "http://some.hoofdobject.nl/",
        "resource": "some_resource",
        "resourceUrl": "http://some.resource.nl/",
        "actie": "create",
        "aanmaakdatum": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "kenmerken": {},
    }


async def probe(
    callback_url: str,
    auth: str,
    *,
    timeout_seconds: float,
    unauthenticated_hosts: list[str],
) -> None:
    """Check the callback; raises :class:`ProbeFailed` when it does not pass."""
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    message = test_notification()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status = await _post(session, callback_url, message, auth, "with auth")
        if status not in ACCEPTED_WITH_AUTH:
            raise ProbeFailed(
                "probe_rejected",
                f"the callback must answer 2xx to a test notification with the abonnement's "
                f"auth, but answered {status}",
            )
        host = (urlsplit(callback_url).hostname or "").lower()
        allowed = [name.lower() for name in unauthenticated_hosts]
        if allowed and host not in allowed:
            log.info("probe_unauthenticated_skipped", host=host)
            return
        status = await _post(session, callback_url, message, None, "without auth")
        if status not in ACCEPTED_WITHOUT_AUTH:
            raise ProbeFailed(
                "probe_accepts_anyone",
                "the callback must answer 401 or 403 to a test notification without "
                f"credentials, but answered {status}",
            )


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    message: dict[str, object],
    auth: str | None,
    which: str,
) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    try:
        async with session.post(url, json=message, headers=headers, allow_redirects=False) as r:
            status = r.status
            location = r.headers.get("Location", "")
            await r.read()
    except TimeoutError:
        raise ProbeFailed(
            "probe_timeout", f"the callback did not answer the probe {which} in time"
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise ProbeFailed(
            "probe_tls_error",
            f"the callback's TLS certificate is not valid: {exc.certificate_error}",
        ) from None
    except (aiohttp.ClientSSLError, ssl.SSLError) as exc:
        raise ProbeFailed("probe_tls_error", f"TLS with the callback failed: {exc}") from None
    except aiohttp.ClientConnectorDNSError:
        raise ProbeFailed(
            "probe_unreachable", "the callback's host name does not resolve"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise ProbeFailed(
            "probe_unreachable", f"cannot connect to the callback: {exc.strerror or exc}"
        ) from None
    except (aiohttp.ClientError, ValueError) as exc:
        raise ProbeFailed(
            "probe_failed", f"the probe {which} failed: {type(exc).__name__}: {exc}"
        ) from None
    if 300 <= status < 400:
        raise ProbeFailed(
            "probe_redirected",
            f"the callback answered the probe {which} with a redirect ({status}"
            f"{' to ' + location if location else ''}); Koerier does not follow redirects",
        )
    return status
