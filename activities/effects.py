"""Executing side effects through the ledger, and compensating them.

`EffectExecutor` is shared by the `run_effect` activity (workspace, commits,
delivery, adopters' hooks) and by the constructor's file tools inside an agent
turn, so every side effect takes the same path: register (with its
compensation's snapshot) → act → record done.

The ledger lives in the registry, which can be unreachable for a while. Before
acting, an outage is retried patiently and then raised as RegistryUnavailable:
retryable, and never the effect's own failure. After acting, recording `done`
is bookkeeping: it is retried on its own patient schedule (the activity keeps
heartbeating), never counts as the effect failing and never rolls anything
back; should the attempt end anyway, the next one acts again, which an effect
("ensure", not "do") must allow.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import finish_first, patience, patiently, with_heartbeat
from activities.model_errors import registry_error
from relay.effects import EffectContext, EffectFailed, EffectRegistry, UnknownEffect
from relay.failpoints import Failpoints
from relay.ledger import COMPENSATED, DONE, FAILED, NEEDS_HUMAN, STARTED, EffectConflict, EffectRecord, Ledger
from relay.models import (
    CompensateInput, EffectInput, EffectRef, EffectResult, NeedsHumanInput, PendingCompensationsInput,
)
from relay.registry import patiently as patiently_sync

T = TypeVar("T")
log = structlog.get_logger("relay.effects")

# Recording a failure is worth a short wait only: the effect's own error is waiting to be reported.
FAILURE_NOTE_PATIENCE_S = 5.0


def _ledger(fn: Callable[..., T], *args: Any, what: str, budget_s: float | None = None,
            **kwargs: Any) -> T:
    """A ledger call from a worker thread, retried through a registry outage for as long as the
    attempt allows (see heartbeat.patience)."""
    return patiently_sync(fn, *args, what=what, budget_s=patience() if budget_s is None else budget_s,
                          **kwargs)


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
        if definition.take_snapshot is not None and _ledger(
                self.ledger.for_step, spec_id, step, what="ledger.for_step") is None:
            # what the compensation needs is taken before acting and stored with the new row;
            # a retry finds its row, with the first attempt's snapshot, and takes none
            probe = EffectContext(spec_id=spec_id, run_id=run_id, key=key or "", data_dir=self.data_dir)
            undo = definition.take_snapshot(probe, payload)
        # safe to repeat: a registration that landed before its connection broke is found again
        row, _ = _ledger(self.ledger.register, spec_id=spec_id, run_id=run_id, step=step,
                         effect=effect, reversible=definition.reversible, payload=payload, key=key,
                         undo=undo, what="ledger.register")
        if row.status == DONE:
            return row, True
        if row.status in (COMPENSATED, NEEDS_HUMAN):
            raise EffectConflict(f"effect {effect} step {step} was already compensated; not acting again")
        ctx = EffectContext(spec_id=spec_id, run_id=run_id, key=row.key, data_dir=self.data_dir)
        try:
            result = definition.act(ctx, payload)
        except Exception as exc:
            self._note(row.key, "effect.failure_not_recorded", only_from=(STARTED, FAILED),
                       status=FAILED, error=_line(exc))
            raise
        self.failpoints.hit("effect.after_act", effect)
        # The effect happened. What follows is bookkeeping: an outage is waited out, not failed.
        # `done` already is fine: a retried write whose first try landed before its connection
        # broke (or a concurrent attempt of this same ensure) finds it so.
        row = _ledger(self.ledger.update, row.key, only_from=(STARTED, FAILED, DONE), status=DONE,
                      result=result, error=None, what=f"ledger.done {effect}")
        self.failpoints.hit("effect.after_ledger", effect)
        return row, False

    def _note(self, key: str, event: str, **fields: Any) -> None:
        """Record something about a failure that is already being raised: a failure to record
        it is logged, never raised in its place."""
        try:
            _ledger(self.ledger.update, key, what="ledger.update",
                    budget_s=min(FAILURE_NOTE_PATIENCE_S, patience()), **fields)
        except Exception as exc:  # noqa: BLE001
            log.warning(event, key=key, error=_line(exc))

    def compensate(self, key: str) -> EffectRecord:
        row = _ledger(self.ledger.get, key, what="ledger.get")
        if row is None:
            raise KeyError(f"no effect with key {key}")
        if row.status == COMPENSATED:
            return row
        definition = self.effects.get(row.effect)
        if definition.undo is None:
            raise EffectConflict(f"effect {row.effect} is irreversible")
        ctx = EffectContext(spec_id=row.spec_id, run_id=row.run_id, key=row.key, data_dir=self.data_dir)
        _ledger(self.ledger.update, key, compensation_attempts=row.compensation_attempts + 1,
                what="ledger.update")  # an absolute value: safe to repeat
        definition.undo(ctx, row.payload, row.undo, row.result)
        self.failpoints.hit("compensate.after_undo", row.effect)
        # undone: recording it is bookkeeping, like an effect's `done`
        return _ledger(self.ledger.update, key, status=COMPENSATED, error=None,
                       what=f"ledger.compensated {row.effect}")


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500]


def effect_error(exc: Exception, attempt: int, max_attempts: int) -> ApplicationError:
    """How a failed effect reaches Temporal, in one place: a registry outage is not the effect's
    failure and stays retryable whatever the attempt (the retry policy alone bounds it); a
    conflict or an unknown effect never retries; an effect's own non-retryable failure stops at
    once; anything else retries until max_attempts (0: the retry policy decides)."""
    if (outage := registry_error(exc)) is not None:
        return outage
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
        try:
            rows = await patiently(self.executor.ledger.to_compensate, inp.spec_id, inp.run_id,
                                   what="ledger.to_compensate")
        except Exception as exc:
            raise registry_error(exc) or exc from None
        return [effect_ref(r) for r in rows]

    @activity.defn(name="compensate_effect")
    async def compensate_effect(self, inp: CompensateInput) -> EffectRef:
        try:
            return effect_ref(await with_heartbeat(finish_first(asyncio.to_thread(
                self.executor.compensate, inp.key))))
        except Exception as exc:
            if (outage := registry_error(exc)) is not None:
                raise outage from None  # not the compensation's failure: retried as such
            await asyncio.to_thread(self.executor._note, inp.key,
                                    "compensation.failure_not_recorded", error=_line(exc))
            raise ApplicationError(f"compensation failed: {_line(exc)}",
                                   type="CompensationFailed") from None

    @activity.defn(name="mark_needs_human")
    async def mark_needs_human(self, inp: NeedsHumanInput) -> EffectRef:
        try:
            row = await patiently(self.executor.ledger.update, inp.key, status=NEEDS_HUMAN,
                                  error=inp.reason, what="ledger.needs_human")
        except Exception as exc:
            raise registry_error(exc) or exc from None
        return effect_ref(row)
