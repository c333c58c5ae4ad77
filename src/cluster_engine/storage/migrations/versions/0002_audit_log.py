"""Audit trail: one row per create, update and delete, written in the change's own transaction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("image_id", sa.Uuid, nullable=False),
        sa.Column("actor_org", sa.Uuid, nullable=True),
        sa.Column("actor", sa.Text, nullable=True),
        sa.Column("changes", sa.JSON, nullable=False),
    )
    op.create_index("ix_audit_log_image_id", "audit_log", ["image_id"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    op.drop_table("audit_log")
