"""Registry bookkeeping the workflow asks for: open a run, mark session states, close it."""

from __future__ import annotations

import asyncio

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from relay.models import (
    ROLES, Budget, GateRecordInput, OpenSpecInput, OpenSpecResult, SessionRef,
    SessionStateInput, WorkspaceInput,
)
from relay.pricing import PriceTable, load_prices, spec_cost
from relay.registry import GateRecord, Registry, SpecConflict


log = structlog.get_logger("relay.registry")


class RegistryActivities:
    def __init__(self, registry: Registry, prices: PriceTable | None = None) -> None:
        self.registry = registry
        self.prices = prices or load_prices()

    @activity.defn(name="open_spec")
    async def open_spec(self, inp: OpenSpecInput) -> OpenSpecResult:
        """Record the run (iteration number, idempotent per run id) and resolve all five sessions."""
        try:
            spec = await asyncio.to_thread(
                self.registry.open_spec, inp.spec_id, inp.run_id, inp.request, inp.iterate,
                inp.workspace.model_dump() if inp.workspace else None,
                (inp.budget.usd, inp.budget.tokens) if inp.budget else None)
        except SpecConflict as exc:
            # an expected refusal (e.g. a raw `temporal workflow start` on an existing spec id):
            # BENIGN logs it at debug level, without a traceback, and records no failure metric
            raise ApplicationError(str(exc), type="SpecConflict", non_retryable=True,
                                   category=ApplicationErrorCategory.BENIGN) from None
        refs = []
        for role in ROLES:
            session, _ = await asyncio.to_thread(self.registry.resolve_session, inp.spec_id, role)
            refs.append(SessionRef(role=role, session_id=session.id, name=session.name,
                                   state=session.status, turns=session.turns))
        spend = spec_cost(*await asyncio.to_thread(self.registry.spend, inp.spec_id), self.prices)
        return OpenSpecResult(spec_id=spec.spec_id, iteration=spec.iteration,
                              original_request=spec.request, sessions=refs,
                              workspace=WorkspaceInput.model_validate(spec.workspace)
                              if spec.workspace else None,
                              budget=Budget(usd=spec.budget_usd, tokens=spec.budget_tokens),
                              spend=spend)

    @activity.defn(name="set_session_states")
    async def set_session_states(self, inp: SessionStateInput) -> None:
        await asyncio.to_thread(self.registry.set_status, inp.spec_id, inp.roles, inp.state)
        if inp.budget is not None:  # a budget raised during the run holds for the next iteration
            await asyncio.to_thread(self.registry.set_budget, inp.spec_id, inp.budget.usd,
                                    inp.budget.tokens)
        if inp.spec_status is not None:
            await asyncio.to_thread(self.registry.close_spec, inp.spec_id, inp.spec_status, inp.outcome)
            # logged here, once per run: workflow code may replay (e.g. to answer a query)
            (log.error if inp.spec_status == "failed" else log.info)(
                "spec.closed", spec_id=inp.spec_id, status=inp.spec_status, outcome=inp.outcome,
                error=inp.error)

    @activity.defn(name="record_gate")
    async def record_gate(self, inp: GateRecordInput) -> str:
        """Record a Gate 2 decision once (idempotent on its key); returns when it was made."""
        row = await asyncio.to_thread(self.registry.add_gate_record, GateRecord(
            spec_id=inp.spec_id, iteration=inp.iteration, key=inp.key, kind="decision",
            decision=inp.decision, decided_by=inp.decided_by, reason=inp.reason,
            diff=inp.steps or None))
        log.info("gate.decision", spec_id=inp.spec_id, key=inp.key, decision=row.decision,
                 decided_by=row.decided_by)
        return row.created_at.isoformat()
