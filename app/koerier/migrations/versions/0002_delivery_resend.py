"""Deliveries remember where their current retry series began, so a resend starts afresh.

``retry_from`` is the number of attempts made before the last resend: the retry schedule
and the retry limit count only the attempts after it, while attempt numbers go on rising.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE delivery ADD COLUMN retry_from integer NOT NULL DEFAULT 0;
        """
    )
