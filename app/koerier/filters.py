"""Routing semantics: canonical kenmerk keys, key consistency, and filter matching.

Publishers do not agree on the casing of kenmerk names: Open Zaak registers a kanaal with
``object_type`` and publishes ``objectType``. Every comparison of keys therefore goes through
:func:`canonical`, which maps snake_case, camelCase and kebab-case spellings of one name to
the same string. Values are compared exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

WILDCARD = "*"


def canonical(key: str) -> str:
    """The form in which kenmerk names are compared: lower case without ``_`` or ``-``."""
    return key.replace("_", "").replace("-", "").lower()


def canonical_keys(keys: Iterable[str]) -> frozenset[str]:
    return frozenset(canonical(key) for key in keys)


def canonical_filters(filters: Mapping[str, str]) -> dict[str, str]:
    """A filter group or kenmerken mapping with its keys in canonical form."""
    return {canonical(key): value for key, value in filters.items()}


def consistent(keys: Iterable[str], kanaal_filters: Iterable[str]) -> bool:
    """Whether ``keys`` are a subset or a superset of the kenmerken a kanaal declares.

    The standard asks this of both the kenmerken of a notification and the filters of an
    abonnement; keys are compared in canonical form.
    """
    given = canonical_keys(keys)
    declared = canonical_keys(kanaal_filters)
    return given <= declared or given >= declared


def matches(group: Mapping[str, str], kenmerken: Mapping[str, str]) -> bool:
    """Whether one filter group (canonical keys) lets a notification (canonical keys) through.

    Each filter passes when the notification lacks the kenmerk, when the filter value is the
    wildcard ``*``, or when the values are equal; a group matches when all filters pass.
    """
    for key, wanted in group.items():
        if wanted == WILDCARD:
            continue
        actual = kenmerken.get(key)
        if actual is not None and actual != wanted:
            return False
    return True
