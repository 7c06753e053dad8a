"""A version number of everything routing reads, so API processes may cache routes.

``routing_version`` holds one number, raised by a statement trigger whenever a kanaal or
an abonnement's filter groups change (insert, update, delete, truncate). The API keeps
kanalen and filter groups in memory with the version they were read at, and stores a
notification with one statement that inserts only while that version is still the
current one (routing.py); otherwise it reads the routes again. The row is updated in the
changing transaction, so a version never becomes visible before the change it counts.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE routing_version (
            singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            version    bigint NOT NULL
        );
        INSERT INTO routing_version (singleton, version) VALUES (true, 1);

        CREATE FUNCTION raise_routing_version() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE routing_version SET version = version + 1;
            RETURN NULL;
        END
        $$;

        CREATE TRIGGER kanaal_changes_routing
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON kanaal
            FOR EACH STATEMENT EXECUTE FUNCTION raise_routing_version();
        CREATE TRIGGER abonnement_filter_changes_routing
            AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON abonnement_filter
            FOR EACH STATEMENT EXECUTE FUNCTION raise_routing_version();
        """
    )
