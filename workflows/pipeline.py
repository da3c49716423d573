"""SpecPipeline: clarifier → planner → auditor → constructor → validator, durably.

Deterministic orchestration only. Every model call and registry write is an
activity; the workflow holds structured outputs and session references, never
conversation bodies. It waits for a human (the clarifier's questions) without
a timer unless the spec sets a deadline, and it fails — never hangs — when a
turn cannot be completed.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    import structlog
    from pydantic import ValidationError

    from relay.models import (
        PHASE_SEARCH_ATTRIBUTE, ROLES, WORKFLOW_TYPE, AgentTurnInput, AgentTurnResult, AnswerAck,
        AnswerInput, Audit, Change, Clarification, OpenSpecInput, OpenSpecResult, PendingQuestions,
        Phase, PipelineResult, Plan, Question, Role, SessionStateInput, SpecInput, Status,
        Validation,
    )
    from workflows import render

log = structlog.get_logger("relay.workflow")
PHASE = SearchAttributeKey.for_keyword(PHASE_SEARCH_ATTRIBUTE)
BOOKKEEPING = dict(start_to_close_timeout=timedelta(seconds=30),
                   retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=10)))


class SpecFailed(Exception):
    """A step that cannot complete; the run ends failed with this reason."""


@workflow.defn(name=WORKFLOW_TYPE, failure_exception_types=[ValidationError])
class SpecPipeline:
    @workflow.init
    def __init__(self, inp: SpecInput) -> None:
        self._limits = inp.limits
        self._status = Status(spec_id=workflow.info().workflow_id)
        self._turns: dict[Role, int] = {}
        self._answers: dict[str, str] | None = None
        self._opened = False

    # --- run ---------------------------------------------------------------------

    @workflow.run
    async def run(self, inp: SpecInput) -> PipelineResult:
        try:
            self._check_request(inp.request)
            opened = await self._open(inp)
            spec = await self._clarify(inp, opened)
            plan, plan_ok = await self._plan_and_audit(spec)
            change = validation = None
            outcome = "plan_rejected"
            if plan_ok:
                change, validation = await self._construct_and_validate(spec, plan)
                outcome = "approved" if validation.approved else "change_rejected"
            self._status.outcome = outcome
            await self._close(Phase.completed, session_state="done", spec_status="completed")
            await workflow.wait_condition(workflow.all_handlers_finished)
            return PipelineResult(
                spec_id=self._status.spec_id, iteration=self._status.iteration, outcome=outcome,
                clarified_spec=spec, plan=plan, change=change, validation=validation,
                flags=self._status.flags, usage=self._status.usage, models=self._status.models)
        except asyncio.CancelledError:
            self._status.error = "cancelled"
            await self._close(Phase.cancelled, session_state="idle", spec_status="cancelled")
            raise
        except SpecFailed as failure:
            self._status.error = str(failure)
            log.error("spec.failed", reason=str(failure))
            await self._close(Phase.failed, session_state="idle", spec_status="failed")
            raise ApplicationError(str(failure), type="SpecFailed", non_retryable=True) from None

    def _check_request(self, request: str) -> None:
        if not request.strip():
            raise SpecFailed("the request is empty")
        size = len(request.encode("utf-8"))
        if size > self._limits.max_request_bytes:
            raise SpecFailed(f"the request is {size} bytes; the limit is "
                             f"{self._limits.max_request_bytes} bytes")

    async def _open(self, inp: SpecInput) -> OpenSpecResult:
        info = workflow.info()
        try:
            opened = await workflow.execute_activity(
                "open_spec", OpenSpecInput(spec_id=info.workflow_id, run_id=info.run_id,
                                           request=inp.request, iterate=inp.iterate),
                result_type=OpenSpecResult, summary="open spec in registry", **BOOKKEEPING)
        except ActivityError as err:
            raise SpecFailed(_reason(err)) from None
        self._opened = True
        self._status.iteration = opened.iteration
        self._status.sessions = opened.sessions
        self._turns = {s.role: s.turns for s in opened.sessions}
        log.info("spec.opened", iteration=opened.iteration)
        return opened

    async def _close(self, phase: Phase, *, session_state: str, spec_status: str) -> None:
        self._set_phase(phase, None)
        if not self._opened:
            return
        failed = {s.role for s in self._status.sessions if s.state == "failed"}
        roles = [r for r in ROLES if r not in failed]
        for ref in self._status.sessions:
            if ref.role not in failed:
                ref.state = session_state
        await workflow.execute_activity(
            "set_session_states",
            SessionStateInput(spec_id=self._status.spec_id, state=session_state, roles=roles,
                              spec_status=spec_status, outcome=self._status.outcome),
            summary=f"close spec: {spec_status}", **BOOKKEEPING)

    # --- the three stages ------------------------------------------------------------

    async def _clarify(self, inp: SpecInput, opened: OpenSpecResult) -> str:
        self._set_phase(Phase.clarifying, Role.clarifier)
        if opened.iteration > 1:
            result = await self._turn(Role.clarifier, "iterate", request=inp.request,
                                      iteration=str(opened.iteration))
        else:
            result = await self._turn(Role.clarifier, "clarify", request=inp.request)
        asked: list[tuple[Question, str]] = []
        for round_no in range(1, self._limits.max_clarify_rounds + 1):
            clarification = Clarification.model_validate(result.output)
            if not clarification.questions:
                return clarification.clarified_spec or ""
            answers = await self._wait_for_answers(round_no, clarification.questions)
            if answers is None:
                self._flag("answers_timed_out")
                break
            asked += [(q, answers[q.id]) for q in clarification.questions]
            result = await self._turn(Role.clarifier, "answers",
                                      answers=render.answers(clarification.questions, answers))
        else:
            clarification = Clarification.model_validate(result.output)
            if not clarification.questions:
                return clarification.clarified_spec or ""
        self._flag("clarification_incomplete")
        result = await self._turn(Role.clarifier, "finalize")
        clarification = Clarification.model_validate(result.output)
        if clarification.questions:  # still asking: go on with the best spec so far
            return render.best_spec_so_far(opened.original_request, inp.request, asked)
        return clarification.clarified_spec or ""

    async def _plan_and_audit(self, spec: str) -> tuple[Plan, bool]:
        self._set_phase(Phase.planning, Role.planner)
        iteration = str(self._status.iteration)
        plan = Plan.model_validate((await self._turn(Role.planner, "plan", spec=spec,
                                                     iteration=iteration)).output)
        for round_no in range(1, self._limits.max_audit_rounds + 1):
            self._status.rounds["audit"] = round_no
            self._set_phase(Phase.auditing, Role.auditor)
            audit = Audit.model_validate((await self._turn(
                Role.auditor, "audit", spec=spec, plan=render.plan(plan))).output)
            if audit.approved:
                return plan, True
            if round_no == self._limits.max_audit_rounds:
                self._flag("plan_not_approved")
                return plan, False
            self._set_phase(Phase.planning, Role.planner)
            plan = Plan.model_validate((await self._turn(
                Role.planner, "revise", findings=render.bullets(audit.findings))).output)
        raise AssertionError("unreachable")

    async def _construct_and_validate(self, spec: str, plan: Plan) -> tuple[Change, Validation]:
        self._set_phase(Phase.constructing, Role.constructor)
        change = Change.model_validate((await self._turn(
            Role.constructor, "construct", spec=spec, plan=render.plan(plan))).output)
        for round_no in range(1, self._limits.max_fix_rounds + 1):
            self._status.rounds["validate"] = round_no
            self._set_phase(Phase.validating, Role.validator)
            validation = Validation.model_validate((await self._turn(
                Role.validator, "validate", spec=spec, plan=render.plan(plan),
                change=render.change(change))).output)
            if validation.approved or round_no == self._limits.max_fix_rounds:
                if not validation.approved:
                    self._flag("change_not_approved")
                return change, validation
            self._set_phase(Phase.constructing, Role.constructor)
            change = Change.model_validate((await self._turn(
                Role.constructor, "fix", failures=render.bullets(validation.failures))).output)
        raise AssertionError("unreachable")

    # --- one agent turn ----------------------------------------------------------------

    async def _turn(self, role: Role, kind: str, **variables: str) -> AgentTurnResult:
        self._turns[role] = self._turns.get(role, 0) + 1
        turn = self._turns[role]
        self._session_state(role, "running")
        limits = self._limits
        try:
            result = await workflow.execute_activity(
                "agent_turn",
                AgentTurnInput(spec_id=self._status.spec_id, role=role, turn=turn, kind=kind,
                               variables=variables),
                result_type=AgentTurnResult,
                start_to_close_timeout=timedelta(seconds=limits.turn_timeout_s),
                heartbeat_timeout=timedelta(seconds=limits.heartbeat_timeout_s),
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                         maximum_interval=timedelta(seconds=60),
                                         maximum_attempts=limits.model_max_attempts),
                summary=f"{role.value} turn {turn} ({kind})",
            )
        except ActivityError as err:
            self._session_state(role, "failed" if _is_invalid_output(err) else "idle")
            raise SpecFailed(f"{role.value} turn {turn} failed: {_reason(err)}") from None
        self._session_state(role, "idle")
        self._status.usage = self._status.usage + result.usage
        by_role = self._status.usage_by_role
        by_role[role.value] = by_role[role.value] + result.usage if role.value in by_role else result.usage
        if result.model not in self._status.models:
            self._status.models.append(result.model)
        if result.repaired:
            self._flag(f"{role.value}_output_repaired")
        return result

    # --- waiting for a human --------------------------------------------------------------

    async def _wait_for_answers(self, round_no: int, questions: list[Question]) -> dict[str, str] | None:
        self._status.rounds["clarify"] = round_no
        self._status.pending = PendingQuestions(round=round_no, questions=questions)
        self._answers = None
        self._set_phase(Phase.waiting_for_answers, Role.clarifier)
        self._session_state(Role.clarifier, "waiting")
        await workflow.execute_activity(
            "set_session_states",
            SessionStateInput(spec_id=self._status.spec_id, state="waiting", roles=[Role.clarifier]),
            summary="clarifier waits for answers", **BOOKKEEPING)
        timeout = self._limits.answer_timeout_s
        try:
            await workflow.wait_condition(
                lambda: self._answers is not None,
                timeout=timedelta(seconds=timeout) if timeout else None,
                timeout_summary="answer deadline")
        except asyncio.TimeoutError:
            return None
        finally:
            self._status.pending = None
            self._session_state(Role.clarifier, "idle")
            self._set_phase(Phase.clarifying, Role.clarifier)
        return self._answers

    def _check_answers(self, answers: dict[str, str]) -> dict[str, str]:
        pending = self._status.pending
        if pending is None or self._answers is not None:
            raise ValueError(f"no questions are pending (phase: {self._status.phase.value})")
        known = {q.id for q in pending.questions}
        unknown = sorted(set(answers) - known)
        if unknown:
            raise ValueError(f"unknown question ids {unknown}; pending: {sorted(known)}")
        cleaned = {k: v.strip() for k, v in answers.items()}
        missing = sorted(k for k in known if not cleaned.get(k))
        if missing:
            raise ValueError(f"missing answers for {missing}")
        return cleaned

    @workflow.update
    def answer(self, inp: AnswerInput) -> AnswerAck:
        """Answer every pending question: {"answers": {"q1": "...", "q2": "..."}}."""
        self._answers = self._check_answers(inp.answers)
        pending = self._status.pending
        return AnswerAck(accepted=sorted(self._answers), round=pending.round if pending else 0)

    @answer.validator
    def _validate_answer(self, inp: AnswerInput) -> None:
        self._check_answers(inp.answers)

    @workflow.signal
    def answer_signal(self, payload: Any) -> None:
        """Same as the `answer` update, for senders that cannot wait (Web UI signal form)."""
        try:
            self._answers = self._check_answers(AnswerInput.model_validate(payload).answers)
        except (ValueError, ValidationError) as err:
            reason = f"answer_signal rejected: {_one_line(str(err))}"
            self._status.rejected_inputs.append(reason)
            log.warning("answer.rejected", reason=reason)

    @workflow.query
    def status(self) -> Status:
        return self._status

    # --- state shown to people ------------------------------------------------------------

    def _set_phase(self, phase: Phase, role: Role | None) -> None:
        self._status.phase, self._status.current_role = phase, role
        workflow.upsert_search_attributes([PHASE.value_set(phase.value)])
        workflow.set_current_details(render.details(self._status))

    def _session_state(self, role: Role, state: str) -> None:
        for ref in self._status.sessions:
            if ref.role == role:
                ref.state = state
                if state == "running":
                    ref.turns = self._turns.get(role, ref.turns)

    def _flag(self, flag: str) -> None:
        if flag not in self._status.flags:
            self._status.flags.append(flag)


def _reason(err: ActivityError) -> str:
    cause = err.cause
    message = getattr(cause, "message", None) or str(cause or err)
    retry_state = getattr(err, "retry_state", None)
    if retry_state is not None and retry_state.name == "MAXIMUM_ATTEMPTS_REACHED":
        message += " (gave up after the last retry)"
    return _one_line(message)


def _is_invalid_output(err: ActivityError) -> bool:
    return isinstance(err.cause, ApplicationError) and err.cause.type == "InvalidModelOutput"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
