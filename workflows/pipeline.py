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
from temporalio.workflow import ActivityCancellationType
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.exceptions import CancelledError as TemporalCancelledError

with workflow.unsafe.imports_passed_through():
    import structlog
    from pydantic import ValidationError

    from relay.models import (
        OUTCOME_SEARCH_ATTRIBUTE, PHASE_SEARCH_ATTRIBUTE, ROLES, WORKFLOW_TYPE,
        AgentTurnInput, AgentTurnResult, AnswerAck, DegradedStep, GatePolicy, GateRecordInput,
        GateReport, ModelWait, RecheckInput, RecheckResult, Source, ChangeReport,
        InspectChangeInput,
        AnswerInput, ApprovalInput, Audit, Change, Clarification, Decision,
        EffectInput, EffectRef, EffectResult, OpenSpecInput, OpenSpecResult,
        PendingQuestions, Phase, PipelineResult, Plan, PrepareWorkspaceInput,
        Question, REJECTED_KEPT, RejectInput, Role, SessionStateInput, SpecInput, Status, Validation,
        WorkspaceInput, WorkspaceRef, spec_id_problem,
    )
    from relay.models import Budget, BudgetWait, RaiseBudgetInput, SpecCost
    from relay.models import (
        PROGRESS_KEPT, ChangeDescription, ChangeDiff, DescribeChangeInput, ProgressEvent, Review,
    )
    from relay.converter import Undecodable
    from workflows import agent_loop, render, saga
    from workflows.outage import through_outages
    from workflows.saga import BOOKKEEPING
    from relay import one_line as _one_line
    from workflows.saga import reason as _reason

log = structlog.get_logger("relay.workflow")
PHASE = SearchAttributeKey.for_keyword(PHASE_SEARCH_ATTRIBUTE)
OUTCOME = SearchAttributeKey.for_keyword(OUTCOME_SEARCH_ATTRIBUTE)


# Runs started before workspaces existed replay without these steps.
WORKSPACE_PATCH = "relay-workspace-1"
# Runs that ended before the RelayOutcome search attribute existed replay without its upsert.
OUTCOME_PATCH = "relay-outcome-1"
# Runs validated before the reviewer's diff existed replay without its describe_change activity.
REVIEW_PATCH = "relay-review-1"

# Progress (`relay watch`, the demo): every step is a numbered event kept in the status (the
# last PROGRESS_KEPT), and a watcher asks the status query for "events after number K". Why
# not temporalio.contrib.workflow_streams (experimental): its subscribers long-poll through
# updates, and every accepted update writes two events into the spec's history, for as long as
# someone watches — a spec that waits a week for a human would fill its history with polls.
# A query writes nothing, needs no handler beyond `status`, works for the raw CLI and the Web
# UI's Queries tab, and relay's steps are seconds apart, so a 0.25 s poll that asks for what
# it has not seen misses nothing (events are numbered; a watcher that fell PROGRESS_KEPT
# events behind is told how many it missed).

# Runs recorded while one `agent_turn` activity ran a whole turn replay through it; new runs
# run the loop in workflow code (workflows/agent_loop.py), one activity per model or tool call.
LOOP_PATCH = "relay-loop-in-workflow-1"

# Which roles' outputs each kind of turn is given (rendered into its prompt): their taint
# flows into it. A turn also inherits its own session's unverified taint (the activity's part).
INPUTS: dict[str, tuple[Role, ...]] = {
    "clarify": (), "answers": (), "finalize": (), "iterate": (),
    "plan": (Role.clarifier,), "revise": (Role.auditor,),
    "audit": (Role.clarifier, Role.planner),
    "construct": (Role.clarifier, Role.planner), "fix": (Role.validator,),
    "validate": (Role.clarifier, Role.planner, Role.constructor),
}


class SpecFailed(Exception):
    """A step that cannot complete; the run ends failed with this reason."""


def parse_input(args: tuple[Any, ...]) -> tuple[SpecInput, str | None]:
    """The run's input, or a placeholder and why the given one is refused.

    The entry points take any number of arguments of any shape (a typed parameter makes the
    SDK fail the workflow *task* on a bad payload, retried forever: a wedged spec). A bad
    input becomes a clean failed run with this reason instead.
    """
    placeholder = SpecInput(request="")
    if len(args) != 1:
        return placeholder, (f"{WORKFLOW_TYPE} takes exactly one input, "
                             f'{{"request": "..."}}; it was given {len(args)}')
    if isinstance(args[0], Undecodable):
        return placeholder, f"invalid input: {args[0]}"
    try:
        return SpecInput.model_validate(args[0]), None
    except (ValidationError, ValueError, TypeError) as err:
        return placeholder, f"invalid input: {_one_line(str(err))}"


@workflow.defn(name=WORKFLOW_TYPE, failure_exception_types=[ValidationError])
class SpecPipeline:
    @workflow.init
    def __init__(self, *args: Any) -> None:
        self._input, self._input_problem = parse_input(args)
        self._limits = self._input.limits
        self._status = Status(spec_id=workflow.info().workflow_id)
        self._turns: dict[Role, int] = {}
        self._answers: dict[str, str] | None = None
        self._decision: Decision | None = None
        self._opened = False
        self._effects_begun = False
        self._compensated: list[EffectRef] = []
        self._head: str | None = None
        self._refused_streak = 0
        self._diff: ChangeDescription | None = None
        # one budget for the spec; raises (update or signal) count up, a waiting turn watches
        self._budget = Budget(usd=self._input.budget_usd, tokens=self._input.budget_tokens)
        self._budget_raises = 0
        self._status.budget = self._budget
        self._taint: dict[Role, list[str]] = {}  # what each role's newest output carries
        self._resume: tuple[Phase, Role | None] | None = None  # phase left for waiting_for_model

    # --- run ---------------------------------------------------------------------

    @workflow.run
    async def run(self, *args: Any) -> PipelineResult:
        inp = self._input
        workspaces = workflow.patched(WORKSPACE_PATCH)
        self._status.started_at = workflow.now()
        try:
            if self._input_problem:
                raise SpecFailed(self._input_problem)
            self._check_request(inp.request)
            opened = await self._open(inp)
            if workspaces:
                await self._prepare_workspace(inp, opened.workspace or inp.workspace)
            spec = await self._clarify(inp, opened)
            plan, plan_ok = await self._plan_and_audit(spec)
            change = validation = None
            outcome = "plan_rejected"
            if plan_ok:
                change, validation = await self._construct_and_validate(spec, plan)
                outcome = "approved" if validation.approved else "change_rejected"
            if workspaces and outcome == "approved":
                gate = await self._gate(inp) if workflow.patched(LOOP_PATCH) else None
                decision = await self._approval(inp, gate)
                outcome = "delivered" if decision.approved else "rejected"
                if decision.approved:
                    await self._deliver(inp)
            if workspaces and outcome != "delivered":
                await self._compensate()
            self._status.outcome = outcome
            await self._close(Phase.completed, session_state="done", spec_status="completed")
            await workflow.wait_condition(workflow.all_handlers_finished)
            return PipelineResult(
                spec_id=self._status.spec_id, iteration=self._status.iteration, outcome=outcome,
                clarified_spec=spec, plan=plan, change=change, validation=validation,
                flags=self._status.flags, usage=self._status.usage, models=self._status.models,
                delivery=self._status.delivery, decision=self._status.decision,
                branch=self._status.workspace.branch if self._status.workspace else None,
                compensated=self._compensated, needs_human=self._status.needs_human,
                validated_commit=self._status.validated_commit,
                repository=self._status.workspace.repo if self._status.workspace else None,
                worktree=self._status.workspace.worktree if self._status.workspace else None,
                review=self._status.review, cost=self._status.cost,
                cost_by_role=self._status.cost_by_role, budget=self._status.budget,
                degraded=self._status.degraded, gate=self._status.gate)
        except (asyncio.CancelledError, ActivityError) as err:
            if isinstance(err, ActivityError) and not _cancelled(err):
                await self._fail(f"{_reason(err)}")
            self._status.error = "cancelled"
            await self._compensate()
            await self._close(Phase.cancelled, session_state="idle", spec_status="cancelled")
            raise asyncio.CancelledError() from None
        except SpecFailed as failure:
            await self._fail(str(failure))
        raise AssertionError("unreachable")

    async def _fail(self, reason: str) -> None:
        """Compensate, record the reason and end the run failed (raises)."""
        self._status.error = reason
        await self._compensate()
        if self._status.needs_human:
            self._status.error += (f"; {len(self._status.needs_human)} compensation(s) need a "
                                   f"human: run 'relay compensate {self._status.spec_id}'")
        await self._close(Phase.failed, session_state="idle", spec_status="failed")
        raise ApplicationError(self._status.error, non_retryable=True,
                               type="SpecConflict" if self._status.stray_run else "SpecFailed")

    def _check_request(self, request: str) -> None:
        if problem := spec_id_problem(self._status.spec_id):
            raise SpecFailed(problem)
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
                                           request=inp.request, iterate=inp.iterate,
                                           workspace=inp.workspace, budget=self._budget),
                result_type=OpenSpecResult, summary="open spec in registry", **BOOKKEEPING)
        except ActivityError as err:
            if isinstance(err.cause, ApplicationError) and err.cause.type == "SpecConflict":
                # started outside relay on an id it already knows: this run changed nothing,
                # and `relay status`/`result` keep showing the spec's last real run
                self._status.stray_run = (
                    f"run {info.run_id} was refused: {_reason(err)}")
            raise SpecFailed(_reason(err)) from None
        self._opened = True
        self._status.iteration = opened.iteration
        self._status.sessions = opened.sessions
        self._turns = {s.role: s.turns for s in opened.sessions}
        if opened.budget is not None:  # the spec's own, over all iterations (raised, never lowered)
            self._budget = self._status.budget = opened.budget
        self._spent(opened.spend)
        log.info("spec.opened", iteration=opened.iteration)
        resumed = sum(1 for s in opened.sessions if s.turns)
        self._event("opened", f"iteration {opened.iteration} opened: "
                    + (f"{resumed} agents resume their sessions" if resumed
                       else f"{len(opened.sessions)} new agent sessions"))
        return opened

    async def _close(self, phase: Phase, *, session_state: str, spec_status: str) -> None:
        self._status.waiting_for = None  # e.g. cancelled while waiting for approval
        self._set_phase(phase, None)
        if workflow.patched(OUTCOME_PATCH):
            # the Web UI shows every finished spec as COMPLETED; this column tells them apart
            workflow.upsert_search_attributes([OUTCOME.value_set(self._status.outcome or phase.value)])
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
                              spec_status=spec_status, outcome=self._status.outcome,
                              error=self._status.error,
                              budget=self._budget if self._budget_raises else None),
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
        built = await self._turn(Role.constructor, "construct", spec=spec, plan=render.plan(plan))
        await self._commit(built, round_no=1)
        change = Change.model_validate(built.output)
        for round_no in range(1, self._limits.max_fix_rounds + 1):
            self._status.rounds["validate"] = round_no
            report = await self._inspect(change)
            if report is not None and report.empty:
                # the constructor described a change it never wrote: nothing to validate, and
                # never anything to deliver; it is told how its work reaches the repository
                self._flag("change_not_made")
                validation = Validation(approved=False, failures=[render.EMPTY_CHANGE])
                checked = None
            else:
                if report is not None and report.declared_mismatch:
                    self._flag("declared_files_differ")
                self._set_phase(Phase.validating, Role.validator)
                checked = await self._turn(
                    Role.validator, "validate", spec=spec, plan=render.plan(plan),
                    change=render.real_change(change, report) if report is not None
                    else render.change(change))
                validation = Validation.model_validate(checked.output)
            if validation.approved or round_no == self._limits.max_fix_rounds:
                if not validation.approved:
                    self._flag("change_not_approved")
                else:
                    self._status.validated_commit = self._head
                    await self._review(validation, checked)
                return change, validation
            self._set_phase(Phase.constructing, Role.constructor)
            built = await self._turn(Role.constructor, "fix",
                                     failures=render.bullets(validation.failures))
            await self._commit(built, round_no=round_no + 1)
            change = Change.model_validate(built.output)
        raise AssertionError("unreachable")

    # --- one agent turn ----------------------------------------------------------------

    async def _turn(self, role: Role, kind: str, **variables: str) -> AgentTurnResult:
        self._turns[role] = self._turns.get(role, 0) + 1
        turn = self._turns[role]
        self._session_state(role, "running")
        began = workflow.now()
        if workflow.patched(LOOP_PATCH):
            result = await self._loop_turn(role, turn, kind, variables)
        else:
            found = await self._single_activity_turn(role, turn, kind, variables)
            if found is None:  # it waited for a budget raise: the same turn again (its
                self._turns[role] = turn - 1  # recorded steps are reused, not re-paid)
                return await self._turn(role, kind, **variables)
            result = found
        self._session_state(role, "idle")
        _stop_if_cancelled()
        self._spent(result.spend)
        self._status.usage = self._status.usage + result.usage
        by_role = self._status.usage_by_role
        by_role[role.value] = by_role[role.value] + result.usage if role.value in by_role else result.usage
        if result.model not in self._status.models:
            self._status.models.append(result.model)
        if result.repaired:
            self._flag(f"{role.value}_output_repaired")
        if result.unsandboxed_checks:
            self._flag("checks_ran_unsandboxed")
        self._turn_event(role, turn, kind, result, (workflow.now() - began).total_seconds())
        return result

    async def _loop_turn(self, role: Role, turn: int, kind: str,
                         variables: dict[str, str]) -> AgentTurnResult:
        """The turn as a loop in workflow code; its output's provenance and taint recorded."""
        tainted: list[str] = []
        for source in INPUTS.get(kind, ()):
            tainted += [s for s in self._taint.get(source, []) if s not in tainted]
        try:
            result = await agent_loop.run_turn(agent_loop.Turn(
                spec_id=self._status.spec_id, role=role, turn=turn, kind=kind,
                variables=variables, iteration=self._status.iteration,
                workspace=self._status.workspace, limits=self._limits,
                fallbacks=self._input.fallbacks(role), tainted_by=tainted,
                waiting=self._waiting_for_model, budget=self._budget_now,
                budget_wait=lambda err, raises: self._wait_for_budget(role, err, raises)))
        except agent_loop.TurnFailed as failed:
            self._session_state(role, "failed" if failed.session_failed else "idle")
            raise SpecFailed(f"{role.value} turn {turn} failed: {failed}") from None
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            self._session_state(role, "failed" if _is_invalid_output(err) else "idle")
            raise SpecFailed(f"{role.value} turn {turn} failed: {_reason(err)}") from None
        self._taint[role] = agent_loop.taint_of(result)
        prov = result.provenance
        if prov is not None and prov.tainted and result.step_ids:
            why = (f"answered by {prov.source.value} model {prov.model}"
                   if prov.source != Source.primary else f"trust {prov.trust.value}")
            if prov.tainted_by:
                why = (why + "; " if prov.trust.value != "full" else "") + (
                    "computed from degraded steps " + ", ".join(prov.tainted_by))
            self._status.degraded.append(DegradedStep(
                step_id=result.step_ids[-1], role=role, provenance=prov, reason=why))
            self._flag("degraded_trajectory")
            workflow.set_current_details(render.details(self._status))
        return result

    def _waiting_for_model(self, wait: ModelWait | None) -> None:
        """Gate 1 found no model of the chain available (or one came back)."""
        self._status.model_wait = wait
        if wait is not None:
            if self._status.phase != Phase.waiting_for_model:
                self._resume = (self._status.phase, self._status.current_role)
            self._status.waiting_for = (
                f"the {wait.role.value}'s model {wait.model} to be available again "
                f"(next attempt at {wait.next_attempt_at}; last error: {wait.last_error})")
            self._set_phase(Phase.waiting_for_model, wait.role)
        elif self._resume is not None:
            self._status.waiting_for = None
            phase, role = self._resume
            self._resume = None
            self._set_phase(phase, role)

    async def _single_activity_turn(self, role: Role, turn: int, kind: str,
                                    variables: dict[str, str]) -> AgentTurnResult | None:
        """Before LOOP_PATCH: one `agent_turn` activity ran the whole turn (kept for replay).
        None: the turn waited for a budget raise and must run again."""
        limits = self._limits
        raises = self._budget_raises
        budget = self._budget if self._budget.usd is not None or self._budget.tokens is not None \
            else None
        try:
            result = await through_outages(lambda: workflow.execute_activity(
                "agent_turn",
                AgentTurnInput(spec_id=self._status.spec_id, role=role, turn=turn, kind=kind,
                               variables=variables, iteration=self._status.iteration,
                               workspace=self._status.workspace,
                               max_tool_steps=limits.max_tool_steps,
                               check_timeout_s=limits.check_timeout_s, budget=budget),
                result_type=AgentTurnResult,
                start_to_close_timeout=timedelta(
                    seconds=limits.turn_timeout_s + (limits.check_timeout_s if self._status.workspace else 0)),
                heartbeat_timeout=timedelta(seconds=limits.heartbeat_timeout_s),
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                         maximum_interval=timedelta(seconds=60),
                                         maximum_attempts=limits.model_max_attempts),
                summary=f"{role.value} turn {turn} ({kind})",
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ), f"{role.value} turn {turn}")
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            if _budget_exhausted(err):  # refused before paying: wait for a raise, then the
                await self._wait_for_budget(role, err, raises)  # same turn again
                return None
            self._session_state(role, "failed" if _is_invalid_output(err) else "idle")
            raise SpecFailed(f"{role.value} turn {turn} failed: {_reason(err)}") from None
        return result

    def _turn_event(self, role: Role, turn: int, kind: str, result: AgentTurnResult,
                    elapsed_s: float) -> None:
        verdict, said = render.verdict(role.value, result.output)
        u = result.usage
        cost = render.usd(getattr(result, "cost_usd", None) or getattr(result, "cost", None))
        uses = list(getattr(result, "tool_uses", None) or [])
        failed_check = role == Role.validator and verdict == "rejected"
        self._event("turn", render.turn_text(
            role.value, turn, kind, said, elapsed_s,
            u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens,
            u.output_tokens, cost, uses, result.tool_calls, result.replayed),
            role=role.value, turn=turn, elapsed_s=round(elapsed_s, 3), usage=u, cost_usd=cost,
            tools=uses[:50], verdict=verdict,
            detail=render.check_tail(getattr(result, "check_report", None)) if failed_check else None)

    async def _review(self, validation: Validation, checked: AgentTurnResult | None) -> None:
        """What the reviewer reads at approval: the verdict, the checks' tail and the validated
        change's diff, described by a worker (which has the repository)."""
        ws = self._status.workspace
        if ws is None or not workflow.patched(REVIEW_PATCH):
            return
        review = Review(commit=self._head, base=ws.base or None, repo=ws.repo, branch=ws.branch,
                        target=ws.target, worktree=ws.worktree, approved=validation.approved,
                        failures=validation.failures, check_command=ws.check,
                        check_report=getattr(checked, "check_report", None))
        if self._head and ws.base:
            try:
                self._diff = await workflow.execute_activity(
                    "describe_change", DescribeChangeInput(repo=ws.repo, base=ws.base,
                                                           commit=self._head),
                    result_type=ChangeDescription, summary="describe the validated change",
                    **BOOKKEEPING)
                review.diff_stat, review.files = self._diff.stat, self._diff.files
                review.insertions, review.deletions = self._diff.insertions, self._diff.deletions
                review.diff_chars, review.diff_truncated = self._diff.diff_chars, self._diff.truncated
            except ActivityError as err:  # the reviewer still sees the verdict and the checks
                if _cancelled(err):
                    raise asyncio.CancelledError() from None
                review.diff_error = _reason(err)
        self._status.review = review
        self._event("review", "validated change: "
                    + (render.change_stat(review) if not review.diff_error
                       else f"diff unavailable ({review.diff_error})")
                    + (f" · commit {review.commit[:12]}" if review.commit else ""))

    # --- cost and budget -------------------------------------------------------------------

    def _budget_now(self) -> tuple[Budget | None, int]:
        """The budget a model call is checked against (None: no limit), and the raises so far."""
        limited = self._budget.usd is not None or self._budget.tokens is not None
        return (self._budget if limited else None), self._budget_raises

    def _spent(self, spend: SpecCost | None) -> None:
        """The spec's cost as the newest turn (or open_spec) read it from the registry."""
        if spend is not None:
            self._status.cost, self._status.cost_by_role = spend.total, spend.by_role

    async def _wait_for_budget(self, role: Role, err: ActivityError, raises: int) -> None:
        """The turn's next model call would exceed the budget (nothing was paid for it): wait
        in waiting_for_budget until the budget is raised. A raise that arrived while the turn
        ran is not waited for again."""
        cause = err.cause
        try:
            wait = BudgetWait.model_validate(cause.details[0])  # type: ignore[union-attr]
        except (ValidationError, IndexError, TypeError, AttributeError):
            wait = BudgetWait(role=role, turn=self._turns.get(role, 0), budget=self._budget,
                              reason=_reason(err))
        self._spent(wait.spend)
        wait.spend = None  # shown once, as the status' cost
        log.info("budget.exhausted", role=role.value, reason=wait.reason)
        if self._budget_raises != raises:
            return
        before = (self._status.phase, self._status.current_role)
        self._status.budget_wait = wait
        self._status.waiting_for = (
            f"a budget raise: {wait.reason}; send the `raise_budget` update with "
            + " or ".join(render.budget_payloads(self._status)))
        self._session_state(role, "waiting")
        self._set_phase(Phase.waiting_for_budget, role)
        await workflow.wait_condition(lambda: self._budget_raises != raises)
        # not in `finally`: a cancelled wait goes straight to compensation
        self._status.budget_wait = self._status.waiting_for = None
        self._session_state(role, "running")
        self._set_phase(*before)

    @workflow.update
    def raise_budget(self, *args: Any) -> Budget:
        """Raise the spec's budget: {"add_usd": 2.0} and/or {"add_tokens": 100000}."""
        return self._raise_budget(self._check_raise(args))

    @raise_budget.validator
    def _validate_raise_budget(self, *args: Any) -> None:
        self._check_raise(args)

    @workflow.signal
    def raise_budget_signal(self, *args: Any) -> None:
        """Same as the `raise_budget` update, for senders that cannot wait."""
        try:
            add = self._check_raise(args)
        except (ValueError, ValidationError, TypeError) as err:
            self._reject(f"raise_budget_signal rejected: {_one_line(str(err))}")
            return
        self._raise_budget(add)

    def _check_raise(self, args: tuple[Any, ...]) -> RaiseBudgetInput:
        try:
            add = RaiseBudgetInput.model_validate(_single(args, empty_is=None))
        except ValidationError as err:
            raise ValueError(_one_line(str(err))) from None
        if self._status.phase in (Phase.completed, Phase.failed, Phase.cancelled):
            raise ValueError(f"the spec has ended (phase: {self._status.phase.value})")
        unlimited = [name for name, given, limit in (
            ("USD", add.add_usd, self._budget.usd), ("token", add.add_tokens, self._budget.tokens))
            if given is not None and limit is None]
        if unlimited:
            raise ValueError(f"this spec has no {' or '.join(unlimited)} budget (no limit): "
                             "nothing to raise")
        return add

    def _raise_budget(self, add: RaiseBudgetInput) -> Budget:
        b = self._budget
        self._budget = self._status.budget = Budget(
            usd=None if b.usd is None else b.usd + (add.add_usd or 0),
            tokens=None if b.tokens is None else b.tokens + (add.add_tokens or 0))
        self._budget_raises += 1
        log.info("budget.raised", usd=self._budget.usd, tokens=self._budget.tokens)
        return self._budget

    # --- the workspace and its side effects (a saga) --------------------------------------

    async def _prepare_workspace(self, inp: SpecInput, workspace: WorkspaceInput) -> None:
        self._effects_begun = True
        try:
            self._status.workspace = await through_outages(lambda: workflow.execute_activity(
                "prepare_workspace",
                PrepareWorkspaceInput(spec_id=self._status.spec_id, iteration=self._status.iteration,
                                      workspace=workspace),
                result_type=WorkspaceRef, summary="prepare branch and worktree",
                **self._effect_options()), "prepare workspace")
            ws = self._status.workspace
            self._event("workspace", f"workspace: branch {ws.branch} from {ws.target} of "
                        f"{ws.repo}, worktree {ws.worktree}"
                        + (f", check `{ws.check}`" if ws.check else ""))
            _stop_if_cancelled()
            for index, hook in enumerate(h for h in inp.hooks if h.at == "prepare"):
                await self._effect(f"hook/prepare/{index}", hook.effect, hook.payload,
                                   reversible_only=True)
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            raise SpecFailed(f"workspace: {_reason(err)}") from None

    async def _inspect(self, change: Change) -> ChangeReport | None:
        """The branch's real change against the target (what the validator judges and what
        lands), for runs with the loop in the workflow and a workspace."""
        ws = self._status.workspace
        if ws is None or not workflow.patched(LOOP_PATCH):
            return None
        try:
            report = await through_outages(lambda: workflow.execute_activity(
                "inspect_change",
                InspectChangeInput(spec_id=self._status.spec_id, workspace=ws, commit=self._head,
                                   declared=change.files,
                                   destructive_share=self._limits.destructive_share,
                                   hooks=[h.effect for h in self._input.hooks
                                          if h.at == "deliver"]),
                result_type=ChangeReport, summary="inspect the branch's change against "
                                                  f"{ws.target}", **self._effect_options()),
                "inspect change")
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            raise SpecFailed(f"workspace: {_reason(err)}") from None
        self._status.change_report = report
        return report

    async def _commit(self, built: AgentTurnResult, round_no: int) -> None:
        ws = self._status.workspace
        if ws is None:
            return
        summary = str(built.output.get("summary", "")).strip() or "change"
        committed = await self._effect(f"commit/r{round_no}", "git.commit", {
            "repo": ws.repo, "worktree": ws.worktree, "branch": ws.branch,
            "paths": built.changed_paths,
            "message": f"relay {self._status.spec_id} iteration {self._status.iteration} "
                       f"round {round_no}: {summary}"[:200]})
        # the branch head now: what the validator will check, and all that delivery may merge
        self._head = committed.result.get("commit") or committed.result.get("parent")
        self._event("commit", f"committed round {round_no} on {ws.branch}: "
                    + (f"{str(self._head)[:12]}, " if self._head else "")
                    + (", ".join(built.changed_paths[:10]) or "no file changed")
                    + (f" and {len(built.changed_paths) - 10} more"
                       if len(built.changed_paths) > 10 else ""))

    async def _effect(self, step: str, effect: str, payload: dict[str, Any], *,
                      reversible_only: bool = False, irreversible: bool = False,
                      start_to_close: timedelta | None = None) -> EffectResult:
        """Run one effect through the ledger. Irreversible steps retry a crashed attempt many
        more times (a half-known merge must be finished, not compensated); an effect's own
        non-retryable failure still ends them at once."""
        attempts = max(20, self._limits.effect_max_attempts) if irreversible else (
            self._limits.effect_max_attempts)
        options = self._effect_options()
        if start_to_close is not None:
            options["start_to_close_timeout"] = start_to_close
        options["retry_policy"] = RetryPolicy(initial_interval=timedelta(milliseconds=500),
                                              maximum_interval=timedelta(seconds=30),
                                              maximum_attempts=attempts)
        try:
            result = await through_outages(lambda: workflow.execute_activity(
                "run_effect",
                EffectInput(spec_id=self._status.spec_id, step=f"i{self._status.iteration}/{step}",
                            effect=effect, payload=payload, reversible_only=reversible_only,
                            max_attempts=attempts),
                result_type=EffectResult, summary=f"{effect} ({step})", **options),
                f"{effect} ({step})")
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            raise SpecFailed(f"effect {effect} failed: {_reason(err)}") from None
        self._status.effects.append(EffectRef(key=result.key, effect=effect, step=step,
                                              status=result.status))
        if not irreversible:  # once delivery began, it is finished whatever arrives
            _stop_if_cancelled()
        return result

    def _effect_options(self) -> dict[str, Any]:
        return dict(start_to_close_timeout=timedelta(minutes=5),
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    heartbeat_timeout=timedelta(seconds=self._limits.heartbeat_timeout_s),
                    retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=500),
                                             maximum_interval=timedelta(seconds=30),
                                             maximum_attempts=self._limits.effect_max_attempts))

    # --- Gate 2: before anything irreversible ---------------------------------------------

    def _degraded_roots(self) -> list[str]:
        """The unverified degraded steps the trajectory was computed from (not the last hop:
        every step any output of this run carries in its taint)."""
        verified = {d.step_id for d in self._status.degraded if d.verified_by}
        roots: list[str] = []
        for d in self._status.degraded:
            own = [d.step_id] if d.provenance.trust.value != "full" else []
            roots += [s for s in [*d.provenance.tainted_by, *own]
                      if s not in roots and s not in verified]
        return roots

    async def _gate(self, inp: SpecInput) -> GateReport:
        """Gate 2 before delivery: a clean trajectory proceeds; a tainted one is re-checked on
        the primary (policy recheck) or goes to a person (policy human, or a re-check that
        disagrees or cannot be made). Every decision is recorded in the registry."""
        roots = self._degraded_roots()
        report = self._status.change_report
        gate = GateReport(policy=inp.gate_policy, tainted=bool(roots), degraded_steps=roots,
                          destructive=list(report.destructive) if report else [])
        self._status.gate = gate
        reasons: list[str] = []
        if gate.destructive:
            # gate on risk, not on confidence: whatever the trajectory's trust or auto_approve
            reasons.append("a destructive change always needs a person (gate on risk, not on "
                           "confidence): " + "; ".join(gate.destructive))
        if roots and inp.gate_policy == GatePolicy.recheck:
            self._set_phase(Phase.rechecking, None)
            for step_id in roots:
                gate.rechecks.append(await self._recheck(step_id))
            if all(r.agree for r in gate.rechecks):
                for d in self._status.degraded:
                    d.verified_by = "gate: re-checked on the primary"
                gate.tainted = False
                await self._record_gate(gate, "verified", "gate: re-check on the primary",
                                        "every degraded step agreed with the primary",
                                        key="deliver/recheck")
            else:
                for r in gate.rechecks:
                    if r.agree is False:
                        reasons.append(f"the re-check of {r.step_id} on the primary disagrees: "
                                       + "; ".join(r.diff))
                    elif r.agree is None:
                        reasons.append(f"{r.step_id} could not be re-checked: {r.error}")
        elif roots:
            reasons.append("the trajectory is degraded (" + ", ".join(roots) + ") and the "
                           "spec's gate policy is human")
        if reasons:
            gate.needs_human, gate.reason = True, "; ".join(reasons)
            await self._record_gate(gate, "waiting", "gate", gate.reason, final=False)
        elif not roots:
            await self._record_gate(gate, "proceed", "gate: clean trajectory", "")
        return gate

    async def _recheck(self, step_id: str) -> RecheckResult:
        role_name, turn, step = step_id.split("/")
        role = Role(role_name)
        session = next(s for s in self._status.sessions if s.role == role)
        try:
            return await through_outages(lambda: workflow.execute_activity(
                "recheck_step",
                RecheckInput(spec_id=self._status.spec_id, iteration=self._status.iteration,
                             role=role, session_id=session.session_id, turn=int(turn[1:]),
                             step=int(step[1:]), step_id=step_id, workspace=self._status.workspace,
                             call_timeout_s=self._limits.model_call_timeout_s),
                result_type=RecheckResult, summary=f"gate: re-check {step_id} on the primary",
                start_to_close_timeout=timedelta(seconds=self._limits.turn_timeout_s),
                heartbeat_timeout=timedelta(seconds=self._limits.heartbeat_timeout_s),
                retry_policy=RetryPolicy(initial_interval=timedelta(seconds=1),
                                         maximum_interval=timedelta(seconds=30),
                                         maximum_attempts=self._limits.model_max_attempts),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED),
                f"re-check {step_id}")
        except ActivityError as err:
            if _cancelled(err):
                raise asyncio.CancelledError() from None
            return RecheckResult(step_id=step_id, role=role, error=_reason(err))

    async def _record_gate(self, gate: GateReport, decision: str, by: str, reason: str, *,
                           final: bool = True, key: str = "deliver") -> None:
        at = await workflow.execute_activity(
            "record_gate",
            GateRecordInput(spec_id=self._status.spec_id, iteration=self._status.iteration,
                            key=f"i{self._status.iteration}/gate/{key}", decision=decision,
                            decided_by=by, reason=reason, steps=gate.degraded_steps),
            result_type=str, summary=f"gate: {decision} ({by})", **BOOKKEEPING)
        if final:
            gate.decision, gate.decided_by, gate.decided_at = decision, by, at
        else:
            gate.decision = decision

    async def _approval(self, inp: SpecInput, gate: GateReport | None = None) -> Decision:
        if inp.auto_approve and (gate is None or not gate.needs_human):
            self._status.decision = Decision(approved=True, reviewer="policy: auto_approve")
            return self._status.decision
        ws = self._status.workspace
        self._status.waiting_for = (
            f"approval to merge {ws.branch if ws else 'the change'} into "
            f"{ws.target if ws else 'the target'}: send the `approve` update "
            f"or `reject` with a reason")
        if gate is not None and gate.needs_human:
            self._status.waiting_for += f". A person must decide: {gate.reason}"
        self._set_phase(Phase.waiting_for_approval, None)
        await workflow.wait_condition(lambda: self._decision is not None)
        self._status.waiting_for = None
        self._status.decision = self._decision
        assert self._decision is not None
        d = self._decision
        self._event("decision", f"{'approved' if d.approved else 'rejected'} by "
                    f"{d.reviewer or 'a reviewer'}" + (f": {d.reason}" if d.reason else ""),
                    verdict="approved" if d.approved else "rejected")
        if gate is not None and gate.needs_human:
            who = f"human: {self._decision.reviewer or 'unnamed'}"
            await self._record_gate(gate, "approved" if self._decision.approved else "rejected",
                                    who, self._decision.reason or "", key="deliver/human")
        return self._decision

    async def _deliver(self, inp: SpecInput) -> None:
        ws = self._status.workspace
        assert ws is not None
        self._set_phase(Phase.delivering, None)
        # base and check let delivery re-check the merge if the target moved after validation
        payload: dict[str, Any] = {"repo": ws.repo, "branch": ws.branch, "target": ws.target,
                                   "base": ws.base, "check": ws.check,
                                   "check_timeout_s": self._limits.check_timeout_s}
        if self._status.validated_commit:  # exactly what was validated, or nothing
            payload["commit"] = self._status.validated_commit
        merge = asyncio.ensure_future(self._effect(
            "deliver", "git.deliver", payload,
            irreversible=True,
            start_to_close=timedelta(seconds=self._limits.check_timeout_s + 300)))
        try:
            delivered = await asyncio.shield(merge)
        except asyncio.CancelledError:
            # The irreversible step has begun: it is finished, never half-compensated.
            delivered = await merge
            self._flag("cancel_arrived_during_delivery")
        self._status.delivery = delivered.result
        self._event("delivered", f"merged {ws.branch} into {ws.target} of {ws.repo} at "
                    f"{str(delivered.result.get('commit'))[:12]}")
        if (delivered.result.get("recheck") or {}).get("unsandboxed"):
            self._flag("checks_ran_unsandboxed")
        # After the merge the run is final: what follows can fail without undoing it.
        after = [("cleanup", "git.cleanup", {"repo": ws.repo, "branch": ws.branch,
                                             "worktree": ws.worktree})]
        after += [(f"hook/deliver/{i}", h.effect, h.payload)
                  for i, h in enumerate(h for h in inp.hooks if h.at == "deliver")]
        for step, effect, payload in after:
            try:
                await self._effect(step, effect, payload, irreversible=True)
            except SpecFailed as failure:
                self._flag(f"after delivery: {failure}")

    async def _compensate(self) -> None:
        """Undo this run's effects, newest first; one that keeps failing waits for a human."""
        if not self._effects_begun:
            return
        self._set_phase(Phase.compensating, None)
        done, stuck = await saga.compensate(self._status.spec_id, workflow.info().run_id,
                                            self._limits)
        self._compensated += done
        self._status.needs_human += stuck
        self._event("compensated", f"compensated {len(done)} effect(s), newest first"
                    + (f"; {len(stuck)} need a human (relay compensate)" if stuck else ""))
        if stuck:
            self._flag("needs_human")
        self._effects_begun = False

    @workflow.update
    def approve(self, inp: ApprovalInput) -> Decision:
        """Approve delivery of the validated change: {"reviewer": "alice"}."""
        self._decision = Decision(approved=True, reviewer=inp.reviewer, reason=inp.comment)
        return self._decision

    @approve.validator
    def _validate_approve(self, inp: ApprovalInput) -> None:
        self._check_awaiting_approval()

    @workflow.update
    def reject(self, inp: RejectInput) -> Decision:
        """Reject the change: {"reason": "..."}; every effect is compensated."""
        self._decision = Decision(approved=False, reviewer=inp.reviewer, reason=inp.reason)
        return self._decision

    @reject.validator
    def _validate_reject(self, inp: RejectInput) -> None:
        self._check_awaiting_approval()

    # Signals and queries take *args: any payload shape and any number of arguments (an empty
    # Web UI form sends none) must be refused in workflow code, never fail the task.

    @workflow.signal
    def approve_signal(self, *args: Any) -> None:
        self._decide_by_signal(ApprovalInput, args, approved=True)

    @workflow.signal
    def reject_signal(self, *args: Any) -> None:
        self._decide_by_signal(RejectInput, args, approved=False)

    def _decide_by_signal(self, model: type, args: tuple[Any, ...], *, approved: bool) -> None:
        name = f"{'approve' if approved else 'reject'}_signal"
        try:
            self._check_awaiting_approval()
            payload = _single(args, empty_is={} if approved else None)
            parsed = model.model_validate(payload)
        except (ValueError, ValidationError, TypeError) as err:
            self._reject(f"{name} rejected: {_one_line(str(err))}")
            return
        self._decision = Decision(approved=approved, reviewer=parsed.reviewer,
                                  reason=getattr(parsed, "reason", None) or getattr(parsed, "comment", None))

    def _check_awaiting_approval(self) -> None:
        if self._status.phase != Phase.waiting_for_approval or self._decision is not None:
            raise ValueError(f"nothing is waiting for approval (phase: {self._status.phase.value})")

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
            # the timeline is the Web UI's default tab: say what is awaited and where to look
            summary=f"clarifier waits for answers: {render.question_ids(questions)} "
                    "(questions and JSON under User Metadata)", **BOOKKEEPING)
        timeout = self._limits.answer_timeout_s
        try:
            await workflow.wait_condition(
                lambda: self._answers is not None,
                timeout=timedelta(seconds=timeout) if timeout else None,
                timeout_summary=f"waiting for answers: {render.question_ids(questions)} "
                                "(answer deadline)")
            answers = self._answers
        except asyncio.TimeoutError:
            answers = None
        except asyncio.CancelledError:
            self._status.pending = None
            raise
        # not in `finally`: a workflow evicted from the cache must not touch workflow state
        self._status.pending = None
        self._event("answers", f"answers received for {render.question_ids(questions)}"
                    if answers is not None else "no answers before the deadline: going on")
        self._session_state(Role.clarifier, "idle")
        self._set_phase(Phase.clarifying, Role.clarifier)
        return answers

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
        # the answers go into every later prompt of the spec: bounded like the request
        size = sum(len(v.encode("utf-8", "surrogatepass")) for v in cleaned.values())
        if size > self._limits.max_request_bytes:
            raise ValueError(f"the answers are {size} bytes; the limit is "
                             f"{self._limits.max_request_bytes} bytes (max_request_bytes)")
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
    def answer_signal(self, *args: Any) -> None:
        """Same as the `answer` update, for senders that cannot wait (Web UI signal form)."""
        try:
            payload = _single(args, empty_is=None)
            self._answers = self._check_answers(AnswerInput.model_validate(payload).answers)
        except (ValueError, ValidationError, TypeError) as err:
            self._reject(f"answer_signal rejected: {_one_line(str(err))}")

    def _reject(self, reason: str) -> None:
        """Record a refused input: the last few are shown, all are counted (bounded state)."""
        self._status.rejected_count += 1
        kept = self._status.rejected_inputs
        kept.append(reason)
        del kept[:-REJECTED_KEPT]
        log.warning("input.rejected", reason=reason)
        # a burst of refusals is one progress event, renewed: it must not push the run's real
        # steps out of the bounded log
        progress = self._status.progress
        if progress and progress[-1].kind == "refused":
            progress.pop()
            self._refused_streak += 1
        else:
            self._refused_streak = 1
        self._event("refused", reason if self._refused_streak == 1 else
                    f"{self._refused_streak} inputs refused in a row; the last: {reason}")

    @workflow.query
    def status(self, *args: Any) -> Status:
        """The spec's state. `{"after": K}` (or K): only the progress events numbered above K
        (a watcher's poll); any other argument is ignored."""
        after = _after(args)
        if after is None:
            return self._status
        return self._status.model_copy(
            update={"progress": [e for e in self._status.progress if e.seq > after]})

    @workflow.query
    def diff(self, *_args: Any) -> ChangeDiff:
        """The validated change: its diff stat and diff (empty, with a note, before that)."""
        review, got = self._status.review, self._diff
        if got is None:
            note = (review.diff_error if review and review.diff_error
                    else f"no validated change yet (phase: {self._status.phase.value})")
            return ChangeDiff(spec_id=self._status.spec_id, note=note)
        return ChangeDiff(spec_id=self._status.spec_id, commit=review.commit if review else None,
                          base=review.base if review else None, stat=got.stat, diff=got.diff,
                          diff_chars=got.diff_chars, truncated=got.truncated)

    # --- state shown to people ------------------------------------------------------------

    def _set_phase(self, phase: Phase, role: Role | None) -> None:
        self._status.phase, self._status.current_role = phase, role
        workflow.upsert_search_attributes([PHASE.value_set(phase.value)])
        workflow.set_current_details(render.details(self._status))
        self._event("phase", render.phase_text(self._status, self._limits),
                    role=role.value if role else None)

    def _event(self, kind: str, text: str, **fields: Any) -> None:
        """Append a numbered progress event; the status keeps the last PROGRESS_KEPT."""
        st = self._status
        st.progress_seq += 1
        st.progress.append(ProgressEvent(seq=st.progress_seq, at=workflow.now(), kind=kind,
                                         phase=st.phase.value, text=_one_line(text, 600),
                                         **fields))
        del st.progress[:-PROGRESS_KEPT]

    def _session_state(self, role: Role, state: str) -> None:
        for ref in self._status.sessions:
            if ref.role == role:
                ref.state = state
                if state == "running":
                    ref.turns = self._turns.get(role, ref.turns)

    def _flag(self, flag: str) -> None:
        if flag not in self._status.flags:
            self._status.flags.append(flag)


def _after(args: tuple[Any, ...]) -> int | None:
    """K from a status query's `{"after": K}` or `K`; None for anything else."""
    value = args[0] if len(args) == 1 else None
    if isinstance(value, dict):
        value = value.get("after")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _single(args: tuple[Any, ...], *, empty_is: Any) -> Any:
    """The one argument of a signal; none gives `empty_is` (None: refused as missing)."""
    if len(args) > 1:
        raise ValueError(f"expected one JSON object, got {len(args)} arguments")
    payload = args[0] if args else empty_is
    if isinstance(payload, Undecodable):
        raise ValueError(str(payload))
    if payload is None:
        raise ValueError("no payload: send one JSON object")
    return payload


def _stop_if_cancelled() -> None:
    """A cancel that arrived while a step completed anyway must still stop the run: waiting
    for the step's activity to finish can swallow the asyncio cancellation."""
    if workflow.cancellation_reason() is not None:
        raise asyncio.CancelledError()


def _cancelled(err: ActivityError) -> bool:
    """The activity ended because the workflow was cancelled (not a failure of the step)."""
    return isinstance(err.cause, TemporalCancelledError)


def _is_invalid_output(err: ActivityError) -> bool:
    """The session itself is unusable (the agent marked it failed): not an idle one."""
    return isinstance(err.cause, ApplicationError) and err.cause.type in (
        "InvalidModelOutput", "ModelRefused")


def _budget_exhausted(err: ActivityError) -> bool:
    """The turn was refused before its next model call: it would exceed the spec's budget."""
    return isinstance(err.cause, ApplicationError) and err.cause.type == "BudgetExhausted"
