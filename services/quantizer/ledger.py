"""The SQL side of :class:`services.quantizer.handlers.Ledger`: row + outbox event, one commit."""

from __future__ import annotations

from collections.abc import Callable

from sqlmodel import col, select

from services.quantizer.models import QuantizedModel
from shared.db import Database
from shared.events import Event
from shared.outbox import record_event
from shared.subjects import Namespace

SERVICE = "quantizer"


class SqlLedger:
    def __init__(
        self, db: Database, ns: Namespace, *, on_commit: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.ns = ns
        self.on_commit = on_commit

    async def decided_formats(self, adapter_id: str) -> set[str]:
        async with self.db.session() as session:
            rows = await session.exec(
                select(QuantizedModel.format).where(col(QuantizedModel.adapter_id) == adapter_id)
            )
            return set(rows.all())

    async def record(self, row: QuantizedModel, event: Event) -> bool:
        from sqlalchemy.exc import IntegrityError

        try:
            async with self.db.session() as session:
                session.add(row)
                record_event(session, event, service=SERVICE, ns=self.ns)
                await session.flush()
        except IntegrityError:
            return False  # another delivery decided this (adapter, format) first
        if self.on_commit:
            self.on_commit()
        return True

    async def rows(self, adapter_id: str | None = None) -> list[QuantizedModel]:
        async with self.db.session() as session:
            query = select(QuantizedModel).order_by(col(QuantizedModel.id))
            if adapter_id is not None:
                query = query.where(col(QuantizedModel.adapter_id) == adapter_id)
            return list((await session.exec(query)).all())
