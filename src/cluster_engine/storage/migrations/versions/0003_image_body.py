"""Each image row keeps its served JSON (``images.body``); ``image_products`` goes (no read path used it).

The read model loads an org as one indexed read of ``body`` (no column decoding, no re-encoding), which is
what makes an org's first request cheap. The backfill renders every existing row with the same wire
types the service serves (``cluster_engine.schemas``), in batches, so it runs in bounded memory.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
import sqlalchemy as sa
from alembic import op

from cluster_engine.schemas import ImageResp, ImageType, Partition, json_encoder

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BATCH = 5000

# The columns as typed when this migration was written (not the current metadata, which may move on).
images = sa.table(
    "images",
    sa.column("id", sa.Uuid),
    sa.column("type", sa.String),
    sa.column("org_id", sa.Uuid),
    *(
        sa.column(name, sa.Text)
        for name in [
            "idc",
            "name",
            "path",
            "os_series",
            "os_version",
            "os_architecture",
            "boot_mode",
            "system_disk_size",
            "icon",
        ]
    ),
    sa.column("default_partition_table", sa.JSON),
    sa.column("supported_products", sa.JSON),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("body", sa.LargeBinary),
)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _body(row: Any) -> bytes:
    image = ImageResp(
        id=row.id,
        type=ImageType(row.type),
        orgId=row.org_id,
        idc=row.idc,
        name=row.name,
        path=row.path,
        OSSeries=row.os_series,
        OSVersion=row.os_version,
        OSArchitecture=row.os_architecture,
        BootMode=row.boot_mode,
        SystemDiskSize=row.system_disk_size,
        DefaultPartitionTable=msgspec.convert(row.default_partition_table, list[Partition]),
        icon=row.icon,
        supportedProducts=list(row.supported_products),
        createdAt=_utc(row.created_at),
    )
    return json_encoder.encode(image)


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("body", sa.LargeBinary, nullable=True))
    bind = op.get_bind()
    after = None
    while True:  # keyset pagination by id: bounded memory at any catalog size
        query = sa.select(images).order_by(images.c.id).limit(BATCH)
        if after is not None:
            query = query.where(images.c.id > after)
        rows = bind.execute(query).all()
        if not rows:
            break
        bind.execute(
            images.update().where(images.c.id == sa.bindparam("b_id")).values(body=sa.bindparam("b_body")),
            [{"b_id": row.id, "b_body": _body(row)} for row in rows],
        )
        after = rows[-1].id
    with op.batch_alter_table("images") as batch:
        batch.alter_column("body", existing_type=sa.LargeBinary, nullable=False)
    op.drop_table("image_products")


def downgrade() -> None:
    # The column goes first: on SQLite that rebuilds ``images`` (a DROP TABLE), which would cascade
    # into product rows made before it.
    with op.batch_alter_table("images") as batch:
        batch.drop_column("body")
    op.create_table(
        "image_products",
        sa.Column("image_id", sa.Uuid, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("product", sa.String(256), primary_key=True),
    )
    op.create_index("ix_image_products_product", "image_products", ["product"])
    bind = op.get_bind()
    products = sa.table("image_products", sa.column("image_id", sa.Uuid), sa.column("product", sa.String))
    rows = bind.execute(sa.select(images.c.id, images.c.supported_products)).all()
    pairs = [{"image_id": row.id, "product": p} for row in rows for p in row.supported_products]
    for start in range(0, len(pairs), BATCH):
        bind.execute(products.insert(), pairs[start : start + BATCH])
