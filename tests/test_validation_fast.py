"""The fast validator (fastjsonschema) must never accept what the full one (jsonschema)
refuses: ``validation.check`` trusts the fast one's "valid" and asks the full one only
for the errors. Both are run on valid bodies and on many broken variants of them."""

from __future__ import annotations

import copy
from typing import Any

import fastjsonschema
import pytest

from koerier.api import validation

VALID: dict[str, dict[str, Any]] = {
    "Message": {
        "kanaal": "zaken",
        "hoofdObject": "https://zaken.example/api/v1/zaken/1",
        "resource": "zaak",
        "resourceUrl": "https://zaken.example/api/v1/zaken/1",
        "actie": "create",
        "aanmaakdatum": "2026-12-03T10:00:00+01:00",
        "kenmerken": {"bron": "082096752011", "zaaktype": "https://z.example/zt/1"},
    },
    "Abonnement": {
        "callbackUrl": "https://ontvanger.example/callback",
        "auth": "Bearer abc",
        "kanalen": [{"naam": "zaken", "filters": {"bron": "082096752011"}}],
    },
    "Kanaal": {
        "naam": "zaken",
        "documentatieLink": "https://docs.example/zaken",
        "filters": ["bron", "zaaktype"],
    },
}

WRONG_VALUES: list[Any] = [
    None, "", " ", "x" * 1001, "not a url", "2026-13-45T99:00:00", "20261203", 0, -1, 1.5,
    True, [], ["a"], [1], {}, {"a": 1}, {"a": None}, "https://", "urn:uuid:1", "\u00e9" * 60,
]


def variants(body: dict[str, Any]):
    yield body
    for key in list(body):
        dropped = copy.deepcopy(body)
        del dropped[key]
        yield dropped
        for value in WRONG_VALUES:
            changed = copy.deepcopy(body)
            changed[key] = value
            yield changed
            nested = body[key]
            if isinstance(nested, dict):
                for inner in list(nested):
                    deeper = copy.deepcopy(body)
                    deeper[key][inner] = value
                    yield deeper
            if isinstance(nested, list) and nested and isinstance(nested[0], dict):
                for inner in list(nested[0]):
                    deeper = copy.deepcopy(body)
                    deeper[key][0][inner] = value
                    yield deeper
    yield {**body, "extra": "field"}
    for value in WRONG_VALUES[:6]:
        yield value


@pytest.mark.parametrize("schema_name", sorted(VALID))
@pytest.mark.parametrize("partial", [False, True])
def test_fast_and_full_validators_agree(schema_name, partial):
    fast = validation.fast_validator(schema_name, partial)
    full = validation.validator(schema_name, partial)
    checked = 0
    for body in variants(VALID[schema_name]):
        try:
            fast(body)
            fast_valid = True
        except fastjsonschema.JsonSchemaValueException:
            fast_valid = False
        full_valid = not list(full.iter_errors(body))
        assert fast_valid == full_valid, (schema_name, partial, body)
        assert (validation.check(schema_name, body, partial) == []) == full_valid
        checked += 1
    assert checked > 50
