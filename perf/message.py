"""The notification the publisher sends, and the check that Koerier's 201 echoes it.

Kept apart from the locustfile (which imports locust, and with it gevent's patching) so
that the runner can arrange the kanaal and abonnementen with the same names.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

KANAAL = "zaken"
KANAAL_FILTERS = ["bronorganisatie", "zaaktype", "vertrouwelijkheidaanduiding"]
BRONORGANISATIE = "002220647"
DOCUMENT_BASE = "http://perf.koerier.invalid"
# A handful of zaaktypen, as a catalogue would have; subscribers do not filter on them.
ZAAKTYPEN = [f"{DOCUMENT_BASE}/catalogi/api/v1/zaaktypen/{index:04d}" for index in range(5)]
ACTIES = ["create", "update", "partial_update"]


def notification(key: str, sequence: int) -> dict[str, Any]:
    """A status change of a zaak, shaped like what Open Zaak publishes.

    ``key`` ends the ``resourceUrl``: the sink reads it back to match deliveries to publishes.
    """
    zaak = f"{DOCUMENT_BASE}/zaken/api/v1/zaken/{sequence // 4:08d}"
    return {
        "kanaal": KANAAL,
        "hoofdObject": zaak,
        "resource": "status",
        "resourceUrl": f"{DOCUMENT_BASE}/zaken/api/v1/statussen/{key}",
        "actie": ACTIES[sequence % len(ACTIES)],
        "aanmaakdatum": datetime.now(UTC).isoformat(timespec="milliseconds").replace(
            "+00:00", "Z"),
        "kenmerken": {
            "bronorganisatie": BRONORGANISATIE,
            "zaaktype": ZAAKTYPEN[sequence % len(ZAAKTYPEN)],
            "vertrouwelijkheidaanduiding": "openbaar",
        },
    }


def mismatch(sent: dict[str, Any], body: Any) -> str:
    """Why a 201 body is not the message we published; empty when it is."""
    if not isinstance(body, dict):
        return f"expected a JSON object, but got {type(body).__name__}"
    for name in ("kanaal", "hoofdObject", "resource", "resourceUrl", "actie"):
        if body.get(name) != sent[name]:
            return f"{name} must be {sent[name]!r}, but got {body.get(name)!r}"
    if body.get("kenmerken") != sent["kenmerken"]:
        return f"kenmerken must be {sent['kenmerken']!r}, but got {body.get('kenmerken')!r}"
    if not body.get("aanmaakdatum"):
        return "aanmaakdatum is missing"
    return ""
