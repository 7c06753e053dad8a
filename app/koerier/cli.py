"""The ``koerier`` command: run, migrate, manage clients and look after deliveries."""

from __future__ import annotations

import sys

import click

from koerier import __version__
from koerier.config import (
    LOCAL_ENV_FILE,
    SYSTEM_ENV_FILE,
    ConfigError,
    Settings,
    env_file,
    load_settings,
)


def get_settings(**overrides: object) -> Settings:
    """Load the settings or stop with one line per configuration problem."""
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        click.echo("Koerier cannot start; the configuration has problems:", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        if env_file() is None:
            # Run from another folder, the operator's koerier.env is silently not read.
            click.echo(
                "No env file was read: KOERIER_ENV_FILE is not set, and neither "
                f"{LOCAL_ENV_FILE.resolve()} nor {SYSTEM_ENV_FILE} exists.",
                err=True,
            )
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="koerier")
def main() -> None:
    """Koerier routes notifications (Notificaties API 1.0) to their subscribers."""


@main.command()
def migrate() -> None:
    """Create or upgrade the database schema (safe to run again)."""
    from koerier import migrations

    settings = get_settings()
    try:
        migrations.upgrade(settings)
    except Exception as exc:  # the operator needs the reason, not a traceback
        click.echo(f"migration failed: {exc}", err=True)
        sys.exit(1)
    click.echo(f"database schema is at version {migrations.current(settings)}")


def _register_commands() -> None:
    """Attach the commands that live in their own modules."""
    import importlib

    for module_name in ("koerier.cli_api", "koerier.cli_delivery"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(main)


_register_commands()
