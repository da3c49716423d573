"""The effects ledger: one row per side effect, keyed by its idempotency key.

key = sha256(spec id, step id, canonical payload). A row is written *before*
the effect acts (status `started`, with what its compensation will need), and
moved to `done` with the result after. Executing a key that is `done` returns
the recorded result without acting again; a step that was already executed
with a different payload is refused. Compensation moves a row to
`compensated`, or to `needs_human` when it keeps failing.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field, Session, SQLModel, select

from relay.registry import Registry, utcnow

STARTED, DONE, COMPENSATED, FAILED, NEEDS_HUMAN = "started", "done", "compensated", "failed", "needs_human"


class EffectConflict(Exception):
    """The same step (or key) was already executed with a different payload."""


class EffectRecord(SQLModel, table=True):
    __tablename__ = "relay_effect"
    __table_args__ = (UniqueConstraint("spec_id", "step", name="uq_effect_step"),)

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, index=True)
    spec_id: str = Field(index=True)
    run_id: str
    step: str
    effect: str
    reversible: bool = True
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    payload_hash: str
    status: str = STARTED
    undo: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = None
    compensation_attempts: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


def canonical(payload: dict[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def payload_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


def idempotency_key(spec_id: str, step: str, payload: dict[str, Any]) -> str:
    raw = canonical({"spec": spec_id, "step": step, "payload": payload})
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Ledger:
    def __init__(self, registry: Registry) -> None:
        self.engine = registry.engine

    def get(self, key: str) -> EffectRecord | None:
        with Session(self.engine) as db:
            return db.exec(select(EffectRecord).where(EffectRecord.key == key)).first()

    def register(self, *, spec_id: str, run_id: str, step: str, effect: str, reversible: bool,
                 payload: dict[str, Any], key: str | None = None,
                 undo: dict[str, Any] | None = None) -> tuple[EffectRecord, bool]:
        """The row for this effect, created as `started` (with `undo`, what its compensation
        will need) if new; an existing row keeps its own. Returns (row, created).

        Raises EffectConflict when the step or key is already recorded with another payload.
        """
        digest = payload_hash(payload)
        key = key or idempotency_key(spec_id, step, payload)
        for _ in range(2):
            existing = self._find(spec_id, step, key)
            if existing is not None:
                if existing.payload_hash != digest or existing.effect != effect:
                    raise EffectConflict(
                        f"effect {existing.effect!r} step {step!r} of spec {spec_id} was already "
                        f"executed with a different payload (key {existing.key}); refusing to reuse it")
                return existing, False
            row = EffectRecord(key=key, spec_id=spec_id, run_id=run_id, step=step, effect=effect,
                               reversible=reversible, payload=payload, payload_hash=digest, undo=undo)
            try:
                with Session(self.engine, expire_on_commit=False) as db:
                    db.add(row)
                    db.commit()
                    return row, True
            except IntegrityError:
                continue  # a concurrent attempt registered it: read theirs
        raise EffectConflict(f"could not register effect {effect!r} step {step!r}")

    def for_step(self, spec_id: str, step: str) -> EffectRecord | None:
        with Session(self.engine) as db:
            return db.exec(select(EffectRecord).where(
                EffectRecord.spec_id == spec_id, EffectRecord.step == step)).first()

    def _find(self, spec_id: str, step: str, key: str) -> EffectRecord | None:
        with Session(self.engine) as db:
            return db.exec(select(EffectRecord).where(
                (EffectRecord.key == key) | ((EffectRecord.spec_id == spec_id) & (EffectRecord.step == step))
            )).first()

    def update(self, key: str, *, only_from: tuple[str, ...] | None = None,
               **fields: Any) -> EffectRecord:
        """Update a row; with `only_from`, only while its status is one of those (a late act
        must not turn a compensated row back into done)."""
        with Session(self.engine, expire_on_commit=False) as db:
            row = db.exec(select(EffectRecord).where(EffectRecord.key == key).with_for_update()).one()
            if only_from is not None and row.status not in only_from:
                raise EffectConflict(f"effect {row.effect} step {row.step} is {row.status} already; "
                                     "its late result is not recorded")
            for name, value in fields.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            db.add(row)
            db.commit()
            return row

    def effects(self, spec_id: str, run_id: str | None = None) -> list[EffectRecord]:
        with Session(self.engine) as db:
            query = select(EffectRecord).where(EffectRecord.spec_id == spec_id)
            if run_id is not None:
                query = query.where(EffectRecord.run_id == run_id)
            return list(db.exec(query.order_by(EffectRecord.id)).all())  # type: ignore[arg-type]

    def to_compensate(self, spec_id: str, run_id: str | None = None) -> list[EffectRecord]:
        """Reversible effects still in the world, newest first; runs that delivered are final.

        A run in which any irreversible effect completed — or started and never reported back,
        so it may have happened — is never compensated automatically.
        """
        rows = self.effects(spec_id, run_id)
        final_runs = {r.run_id for r in rows if not r.reversible and r.status in (DONE, STARTED)}
        return [r for r in reversed(rows)
                if r.reversible and r.run_id not in final_runs
                and r.status in (STARTED, DONE, FAILED, NEEDS_HUMAN)]
