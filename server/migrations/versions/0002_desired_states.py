"""Desired states: signed, versioned per target, with their publish time.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 19:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "desired_states",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("target_kind", sa.String(length=8), nullable=False),
        sa.Column("target_name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=True),
        sa.Column("model_version", sa.BigInteger(), nullable=True),
        sa.Column("bundle_id", sa.String(length=128), nullable=True),
        sa.Column("shadow_model_name", sa.String(length=64), nullable=True),
        sa.Column("shadow_model_version", sa.BigInteger(), nullable=True),
        sa.Column("shadow_bundle_id", sa.String(length=128), nullable=True),
        sa.Column("rollout_id", sa.String(length=128), nullable=True),
        sa.Column("issued", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("payload_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "target_kind", "target_name", "version", name="uq_desired_target_version"
        ),
    )
    with op.batch_alter_table("desired_states", schema=None) as batch_op:
        batch_op.create_index("ix_desired_states_published", ["published_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("desired_states", schema=None) as batch_op:
        batch_op.drop_index("ix_desired_states_published")
    op.drop_table("desired_states")
