"""Koerier's settings: every ``KOERIER_*`` variable, where they are read from, and validation.

Settings come from the environment, or from an env file with the same names. The file is
``$KOERIER_ENV_FILE`` when that is set, else ``./koerier.env`` (what ``make run`` writes),
else ``/etc/koerier/koerier.env`` (what the appliance writes). Real environment variables
win over the file. Start-up fails with one clear line per problem.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

SYSTEM_ENV_FILE = Path("/etc/koerier/koerier.env")
LOCAL_ENV_FILE = Path("koerier.env")


def env_file() -> Path | None:
    """The env file in force, or None when there is none."""
    explicit = os.environ.get("KOERIER_ENV_FILE")
    if explicit:
        return Path(explicit)
    for candidate in (LOCAL_ENV_FILE, SYSTEM_ENV_FILE):
        if candidate.is_file():
            return candidate
    return None


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KOERIER_", extra="ignore")

    environment: Literal["production", "development"] = "production"

    # PostgreSQL
    db_host: str = "127.0.0.1"
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "koerier"
    db_user: str = "koerier"
    db_password: str = ""
    db_pool_min: int = Field(1, ge=0)
    db_pool_max: int = Field(10, ge=1)
    db_connect_timeout_seconds: float = Field(3.0, gt=0)

    # RabbitMQ
    broker_host: str = "127.0.0.1"
    broker_port: int = Field(5672, ge=1, le=65535)
    broker_vhost: str = "koerier"
    broker_user: str = "koerier"
    broker_password: str = ""

    # Seals client secrets and abonnement auth values in the database (see sealing.py).
    secret_key: str = ""
    secret_key_previous: Annotated[list[str], NoDecode] = []

    # HTTP API
    public_url: str = ""
    trusted_proxies: Annotated[list[str], NoDecode] = ["127.0.0.1", "::1"]
    max_body_bytes: int = Field(1_048_576, ge=1024)
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Every client may read every abonnement (the incumbent's behaviour); false limits the
    # list and detail views to the abonnementen a client owns.
    abonnement_read_all: bool = True
    max_callback_url_length: int = Field(2000, ge=100)
    max_auth_length: int = Field(8000, ge=100)

    # Authentication (ZGW JWT)
    jwt_expiry_seconds: int = Field(3600, ge=1)
    jwt_leeway_seconds: int = Field(300, ge=0)
    client_cache_seconds: float = Field(5.0, ge=0)

    # Publishing
    aanmaakdatum_leeway_seconds: int = Field(300, ge=0)
    # The zone of an ``aanmaakdatum`` without an offset; ZGW components mean Dutch time.
    naive_time_zone: str = "Europe/Amsterdam"
    # Group commit (intake.py): notifications that arrive together share a transaction.
    intake_transactions: int = Field(2, ge=1)
    intake_batch_max: int = Field(100, ge=1)

    # Subscription probe
    probe_enabled: bool = True
    probe_timeout_seconds: float = Field(5.0, gt=0)
    # Hosts to which the probe sends its unauthenticated request. Empty means every host;
    # operators who do not want Koerier to call arbitrary hosts without credentials list them.
    probe_unauthenticated_hosts: Annotated[list[str], NoDecode] = []

    # Delivery
    delivery_timeout_seconds: float = Field(10.0, gt=0)
    delivery_connect_timeout_seconds: float = Field(5.0, gt=0)
    retry_max: int = Field(7, ge=0)
    retry_base_seconds: float = Field(25.0, gt=0)
    retry_factor: float = Field(4.0, ge=1)
    retry_max_delay_seconds: float = Field(52_000.0, gt=0)
    retry_jitter: float = Field(0.2, ge=0, le=1)
    per_host_concurrency: int = Field(8, ge=1)
    circuit_failure_threshold: int = Field(5, ge=1)
    circuit_open_seconds: float = Field(60.0, gt=0)
    worker_prefetch: int = Field(100, ge=1)
    relay_interval_seconds: float = Field(1.0, gt=0)
    relay_stale_queued_seconds: float = Field(3600.0, gt=0)
    # The relay leaves a fresh delivery to the API's own publish for this long.
    relay_grace_seconds: float = Field(5.0, ge=0)
    relay_batch_size: int = Field(500, ge=1)
    # A delivery for a host at its concurrency bound is rescheduled this much later.
    defer_seconds: float = Field(1.0, gt=0)
    # A host counts as slow once one of its requests has run this long.
    host_slow_seconds: float = Field(2.0, gt=0)
    worker_concurrency: int = Field(32, ge=1)
    retention_days: int = Field(30, ge=1)

    @field_validator(
        "trusted_proxies", "probe_unauthenticated_hosts", "secret_key_previous", mode="before"
    )
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"must be IP addresses or networks, but got {item!r}") from exc
        return value

    @field_validator("naive_time_zone")
    @classmethod
    def _check_time_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"must be an IANA time zone name, but got {value!r}") from None
        return value

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        value = value.rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, but got {value!r}")
        return value

    @model_validator(mode="after")
    def _secrets_in_production(self) -> Settings:
        if self.environment == "production":
            missing = [
                name
                for name in ("db_password", "broker_password", "secret_key")
                if not getattr(self, name)
            ]
            if missing:
                names = ", ".join("KOERIER_" + name.upper() for name in missing)
                raise ValueError(f"production mode needs {names} to be set")
        return self

    @property
    def database_conninfo(self) -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=self.db_host,
            port=self.db_port,
            dbname=self.db_name,
            user=self.db_user,
            password=self.db_password or None,
            connect_timeout=max(1, int(self.db_connect_timeout_seconds)),
            application_name="koerier",
        )


def _format_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        name = f"KOERIER_{location.upper()}" if location else "configuration"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{name}: {message}")
    return problems


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raises ConfigError listing every problem."""
    path = env_file()
    if path is not None and not path.exists():
        raise ConfigError([f"KOERIER_ENV_FILE: {path} does not exist"])
    try:
        loaded = Settings(_env_file=path, **overrides)  # type: ignore[call-arg]
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    from koerier import sealing

    sealing.configure(loaded.secret_key, tuple(loaded.secret_key_previous))
    return loaded


@lru_cache(maxsize=1)
def settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
