"""Executing side effects through the ledger, and compensating them.

`EffectExecutor` is shared by the `run_effect` activity (workspace, commits,
delivery, adopters' hooks) and by the constructor's file tools inside an agent
turn, so every side effect takes the same path: register (with its
compensation's snapshot) → act → record done.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import finish_first, with_heartbeat
from relay.effects import EffectContext, EffectFailed, EffectRegistry, UnknownEffect
from relay.failpoints import Failpoints
from relay.ledger import COMPENSATED, DONE, FAILED, NEEDS_HUMAN, STARTED, EffectConflict, EffectRecord, Ledger
from relay.models import (
    CompensateInput, EffectInput, EffectRef, EffectResult, NeedsHumanInput, PendingCompensationsInput,
)


def effect_ref(row: EffectRecord) -> EffectRef:
    return EffectRef(key=row.key, effect=row.effect, step=row.step, status=row.status,
                     reversible=row.reversible, error=row.error)


class EffectExecutor:
    def __init__(self, ledger: Ledger, effects: EffectRegistry, data_dir: Path,
                 failpoints: Failpoints | None = None) -> None:
        self.ledger = ledger
        self.effects = effects
        self.data_dir = data_dir
        self.failpoints = failpoints or Failpoints()

    def execute(self, *, spec_id: str, run_id: str, step: str, effect: str, payload: dict,
                key: str | None = None, reversible_only: bool = False) -> tuple[EffectRecord, bool]:
        """Run the effect once per idempotency key. Returns (ledger row, served from the ledger)."""
        definition = self.effects.get(effect)
        if reversible_only and not definition.reversible:
            raise EffectConflict(f"effect {effect!r} is irreversible and cannot run before approval")
        undo = None
        if definition.take_snapshot is not None and self.ledger.for_step(spec_id, step) is None:
            # what the compensation needs is taken before acting and stored with the new row;
            # a retry finds its row, with the first attempt's snapshot, and takes none
            probe = EffectContext(spec_id=spec_id, run_id=run_id, key=key or "", data_dir=self.data_dir)
            undo = definition.take_snapshot(probe, payload)
        row, _ = self.ledger.register(spec_id=spec_id, run_id=run_id, step=step, effect=effect,
                                      reversible=definition.reversible, payload=payload, key=key,
                                      undo=undo)
        if row.status == DONE:
            return row, True
        if row.status in (COMPENSATED, NEEDS_HUMAN):
            raise EffectConflict(f"effect {effect} step {step} was already compensated; not acting again")
        ctx = EffectContext(spec_id=spec_id, run_id=run_id, key=row.key, data_dir=self.data_dir)
        try:
            result = definition.act(ctx, payload)
        except Exception as exc:
            self.ledger.update(row.key, only_from=(STARTED, FAILED), status=FAILED,
                               error=_line(exc))
            raise
        self.failpoints.hit("effect.after_act", effect)
        row = self.ledger.update(row.key, only_from=(STARTED, FAILED), status=DONE, result=result,
                                 error=None)
        self.failpoints.hit("effect.after_ledger", effect)
        return row, False

    def compensate(self, key: str) -> EffectRecord:
        row = self.ledger.get(key)
        if row is None:
            raise KeyError(f"no effect with key {key}")
        if row.status == COMPENSATED:
            return row
        definition = self.effects.get(row.effect)
        if definition.undo is None:
            raise EffectConflict(f"effect {row.effect} is irreversible")
        ctx = EffectContext(spec_id=row.spec_id, run_id=row.run_id, key=row.key, data_dir=self.data_dir)
        self.ledger.update(key, compensation_attempts=row.compensation_attempts + 1)
        definition.undo(ctx, row.payload, row.undo, row.result)
        self.failpoints.hit("compensate.after_undo", row.effect)
        return self.ledger.update(key, status=COMPENSATED, error=None)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def effect_error(exc: Exception, attempt: int, max_attempts: int) -> ApplicationError:
    """How a failed effect reaches Temporal, in one place: a conflict or an unknown effect never
    retries; an effect's own non-retryable failure stops at once; anything else retries until
    max_attempts (0: the retry policy decides)."""
    if isinstance(exc, (EffectConflict, UnknownEffect)):
        return ApplicationError(_line(exc), type=type(exc).__name__, non_retryable=True)
    final = (isinstance(exc, EffectFailed) and not exc.retryable) or (
        bool(max_attempts) and attempt >= max_attempts)
    return ApplicationError(_line(exc), type="EffectFailed", non_retryable=final)


class EffectActivities:
    def __init__(self, executor: EffectExecutor) -> None:
        self.executor = executor

    @activity.defn(name="run_effect")
    async def run_effect(self, inp: EffectInput) -> EffectResult:
        info = activity.info()
        try:
            row, replayed = await with_heartbeat(finish_first(asyncio.to_thread(
                self.executor.execute, spec_id=inp.spec_id, run_id=info.workflow_run_id,
                step=inp.step, effect=inp.effect, payload=inp.payload, key=inp.key,
                reversible_only=inp.reversible_only)))
        except Exception as exc:
            raise effect_error(exc, info.attempt, inp.max_attempts) from None
        return EffectResult(key=row.key, effect=row.effect, status=row.status,
                            result=row.result or {}, replayed=replayed)

    @activity.defn(name="pending_compensations")
    async def pending_compensations(self, inp: PendingCompensationsInput) -> list[EffectRef]:
        rows = await asyncio.to_thread(self.executor.ledger.to_compensate, inp.spec_id, inp.run_id)
        return [effect_ref(r) for r in rows]

    @activity.defn(name="compensate_effect")
    async def compensate_effect(self, inp: CompensateInput) -> EffectRef:
        try:
            return effect_ref(await with_heartbeat(finish_first(asyncio.to_thread(
                self.executor.compensate, inp.key))))
        except Exception as exc:
            await asyncio.to_thread(self.executor.ledger.update, inp.key,
                                    error=_line(exc))
            raise ApplicationError(f"compensation failed: {exc}", type="CompensationFailed") from None

    @activity.defn(name="mark_needs_human")
    async def mark_needs_human(self, inp: NeedsHumanInput) -> EffectRef:
        row = await asyncio.to_thread(self.executor.ledger.update, inp.key, status=NEEDS_HUMAN,
                                      error=inp.reason)
        return effect_ref(row)
