"""The API side of the ``koerier`` command: serve, clients, tokens, and checks."""

from __future__ import annotations

import sys

import click

from koerier.clients import KNOWN_SCOPES, SCOPE_CONSUME, SCOPE_PUBLISH


def register(main: click.Group) -> None:
    main.add_command(serve)
    main.add_command(client)
    main.add_command(token)
    main.add_command(check)


@click.command()
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535),
              help="TCP port to listen on.")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(0, 256),
              help="Number of API processes sharing the port (0: one per CPU).")
def serve(address: str, port: int, processes: int) -> None:
    """Serve the Notificaties API over HTTP until stopped."""
    from koerier import logs
    from koerier.api.server import serve as run
    from koerier.cli import get_settings

    settings = get_settings()
    logs.setup(settings)
    try:
        run(settings, address, port, processes)
    except OSError as exc:
        click.echo(f"cannot listen on {address}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(1)


@click.group()
def client() -> None:
    """Manage the API clients (client id, secret, scopes)."""


WEAK_SECRET_BELOW = 16


@client.command("add")
@click.argument("client_id")
@click.option("--secret", help="The shared secret; a strong one is generated when omitted.")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(KNOWN_SCOPES),
              help="A scope to grant; repeat for more.")
@click.option("--all", "all_scopes", is_flag=True,
              help="Grant every scope (heeftAlleAutorisaties).")
@click.option("--replace", is_flag=True,
              help="Replace the secret and scopes of an existing CLIENT_ID; its current "
                   "tokens stop working.")
def client_add(client_id: str, secret: str | None, scopes: tuple[str, ...],
               all_scopes: bool, replace: bool) -> None:
    """Create CLIENT_ID and print its credentials.

    An existing client is refused unless --replace is given: a new secret breaks every
    integration that uses the old one.
    """
    from koerier import clients
    from koerier.cli import get_settings

    if not client_id.strip():
        raise click.BadParameter("must not be empty", param_hint="CLIENT_ID")
    if not scopes and not all_scopes:
        raise click.UsageError(
            f"give at least one --scope ({SCOPE_PUBLISH}, {SCOPE_CONSUME}) or --all"
        )
    if scopes and all_scopes:
        raise click.UsageError("--all grants every scope: give --all or --scope, not both")
    if secret is not None and len(secret) < WEAK_SECRET_BELOW:
        # Not refused: a secret may come from an existing integration's configuration.
        click.echo(f"warning: a secret of {len(secret)} characters is easy to guess; omit "
                   "--secret for a generated one", err=True)
    settings = get_settings()
    secret = secret or clients.generate_secret()
    created = _database_call(
        lambda: clients.add(settings.database_conninfo, client_id, secret, list(scopes),
                            all_scopes, replace=replace)
    )
    if created is None:
        click.echo(
            f"client {client_id!r} exists; its secret and scopes are unchanged. Give "
            "--replace to overwrite them (integrations using the old secret stop working).",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{'created' if created else 'updated'} client")
    click.echo(f"client_id: {client_id}")
    click.echo(f"secret:    {secret}")
    click.echo(f"scopes:    {'all' if all_scopes else ' '.join(sorted(set(scopes)))}")


@client.command("list")
def client_list() -> None:
    """List the clients and their scopes (never their secrets)."""
    from koerier import clients
    from koerier.cli import get_settings

    settings = get_settings()
    for item in _database_call(lambda: clients.list_all(settings.database_conninfo)):
        scopes = "all" if item.all_scopes else " ".join(sorted(item.scopes)) or "-"
        click.echo(f"{item.client_id}\t{scopes}")


@client.command("remove")
@click.argument("client_id")
def client_remove(client_id: str) -> None:
    """Delete CLIENT_ID; its tokens stop working within the client cache time."""
    from koerier import clients
    from koerier.cli import get_settings

    settings = get_settings()
    if not _database_call(lambda: clients.remove(settings.database_conninfo, client_id)):
        click.echo(f"no client {client_id!r}", err=True)
        sys.exit(1)
    click.echo(f"removed client {client_id}")


@click.command()
@click.argument("client_id")
def token(client_id: str) -> None:
    """Print a JWT for CLIENT_ID, signed with its stored secret (for manual testing)."""
    from koerier import auth, clients
    from koerier.cli import get_settings

    settings = get_settings()
    found = _database_call(lambda: clients.get(settings.database_conninfo, client_id))
    if found is None:
        click.echo(f"no client {client_id!r}; create it with 'koerier client add'", err=True)
        sys.exit(1)
    click.echo(auth.make_token(found.client_id, found.secret))


@click.command()
def check() -> None:
    """Validate the configuration and reach the database and the broker."""
    from koerier.cli import get_settings

    settings = get_settings()
    click.echo("ok: configuration")
    failures = 0
    checks = (
        ("database", _check_database), ("credentials", _check_credentials),
        ("broker", _check_broker),
    )
    for name, probe in checks:
        try:
            detail = probe(settings)
        except Exception as exc:  # the operator needs one line per failure, not a traceback
            failures += 1
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"FAIL: {name}: {reason}", err=True)
        else:
            click.echo(f"ok: {name}: {detail}")
    sys.exit(1 if failures else 0)


def _check_database(settings):  # type: ignore[no-untyped-def]
    import psycopg

    from koerier import migrations

    with psycopg.connect(settings.database_conninfo) as conn:
        conn.execute("SELECT 1")
    version = migrations.current(settings)
    if version is None:
        raise RuntimeError(
            f"{settings.db_host}:{settings.db_port}/{settings.db_name} has no schema; "
            "run 'koerier migrate'"
        )
    return f"{settings.db_host}:{settings.db_port}/{settings.db_name} (schema {version})"


def _check_credentials(settings):  # type: ignore[no-untyped-def]
    """Every stored client secret and abonnement auth opens with the configured keys."""
    import psycopg

    from koerier import sealing

    with psycopg.connect(settings.database_conninfo) as conn:
        stored = conn.execute(
            "SELECT 'client ' || client_id, secret FROM api_client"
            " UNION ALL SELECT 'abonnement ' || uuid::text, auth FROM abonnement"
        ).fetchall()
    unreadable = []
    for owner, value in stored:
        try:
            sealing.unseal(value)
        except sealing.UnsealError:
            unreadable.append(owner)
    if unreadable:
        raise RuntimeError(
            f"{len(unreadable)} stored credentials do not open with KOERIER_SECRET_KEY "
            f"(first: {unreadable[0]}); put the old key in KOERIER_SECRET_KEY_PREVIOUS"
        )
    sealed = sum(1 for _, value in stored if value.startswith(sealing.PREFIX))
    return f"{len(stored)} stored, {sealed} sealed with the secret key"


def _check_broker(settings):  # type: ignore[no-untyped-def]
    import pika

    from koerier import broker

    parameters = broker.connection_parameters(
        settings, "check", socket_timeout=3, blocked_connection_timeout=3, stack_timeout=5
    )
    try:
        connection = pika.BlockingConnection(parameters)
    except pika.exceptions.ProbableAuthenticationError:
        raise RuntimeError("the broker refused the user or password") from None
    except pika.exceptions.ProbableAccessDeniedError:
        raise RuntimeError(f"no access to vhost {settings.broker_vhost!r}") from None
    except pika.exceptions.AMQPConnectionError as exc:
        raise RuntimeError(
            f"cannot connect to {settings.broker_host}:{settings.broker_port}"
            f" ({type(exc).__name__} {exc})".rstrip()
        ) from None
    connection.close()
    return f"{settings.broker_host}:{settings.broker_port}/{settings.broker_vhost}"


def _database_call(action):  # type: ignore[no-untyped-def]
    """Run a database action for a command; a database problem ends it with one line."""
    import psycopg

    try:
        return action()
    except psycopg.OperationalError as exc:
        click.echo(f"database not reachable: {str(exc).strip().splitlines()[0]}", err=True)
        sys.exit(1)
    except psycopg.errors.UndefinedTable:
        click.echo("the database has no schema; run 'koerier migrate' first", err=True)
        sys.exit(1)
