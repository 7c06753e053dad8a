"""The initial schema: clients, kanalen, abonnementen, notifications and their deliveries.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_client (
            client_id   text PRIMARY KEY,
            secret      text NOT NULL,
            scopes      text[] NOT NULL DEFAULT '{}',
            all_scopes  boolean NOT NULL DEFAULT false,
            created_at  timestamptz NOT NULL DEFAULT now(),
            updated_at  timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE kanaal (
            id                 bigserial PRIMARY KEY,
            uuid               uuid NOT NULL UNIQUE,
            naam               text NOT NULL UNIQUE,
            documentatie_link  text NOT NULL DEFAULT '',
            filters            text[] NOT NULL DEFAULT '{}'
        );

        CREATE TABLE abonnement (
            id            bigserial PRIMARY KEY,
            uuid          uuid NOT NULL UNIQUE,
            callback_url  text NOT NULL,
            auth          text NOT NULL,
            client_id     text NOT NULL,
            kanalen       jsonb NOT NULL DEFAULT '[]',
            created_at    timestamptz NOT NULL DEFAULT now(),
            updated_at    timestamptz NOT NULL DEFAULT now()
        );

        -- One row per filter group, so routing reads only the groups of one kanaal.
        CREATE TABLE abonnement_filter (
            abonnement_id  bigint NOT NULL REFERENCES abonnement(id) ON DELETE CASCADE,
            kanaal_naam    text NOT NULL,
            filters        jsonb NOT NULL DEFAULT '{}'
        );
        CREATE INDEX abonnement_filter_kanaal ON abonnement_filter (kanaal_naam);
        CREATE INDEX abonnement_filter_abonnement ON abonnement_filter (abonnement_id);

        CREATE TABLE notification (
            id           bigserial PRIMARY KEY,
            uuid         uuid NOT NULL UNIQUE,
            kanaal       text NOT NULL,
            message      json NOT NULL,
            received_at  timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX notification_received_at ON notification (received_at);

        -- Deliveries keep no foreign key to abonnement: a deleted abonnement must not erase
        -- the record of what was sent to it.
        CREATE TABLE delivery (
            id               bigserial PRIMARY KEY,
            notification_id  bigint NOT NULL REFERENCES notification(id) ON DELETE CASCADE,
            abonnement_id    bigint NOT NULL,
            state            text NOT NULL DEFAULT 'scheduled'
                             CHECK (state IN ('scheduled', 'queued', 'sending',
                                              'delivered', 'failed', 'cancelled')),
            attempts         integer NOT NULL DEFAULT 0,
            due_at           timestamptz NOT NULL DEFAULT now(),
            queued_at        timestamptz,
            claimed_until    timestamptz,
            last_error       text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            finished_at      timestamptz
        );
        CREATE INDEX delivery_notification ON delivery (notification_id);
        CREATE INDEX delivery_due ON delivery (due_at) WHERE state = 'scheduled';
        CREATE INDEX delivery_queued ON delivery (queued_at) WHERE state IN ('queued', 'sending');
        CREATE INDEX delivery_failed ON delivery (abonnement_id, finished_at)
            WHERE state = 'failed';

        CREATE TABLE delivery_attempt (
            id           bigserial PRIMARY KEY,
            delivery_id  bigint NOT NULL REFERENCES delivery(id) ON DELETE CASCADE,
            number       integer NOT NULL,
            started_at   timestamptz NOT NULL,
            duration_ms  integer NOT NULL,
            status_code  integer,
            error_class  text,
            error_text   text,
            outcome      text NOT NULL CHECK (outcome IN ('success', 'failure'))
        );
        CREATE INDEX delivery_attempt_delivery ON delivery_attempt (delivery_id);

        CREATE TABLE circuit (
            abonnement_id         bigint PRIMARY KEY,
            consecutive_failures  integer NOT NULL DEFAULT 0,
            open_until            timestamptz
        );
        """
    )
