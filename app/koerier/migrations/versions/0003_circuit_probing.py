"""Circuits remember that a probe is in flight, so waiting deliveries follow it closely.

While ``probing`` is true, ``open_until`` is the probe's lease rather than a failed
subscriber's open period: deliveries that find the circuit so are deferred briefly, and
are sent as soon as the probe's success closes the circuit.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE circuit ADD COLUMN probing boolean NOT NULL DEFAULT false;
        """
    )
