"""Koerier: a notification router for the Notificaties API 1.0 (VNG, ZGW)."""

__version__ = "0.1.0"
API_VERSION = "1.0.1"
