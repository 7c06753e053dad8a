"""Credentials at rest: client secrets and abonnement ``auth`` values, sealed with the secret key.

Koerier must be able to read both back (an HS256 secret verifies tokens, an ``auth`` value
goes out with every delivery), so they cannot be hashed; they are encrypted with Fernet
under a key derived from ``KOERIER_SECRET_KEY`` instead. A database dump or backup then
holds no usable credential. Keys named in ``KOERIER_SECRET_KEY_PREVIOUS`` still open old
values, so the key can be rotated; ``koerier check`` reports values no key opens.

Without a secret key (development only) values are stored as given. A stored value without
the seal prefix is read as given, so a database filled before a key was set keeps working.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "sealed:v1:"


class UnsealError(Exception):
    """A sealed value that none of the configured keys opens (the key changed)."""


def _fernet(secret_key: str) -> Fernet:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"koerier stored credentials"
    ).derive(secret_key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


class Sealer:
    def __init__(self, secret_key: str, previous_keys: tuple[str, ...] = ()):
        keys = [key for key in (secret_key, *previous_keys) if key]
        self._box = MultiFernet([_fernet(key) for key in keys]) if keys else None
        self._seals = bool(secret_key)

    def seal(self, value: str) -> str:
        if not self._seals or self._box is None:
            return value
        return PREFIX + self._box.encrypt(value.encode()).decode()

    def unseal(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored
        if self._box is None:
            raise UnsealError("a sealed credential was found, but no secret key is set")
        try:
            return self._box.decrypt(stored.removeprefix(PREFIX).encode()).decode()
        except InvalidToken:
            raise UnsealError(
                "a sealed credential does not open with KOERIER_SECRET_KEY or any key in "
                "KOERIER_SECRET_KEY_PREVIOUS"
            ) from None


@lru_cache(maxsize=4)
def sealer(secret_key: str, previous_keys: tuple[str, ...] = ()) -> Sealer:
    return Sealer(secret_key, previous_keys)


_current = Sealer("")


def configure(secret_key: str, previous_keys: tuple[str, ...] = ()) -> None:
    """Use these keys from now on in this process (called when the settings are loaded)."""
    global _current
    _current = sealer(secret_key, previous_keys)


def seal(value: str) -> str:
    return _current.seal(value)


def unseal(stored: str) -> str:
    return _current.unseal(stored)
