"""Initial schema: images, product membership, deletions, catalog revision.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "catalog_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        sa.table("catalog_state", sa.column("id"), sa.column("revision")), [{"id": 1, "revision": 0}]
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("org_id", sa.Uuid, nullable=False),
        sa.Column("namespace", sa.String(36), nullable=False),
        sa.Column("idc", sa.String(50), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("os_series", sa.Text, nullable=False),
        sa.Column("os_version", sa.Text, nullable=False),
        sa.Column("os_architecture", sa.Text, nullable=False),
        sa.Column("boot_mode", sa.String(16), nullable=False),
        sa.Column("system_disk_size", sa.Text, nullable=False),
        sa.Column("icon", sa.Text, nullable=False),
        sa.Column("default_partition_table", sa.JSON, nullable=False),
        sa.Column("supported_products", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("namespace", "idc", "name", name="uq_images_namespace_idc_name"),
    )
    op.create_index("ix_images_revision", "images", ["revision"])
    op.create_index("ix_images_idc", "images", ["idc"])
    op.create_index("ix_images_org_id", "images", ["org_id"])
    op.create_table(
        "image_products",
        sa.Column("image_id", sa.Uuid, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("product", sa.String(256), primary_key=True),
    )
    op.create_index("ix_image_products_product", "image_products", ["product"])
    op.create_table(
        "deleted_images",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_deleted_images_revision", "deleted_images", ["revision"])


def downgrade() -> None:
    op.drop_table("deleted_images")
    op.drop_table("image_products")
    op.drop_table("images")
    op.drop_table("catalog_state")
