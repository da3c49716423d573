"""One agent turn as a loop in workflow code: model call, tools, repair, fall back or wait.

Deterministic orchestration only, as in Temporal's agent integrations (OpenAI Agents, Pydantic
AI, ADK, Strands): each model call is the `model_step` activity, each tool call the
`agent_tool` activity, and every decision between them — which tools to run, when to repair,
when to give up, which model of the role's chain answers, when to wait — is replayable code
here. The Web UI timeline reads as the agent's trajectory: every activity is named by role,
turn, step and tool.

Gate 1 (availability): a capacity error that used up `capacity_attempts` on one model (or
asked for a wait longer than `max_retry_after_s`) hands the step to the next model of the
chain; its answer is recorded source=fallback, trust=degraded. When the whole chain is
unavailable, the turn waits on a durable timer (doubling from `model_wait_s` up to
`model_wait_max_s`) in the visible phase waiting_for_model and tries again, for as long as
it takes: an outage costs time, never work. Anything else (invalid output, a refusal, a 4xx)
never trips it.

Budget: `model_step` checks the spec's budget before it pays for a call and refuses the call
(BudgetExhausted, nothing paid) when its estimate would go over; the turn then waits in
waiting_for_budget (the pipeline's `budget_wait`) until the budget is raised, and makes the
same step again: nothing is paid twice, nothing skipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from relay.models import (
        AgentTurnResult, Budget, Limits, ModelStepInput, ModelStepResult, ModelWait, Provenance, Role,
        SessionStateInput, Source, SpecCost, TokenUsage, ToolResultBlock, ToolStepInput,
        ToolStepResult, ToolUse, WorkspaceRef,
    )
    from workflows.outage import through_outages
    from workflows.saga import BOOKKEEPING
    from workflows.saga import reason as _reason

# Error types of a model that is out of capacity (activities/model_step.CAPACITY_ERRORS).
CAPACITY_ERRORS = ("ModelRateLimited", "ModelOverloaded", "ModelServerError", "ModelTimeout",
                   "ModelUnreachable", "ModelConflict")


class TurnFailed(Exception):
    """The turn cannot complete; `session_failed`: the session itself is unusable."""

    def __init__(self, message: str, *, session_failed: bool = False) -> None:
        super().__init__(message)
        self.session_failed = session_failed


@dataclass
class Turn:
    spec_id: str
    role: Role
    turn: int
    kind: str
    variables: dict[str, str]
    iteration: int
    workspace: WorkspaceRef | None
    limits: Limits
    fallbacks: list[str] = field(default_factory=list)
    tainted_by: list[str] = field(default_factory=list)
    # told when the turn starts or stops waiting for an unavailable model
    waiting: Callable[[ModelWait | None], None] = lambda _wait: None
    # the budget a call is checked against now (None: no limit) and how many raises so far
    budget: Callable[[], tuple[Budget | None, int]] = lambda: (None, 0)
    # waits for a raise after a call was refused as over budget (given the raises it saw)
    budget_wait: Callable[[ActivityError, int], Awaitable[None]] | None = None


BUDGET_EXHAUSTED = "BudgetExhausted"  # activities/agent_turn.BUDGET_EXHAUSTED


def capacity_error(err: BaseException) -> ApplicationError | None:
    cause = err.cause if isinstance(err, ActivityError) else None
    if isinstance(cause, ApplicationError) and cause.type in CAPACITY_ERRORS:
        return cause
    return None


async def run_turn(t: Turn) -> AgentTurnResult:
    """The turn's loop: at most `max_tool_steps` model calls, each followed by its tool calls."""
    usage = TokenUsage()
    repaired, invalid_streak, tool_count, unsandboxed = False, 0, 0, False
    replayed = True
    changed: list[str] = []
    step_ids: list[str] = []
    results: list[ToolResultBlock] = []
    log = _ToolLog()
    spend: SpecCost | None = None
    paid = 0.0
    for step in range(t.limits.max_tool_steps):
        res = await _model_step(t, step, results)
        step_ids.append(res.step_id)
        spend = res.spend or spend
        if not res.replayed:
            usage = usage + res.usage
            paid += res.cost_usd or 0.0
            replayed = False
        if res.refused:
            raise TurnFailed(f"{t.role.value} turn {t.turn}: {res.error}", session_failed=True)
        results = []
        if res.output is not None:
            for index, call in enumerate(res.tool_calls):  # tools called beside the result run
                if t.workspace is not None:
                    done = await _tool(t, res, step, index, call.id, call.name)
                    changed, unsandboxed = _note(done, changed, unsandboxed)
                    log.add(done)
            tool_count += len(res.tool_calls)
            return AgentTurnResult(
                session_id=res.session_id, session_name=res.session_name, turn=t.turn,
                output=res.output, model=res.provenance.model,
                source=res.provenance.source.value, trust=res.provenance.trust.value,
                usage=usage, replayed=replayed, repaired=repaired, tool_calls=tool_count,
                changed_paths=changed, unsandboxed_checks=unsandboxed,
                provenance=res.provenance, step_ids=step_ids, spend=spend, cost_usd=paid,
                tool_uses=log.uses[:200], check_report=log.check_report)
        if res.error is not None:
            invalid_streak += 1
            if invalid_streak == 2:
                await _mark_failed(t)
                raise TurnFailed(f"{t.role.value} gave invalid output twice (turn {t.turn}); "
                                 f"last error: {res.error}", session_failed=True)
            repaired = True
        else:
            invalid_streak = 0
        tool_count += len(res.tool_calls)
        if t.workspace is not None and not res.cut:
            for index, call in enumerate(res.tool_calls):
                done = await _tool(t, res, step, index, call.id, call.name)
                changed, unsandboxed = _note(done, changed, unsandboxed)
                log.add(done)
                results.append(done.block)
    await _mark_failed(t)
    raise TurnFailed(f"{t.role.value} tool loop cut at {t.limits.max_tool_steps} model calls "
                     f"without a result (turn {t.turn})", session_failed=True)


class _ToolLog:
    """The turn's workspace tool calls with their paths, in order, and the tail of its last
    run_checks output (for progress and the reviewer)."""

    def __init__(self) -> None:
        self.uses: list[ToolUse] = []
        self.check_report: str | None = None

    def add(self, done: ToolStepResult) -> None:
        if done.use is not None:
            self.uses.append(done.use)
        if done.check_report is not None:
            self.check_report = done.check_report


def _note(done: ToolStepResult, changed: list[str], unsandboxed: bool) -> tuple[list[str], bool]:
    if done.changed_path and done.changed_path not in changed:
        changed = [*changed, done.changed_path]
    return changed, unsandboxed or done.unsandboxed


async def _model_step(t: Turn, step: int, results: list[ToolResultBlock]) -> ModelStepResult:
    """One model call, through Gate 1: the role's chain in order, then a patient wait."""
    limits = t.limits
    chain: list[str | None] = [None, *t.fallbacks]
    index, wait, waited = 0, limits.model_wait_s, 0.0
    while True:
        model = chain[index]
        what = f"{t.role.value} turn {t.turn} step {step}"
        budget, raises = t.budget()
        inp = ModelStepInput(
            spec_id=t.spec_id, role=t.role, turn=t.turn, step=step, kind=t.kind,  # type: ignore[arg-type]
            variables=t.variables if step == 0 else {}, iteration=t.iteration,
            workspace=t.workspace, model=model,
            source=Source.primary if model is None else Source.fallback,
            tool_results=results, tainted_by=t.tainted_by,
            capacity_attempts=limits.capacity_attempts, max_retry_after_s=limits.max_retry_after_s,
            call_timeout_s=limits.model_call_timeout_s, budget=budget)
        try:
            res = await through_outages(lambda: workflow.execute_activity(
                "model_step", inp, result_type=ModelStepResult,
                start_to_close_timeout=timedelta(seconds=limits.turn_timeout_s),
                heartbeat_timeout=timedelta(seconds=limits.heartbeat_timeout_s),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=60),
                    maximum_attempts=max(limits.model_max_attempts, limits.capacity_attempts)),
                summary=f"{what}: model call" + (f" (fallback {model})" if model else ""),
                cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            ), what)
        except ActivityError as err:
            if t.budget_wait is not None and isinstance(err.cause, ApplicationError) and (
                    err.cause.type == BUDGET_EXHAUSTED):
                # refused before paying: wait for a raise, then make the same call again
                await t.budget_wait(err, raises)
                continue
            cause = capacity_error(err)
            if cause is None:
                raise
            if index + 1 < len(chain):
                index += 1
                workflow.logger.warning("%s: %s; falling back to %s", what, cause.message,
                                        chain[index])
                continue
            index = 0
            details = cause.details[0] if cause.details and isinstance(cause.details[0], dict) else {}
            t.waiting(ModelWait(
                role=t.role, model=str(details.get("model") or "primary"),
                last_error=_reason(err),
                next_attempt_at=(workflow.now() + timedelta(seconds=wait)).isoformat(),
                waited_s=waited))
            await workflow.sleep(timedelta(seconds=wait),
                                 summary=f"{what}: no model available, trying again in {wait:g} s")
            waited += wait
            wait = min(wait * 2, limits.model_wait_max_s)
            continue
        if waited:
            t.waiting(None)
        return res


async def _tool(t: Turn, res: ModelStepResult, step: int, index: int, call_id: str,
                name: str) -> ToolStepResult:
    assert t.workspace is not None
    limits = t.limits
    checks = name == "run_checks"
    return await through_outages(lambda: workflow.execute_activity(
        "agent_tool",
        ToolStepInput(spec_id=t.spec_id, role=t.role, session_id=res.session_id, turn=t.turn,
                      step=step, index=index, call_id=call_id, name=name, iteration=t.iteration,
                      workspace=t.workspace, check_timeout_s=limits.check_timeout_s),
        result_type=ToolStepResult,
        start_to_close_timeout=timedelta(
            seconds=(limits.check_timeout_s + 60) if checks else min(limits.turn_timeout_s, 120)),
        heartbeat_timeout=timedelta(seconds=limits.heartbeat_timeout_s),
        retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=500),
                                 maximum_interval=timedelta(seconds=30),
                                 maximum_attempts=limits.effect_max_attempts),
        summary=f"{t.role.value} turn {t.turn} step {step}: {name}",
        cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
    ), f"{t.role.value} turn {t.turn} step {step} {name}")


async def _mark_failed(t: Turn) -> None:
    await workflow.execute_activity(
        "set_session_states",
        SessionStateInput(spec_id=t.spec_id, state="failed", roles=[t.role]),
        summary=f"{t.role.value} session failed", **BOOKKEEPING)


def taint_of(result: AgentTurnResult) -> list[str]:
    """What a turn's output carries downstream: its own step if degraded, and its taint."""
    prov = result.provenance or Provenance()
    own = [result.step_ids[-1]] if prov.trust.value != "full" and result.step_ids else []
    return [*prov.tainted_by, *[s for s in own if s not in prov.tainted_by]]
