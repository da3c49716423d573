"""One agent turn: resolve the role's session, resume its history, call the model.

The turn is idempotent on (session, turn number): each model exchange is
recorded atomically after the model answers, and an attempt that finds an
exchange already recorded uses it instead of calling (and paying for) the
model again. Two attempts alive at once (a retry while a timed-out attempt
still works) never both pay: the turn is leased to one of them. An output
that fails validation gets one repair exchange in the same session, with the
validation error shown to the model.

A paid answer is never thrown away by a registry outage: recording it is
retried patiently while the attempt heartbeats, and the answer rides in the
heartbeat details meanwhile, so if this attempt gives up or dies, the next one
(on any worker) records that answer instead of asking the model again.

An answer cut at max_tokens gets the repair exchange too, told why (and none of
its tool calls run: their input may be cut as well); a refusal ends the turn,
named as one: insisting on the same conversation would only pay for it again.

Cost and budget: the spec's spend so far is read from the registry once per turn
(every session of the spec, every iteration: right after a crash too), and each
model call is checked against the spec's budget before it is made, with an
estimate of its cost (see relay.pricing.estimate_call: the request's JSON size / 3
as input tokens at the dearer of the input and cache-write prices, plus max_tokens
of output at the output price; no count_tokens round trip). A call that would go
over ends the attempt with the non-retryable BudgetExhausted *before* anything is
paid; the workflow waits for a raise and runs the same turn again, which reuses the
exchanges already recorded. An attempt that takes over the lapsed lease of one that
died holding the turn counts that one's unrecorded call as possibly billed (one
registry row, only then: the normal path pays no extra write).
"""

from __future__ import annotations

import asyncio
import functools
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import anthropic
import structlog
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.effects import EffectExecutor
from activities.heartbeat import carried_over, carry, finish_first, patiently, with_heartbeat
from activities.model_errors import bad_response, registry_error, to_temporal_error
from activities.tools import ToolBox, ToolRefused, clean_text, tool_definitions
from activities.turn_lease import TurnLease
from relay import prompts
from relay.models import (
    OUTPUT_MODELS,
    OUTPUT_TOOLS,
    AgentTurnInput,
    AgentTurnResult,
    Role,
    TokenUsage,
    ToolUse,
)
from relay.models import BudgetWait, Cost, SpecCost
from relay.pricing import PriceTable, estimate_call, estimate_input_tokens, load_prices, spec_cost
from relay.registry import AgentSession, Registry, SessionMessage

log = structlog.get_logger("relay.agent_turn")


class Exchange(BaseModel):
    """One recorded or fresh (user message, model answer) pair of a turn."""

    user: list[dict[str, Any]]
    assistant: list[dict[str, Any]]
    model: str
    usage: TokenUsage
    output: dict[str, Any] | None = None
    error: str | None = None
    source: str = "primary"
    trust: str = "full"
    cut: bool = False  # stopped at max_tokens: its tool calls may be cut too, none runs


REFUSED = "the model refused"


def _refusal(content: list[dict[str, Any]]) -> str:
    said = " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    said = " ".join(said.split())[:300]
    return f"{REFUSED}: {said}" if said else f"{REFUSED} (stop_reason refusal, no reason given)"


def _cut_at(max_tokens: int) -> str:
    return (f"the answer was cut at max_tokens ({max_tokens} tokens) before it was complete; "
            f"raise the setting RELAY_MAX_TOKENS if answers need more room")


def _text_only(content: list[dict[str, Any]]) -> str:
    said = " ".join(str(b.get("text", "")) for b in content if b.get("type") == "text")
    said = " ".join(said.split())
    return f" (it answered with text only: {said[:200]!r})" if said else ""


@dataclass
class _Pending:
    """A paid answer not yet recorded, carried in the heartbeats (see heartbeat.carry)."""

    session: str
    turn: int
    step: int
    owner: str
    exchange: dict[str, Any]
    gave_up: bool = False  # its attempt ended: the lease it holds can be superseded

    @classmethod
    def from_details(cls, details: list[Any]) -> _Pending | None:
        item = details[0] if details else None
        if not isinstance(item, dict) or not isinstance(item.get("pending"), dict):
            return None
        try:
            return cls(**item["pending"])
        except TypeError:
            return None

    def details(self) -> dict[str, Any]:
        return {"pending": asdict(self)}


def _tool_results_for(last_assistant: SessionMessage | None) -> list[dict[str, Any]]:
    """The API wants every tool_use answered by a tool_result in the next user message."""
    if last_assistant is None:
        return []
    blocks = []
    for block in last_assistant.content:
        if block.get("type") != "tool_use":
            continue
        if last_assistant.valid:
            blocks.append({"type": "tool_result", "tool_use_id": block["id"], "content": "Accepted."})
        else:
            blocks.append({"type": "tool_result", "tool_use_id": block["id"], "is_error": True,
                           "content": f"Not accepted: {last_assistant.error or 'invalid output'}"})
    return blocks


def _classify(role: Role, content: list[dict[str, Any]],
              tools: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(output, None) for a valid result; (None, error) for an invalid one; (None, None) while
    the agent is still working with its tools."""
    tool = OUTPUT_TOOLS[role]
    call = next((b for b in content if b.get("type") == "tool_use" and b.get("name") == tool), None)
    if call is None:
        if tools and any(b.get("type") == "tool_use" for b in content):
            return None, None
        return None, f"the answer did not call {tool}{_text_only(content)}"
    try:
        parsed = OUTPUT_MODELS[role].model_validate(call.get("input"))
    except ValidationError as exc:
        return None, str(exc)
    return parsed.model_dump(mode="json"), None


@lru_cache(maxsize=None)
def _output_tool(role: Role) -> dict[str, Any]:
    return {"name": OUTPUT_TOOLS[role], "description": f"Submit the {role.value}'s result.",
            "input_schema": OUTPUT_MODELS[role].model_json_schema()}


def _changed_paths(turn: list[dict[str, Any]], toolbox: ToolBox | None) -> list[str]:
    """Files the turn wrote or deleted successfully, from its recorded messages."""
    if toolbox is None:
        return []
    failed = {b.get("tool_use_id") for m in turn if m["role"] == "user" for b in m["content"]
              if b.get("type") == "tool_result" and b.get("is_error")}
    paths: list[str] = []
    for m in turn:
        for b in m["content"] if m["role"] == "assistant" else []:
            if (b.get("type") == "tool_use" and b.get("name") in ("write_file", "delete_file")
                    and b.get("id") not in failed):
                try:
                    relative = toolbox.confine((b.get("input") or {}).get("path"))[1]
                except ToolRefused:
                    continue
                if relative not in paths:
                    paths.append(relative)
    return paths


CHECK_REPORT_MAX = 2000  # characters of a check's output a turn result carries (its tail)


def _tool_log(turn: list[dict[str, Any]], output_tool: str) -> dict[str, Any]:
    """The turn's workspace tool calls with their paths, and the tail of its last run_checks
    output, from its recorded messages (for progress and the reviewer)."""
    results = {b.get("tool_use_id"): b for m in turn if m["role"] == "user" for b in m["content"]
               if isinstance(b, dict) and b.get("type") == "tool_result"}
    uses: list[ToolUse] = []
    report = None
    for m in turn:
        for b in m["content"] if m["role"] == "assistant" else []:
            if b.get("type") != "tool_use" or b.get("name") == output_tool:
                continue
            args = b.get("input") if isinstance(b.get("input"), dict) else {}
            path = args.get("path") if isinstance(args.get("path"), str) else None
            result = results.get(b.get("id")) or {}
            uses.append(ToolUse(name=str(b.get("name"))[:64], path=path[:300] if path else None,
                                error=bool(result.get("is_error"))))
            if b.get("name") == "run_checks" and result:
                content = result.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                if len(text) > CHECK_REPORT_MAX:  # keep "$ command" and "exit code: N"
                    head = "\n".join(text.splitlines()[:2])[:300]
                    text = f"{head}\n...\n{text[-CHECK_REPORT_MAX:]}"
                report = text
    return {"tool_uses": uses[:200], "check_report": report}


def _with_cache_breakpoint(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the end of the conversation cacheable so the next turn reads it from cache."""
    if not messages:
        return messages
    last = dict(messages[-1])
    blocks = [dict(b) for b in last["content"]]
    blocks[-1]["cache_control"] = {"type": "ephemeral"}
    last["content"] = blocks
    return [*messages[:-1], last]


@dataclass
class _TurnState:
    unsandboxed_checks: bool = False  # a run_checks call of this turn ran outside the sandbox
    spend: SpecCost = field(default_factory=SpecCost)  # the spec's, read when the turn began
    paid: Cost = field(default_factory=Cost)  # what this attempt added to it since

    def spent(self, role: Role) -> SpecCost:
        by_role = dict(self.spend.by_role)
        by_role[role.value] = by_role.get(role.value, Cost()) + self.paid
        return SpecCost(total=self.spend.total + self.paid, by_role=by_role)


def _same_activity(owner: str, other: str) -> bool:
    """Two attempts of one activity (a lease owner is run/activity/attempt)."""
    return owner.rsplit("/", 1)[0] == other.rsplit("/", 1)[0]


BUDGET_EXHAUSTED = "BudgetExhausted"


def refuse_over_budget(role: Role, turn: int, step: int, tokens: int, usd: float | None,
                       budget: Any, spent_by_role: Any) -> None:
    """Raise BudgetExhausted (benign, non-retryable) when the next call's estimate would take
    the spec past its budget; one rule for the model_step activity and the legacy agent_turn."""
    spent = spent_by_role  # the spec's spend, per role and in all
    spent_tokens = spent.total.tokens + spent.total.possibly_billed_tokens
    spent_usd = spent.total.usd + spent.total.possibly_billed_usd
    over = []
    if budget.tokens is not None and spent_tokens + tokens > budget.tokens:
        over.append(f"{spent_tokens:,} tokens spent + {tokens:,} estimated > budget "
                    f"{budget.tokens:,} tokens")
    if budget.usd is not None and usd is not None and spent_usd + usd > budget.usd:
        over.append(f"${spent_usd:.4f} spent + ${usd:.4f} estimated > budget "
                    f"${budget.usd:.4f}")
    if not over:
        return
    reason = (f"{role.value} turn {turn} step {step}: the next model call would "
              f"exceed the spec's budget: " + "; ".join(over))
    wait = BudgetWait(role=role, turn=turn, step=step, estimate_tokens=tokens,
                      estimate_usd=usd, spent_tokens=spent_tokens, spent_usd=spent_usd,
                      budget=budget, reason=reason, spend=spent)
    log.warning("agent_turn.budget_exhausted", step=step, reason=reason)
    # BENIGN: an expected pause, logged in one line by the SDK, no traceback, no failure metric
    raise ApplicationError(reason, wait.model_dump(mode="json"), type=BUDGET_EXHAUSTED,
                           non_retryable=True, category=ApplicationErrorCategory.BENIGN)


class AgentTurnActivities:
    def __init__(self, registry: Registry, model_client: anthropic.AsyncAnthropic, model: str,
                 max_tokens: int = 4096, executor: EffectExecutor | None = None,
                 prices: PriceTable | None = None) -> None:
        self.registry = registry
        self.executor = executor
        self.client = model_client
        self.model = model
        self.max_tokens = max_tokens
        self.prices = prices or load_prices()

    @activity.defn(name="agent_turn")
    async def agent_turn(self, inp: AgentTurnInput) -> AgentTurnResult:
        info = activity.info()
        structlog.contextvars.bind_contextvars(
            spec_id=inp.spec_id, workflow_id=info.workflow_id, run_id=info.workflow_run_id,
            role=inp.role.value, turn=inp.turn, attempt=info.attempt,
        )
        try:
            return await with_heartbeat(self._turn(inp))
        except Exception as exc:
            if (outage := registry_error(exc)) is not None:
                log.warning("agent_turn.registry_unavailable", error=outage.message)
                raise outage from None
            raise
        finally:
            structlog.contextvars.unbind_contextvars(
                "spec_id", "workflow_id", "run_id", "role", "turn", "attempt", "session_id")

    async def _turn(self, inp: AgentTurnInput) -> AgentTurnResult:
        prompt = prompts.load(inp.role)
        try:
            text = prompt.render(inp.kind, inp.variables)
        except KeyError as exc:
            raise ApplicationError(str(exc), type="InvalidTurnInput", non_retryable=True) from None
        lease = TurnLease.for_this_attempt(self.registry)
        pending = _Pending.from_details(carried_over())
        if pending is not None and pending.turn == inp.turn:
            carry(pending.details())  # still not recorded: keep it for the next attempt too
            if pending.gave_up:
                lease.supersede = pending.owner
        else:
            pending = None
        try:
            session, created, history, lease.held = await patiently(
                self.registry.begin_turn, inp.spec_id, inp.role, inp.turn, lease.owner,
                lease.ttl_s, lease.supersede, what="begin_turn")
            structlog.contextvars.bind_contextvars(session_id=session.id)
            if lease.held and session.lease_owner not in (None, lease.owner, lease.supersede):
                lease.took_over = session.lease_owner  # read before the claim: it lapsed
            if await lease.wait_for(session.id):
                # the other attempt recorded some steps, or all of them, meanwhile
                session, created, history, _ = await patiently(
                    self.registry.begin_turn, inp.spec_id, inp.role, inp.turn, lease.owner,
                    lease.ttl_s, what="begin_turn")
            async with lease.renewed(session.id):
                return await self._steps(inp, prompt, text, session, created, history, lease,
                                         pending if pending and pending.session == session.id
                                         else None)
        finally:
            await lease.end()

    async def _steps(self, inp: AgentTurnInput, prompt: prompts.RolePrompt, text: str,
                     session: AgentSession, created: bool, history: list[SessionMessage],
                     lease: TurnLease, pending: _Pending | None) -> AgentTurnResult:
        """The turn's tool loop: recorded exchanges are reused, new ones paid for and recorded
        (or, paid for by an earlier attempt that could not record them, recorded now)."""
        before = [m for m in history if m.turn < inp.turn]
        recorded = {(m.step, m.role): m for m in history if m.turn == inp.turn}
        log.info("agent_turn.start", scenario="A" if created else "B", history=len(before))

        tool = OUTPUT_TOOLS[inp.role]
        toolbox = self._toolbox(inp)
        offered = [_output_tool(inp.role), *(tool_definitions(inp.role) if toolbox else [])]
        usage = TokenUsage()
        conversation = [{"role": m.role, "content": m.content} for m in before]
        turn_start = len(conversation)
        last_assistant = next((m for m in reversed(before) if m.role == "assistant"), None)
        user = [*_tool_results_for(last_assistant), {"type": "text", "text": text}]
        replayed, repaired, invalid_streak = True, False, 0
        state = _TurnState(spend=spec_cost(
            *await patiently(self.registry.spend, inp.spec_id, what="spend"), self.prices))
        for step in range(inp.max_tool_steps):
            exchange = self._recorded(recorded, step, inp.role, toolbox is not None)
            if exchange is not None and pending is not None and pending.step == step:
                carry(None)  # the earlier attempt's answer is recorded after all
                pending = None
            if exchange is None:
                replayed = False
                if pending is not None and pending.step == step:
                    # paid for by an earlier attempt that could not record it: record, not re-ask
                    exchange = Exchange.model_validate(pending.exchange)
                    log.info("agent_turn.carried_answer_used", step=step,
                             from_attempt=pending.owner)
                    pending = None
                else:
                    lease.check()
                    await self._before_call(inp, session, step, lease, state, prompt.system,
                                            offered, [*conversation, {"role": "user",
                                                                      "content": user}])
                    exchange = await self._call_model(prompt.system, inp.role, offered,
                                                      conversation, user, forced=toolbox is None)
                stored = await self._record(inp, prompt, session, step, exchange, lease)
                lease.released = stored and exchange.output is not None
                if stored:
                    state.paid = state.paid + self._cost(exchange.model, exchange.usage)
                else:  # paid, yet discarded: counted as possibly billed, never dropped
                    await self._possibly_billed(inp, session, step, lease.owner, state,
                                                "duplicate_discarded", exchange.model,
                                                *self._usage_cost(exchange.model, exchange.usage))
                if not stored:  # a concurrent attempt recorded this exchange first: use theirs
                    fresh = await patiently(self.registry.messages, session.id, what="messages")
                    recorded = {(m.step, m.role): m for m in fresh if m.turn == inp.turn}
                    exchange = self._recorded(recorded, step, inp.role, toolbox is not None)
                    assert exchange is not None
                    log.info("agent_turn.duplicate_attempt_discarded", step=step)
                else:
                    usage = usage + exchange.usage
            conversation += [{"role": "user", "content": exchange.user},
                             {"role": "assistant", "content": exchange.assistant}]
            calls = [b for b in exchange.assistant if b.get("type") == "tool_use"]
            if exchange.output is not None:
                for index, call in enumerate(calls):  # tools called beside the result still run
                    if call.get("name") != tool and toolbox is not None:
                        await self._run_tool(toolbox, call, step, index, state)
                log.info("agent_turn.done", replayed=replayed, repaired=repaired, steps=step + 1,
                         input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
                return AgentTurnResult(
                    session_id=session.id, session_name=session.name, turn=inp.turn,
                    output=exchange.output, model=exchange.model, source=exchange.source,
                    trust=exchange.trust, usage=usage, replayed=replayed, repaired=repaired,
                    tool_calls=sum(1 for m in conversation[turn_start:] if m["role"] == "assistant"
                                   for b in m["content"]
                                   if b.get("type") == "tool_use" and b.get("name") != tool),
                    changed_paths=_changed_paths(conversation[turn_start:], toolbox),
                    **_tool_log(conversation[turn_start:], tool),
                    unsandboxed_checks=state.unsandboxed_checks,
                    spend=state.spent(inp.role), cost_usd=state.paid.usd,
                )
            if exchange.error is not None and exchange.error.startswith(REFUSED):
                log.warning("agent_turn.refused", step=step, error=exchange.error)
                await self._mark_failed(inp)
                raise ApplicationError(f"{inp.role.value} turn {inp.turn}: {exchange.error}",
                                       type="ModelRefused", non_retryable=True)
            if exchange.error is not None:
                log.warning("agent_turn.invalid_output", step=step, error=exchange.error)
                invalid_streak += 1
                if invalid_streak == 2:
                    await self._mark_failed(inp)
                    raise ApplicationError(
                        f"{inp.role.value} gave invalid output twice (turn {inp.turn}); "
                        f"last error: {exchange.error}", type="InvalidModelOutput", non_retryable=True)
                repaired = True
            else:
                invalid_streak = 0
            cut = exchange.cut or (exchange.error or "").startswith("the answer was cut at max_tokens")
            if cut:
                repair = (f"Your last answer was cut off at max_tokens ({self.max_tokens} tokens, "
                          f"the setting RELAY_MAX_TOKENS) before it was complete, so it was not "
                          f"accepted and none of its tool calls ran. "
                          f"Answer again, more concisely, and call {tool} with complete input "
                          f"that matches its schema.")
            else:
                repair = prompt.render("repair", {"tool": tool, "error": exchange.error or ""})
            user = []
            for index, call in enumerate(calls):
                if call.get("name") == tool or cut:
                    user.append({"type": "tool_result", "tool_use_id": call["id"], "is_error": True,
                                 "content": repair})
                elif toolbox is None:
                    user.append({"type": "tool_result", "tool_use_id": call["id"], "is_error": True,
                                 "content": f"refused: no tools are available; call {tool}"})
                else:
                    user.append(await self._run_tool(toolbox, call, step, index, state))
            if not user or (cut and not any(c.get("name") == tool for c in calls)):
                user.append({"type": "text", "text": repair})

        await self._mark_failed(inp)
        raise ApplicationError(
            f"{inp.role.value} tool loop cut at {inp.max_tool_steps} model calls without a result "
            f"(turn {inp.turn})", type="ToolLoopExceeded", non_retryable=True)

    # --- cost and budget ------------------------------------------------------------------

    def _usage_cost(self, model: str, usage: TokenUsage) -> tuple[int, float | None]:
        price = self.prices.price(model)
        args = (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
                usage.cache_creation_input_tokens)
        return sum(args), (price.cost(*args) if price else None)

    def _cost(self, model: str, usage: TokenUsage) -> Cost:
        tokens, usd = self._usage_cost(model, usage)
        return Cost(tokens=tokens, calls=1, usd=usd or 0.0,
                    unpriced_models=[model] if usd is None and tokens else [])

    async def _possibly_billed(self, inp: AgentTurnInput, session: AgentSession, step: int,
                               owner: str, state: _TurnState, reason: str, model: str,
                               tokens: int, usd: float | None) -> None:
        counted = await patiently(
            self.registry.record_possibly_billed, inp.spec_id, session.id, turn=inp.turn,
            step=step, owner=owner, reason=reason, model=model, tokens=tokens, usd=usd,
            what="record_possibly_billed")
        log.warning("agent_turn.possibly_billed", step=step, reason=reason, lost_attempt=owner,
                    tokens=tokens, usd=usd, counted=counted)
        if counted:
            state.paid = state.paid + Cost(possibly_billed_calls=1, possibly_billed_tokens=tokens,
                                           possibly_billed_usd=usd or 0.0)

    async def _before_call(self, inp: AgentTurnInput, session: AgentSession, step: int,
                           lease: TurnLease, state: _TurnState, system: str,
                           offered: list[dict[str, Any]], messages: list[dict[str, Any]]) -> None:
        """Before paying for a call: count the lost call of an attempt this one took over, and
        refuse the call (BudgetExhausted) if its estimate would take the spec over budget."""
        budget = inp.budget
        limited = budget is not None and (budget.usd is not None or budget.tokens is not None)
        lost = lease.took_over
        if not limited and lost is None:
            return  # nothing to check: no estimate is made
        tokens, usd = estimate_call(self.prices.price(self.model),
                                    estimate_input_tokens(system, offered, messages),
                                    self.max_tokens)
        if lost is not None:
            lease.took_over = None
            if _same_activity(lost, lease.owner):  # an earlier attempt of this very turn
                await self._possibly_billed(inp, session, step, lost, state, "attempt_lost",
                                            self.model, tokens, usd)
        if not limited:
            return
        assert budget is not None
        refuse_over_budget(inp.role, inp.turn, step, tokens, usd, budget,
                           state.spent(inp.role))

    def _toolbox(self, inp: AgentTurnInput) -> ToolBox | None:
        if inp.workspace is None or self.executor is None:
            return None
        return ToolBox(role=inp.role, workspace=inp.workspace, executor=self.executor,
                       spec_id=inp.spec_id, run_id=activity.info().workflow_run_id,
                       step_prefix=f"i{inp.iteration}/{inp.role.value}/t{inp.turn}",
                       check_timeout_s=inp.check_timeout_s)

    async def _record(self, inp: AgentTurnInput, prompt: prompts.RolePrompt, session: AgentSession,
                      step: int, exchange: Exchange, lease: TurnLease) -> bool:
        """Record a paid exchange, patiently: through a registry outage the answer is carried in
        the heartbeats, so that if this attempt gives up (or dies) the next one records it."""
        pending = _Pending(session=session.id, turn=inp.turn, step=step, owner=lease.owner,
                           exchange=exchange.model_dump(mode="json", exclude_defaults=True))
        append = functools.partial(
            self.registry.append_exchange, session.id, turn=inp.turn, step=step,
            user_content=exchange.user, assistant_content=exchange.assistant,
            model=exchange.model, usage=exchange.usage, error=exchange.error,
            valid=True if exchange.output is not None else (
                False if exchange.error is not None else None),
            prompt_version=prompt.version, source=exchange.source, trust=exchange.trust,
            status="idle" if exchange.output is not None else None,
            release_lease=lease.owner if exchange.output is not None else None)
        try:
            stored = await asyncio.to_thread(append)
        except Exception as exc:
            if registry_error(exc) is None:
                raise
            carry(pending.details())
            log.warning("agent_turn.record_failed", step=step, carried=True,
                        error=str(registry_error(exc).message))
            try:
                stored = await patiently(append, what="append_exchange")
            except Exception:
                pending.gave_up = True  # this attempt ends: the next one may take its lease
                carry(pending.details())
                raise
            log.info("agent_turn.recorded_after_outage", step=step)
            carry(None)
            return stored
        if carried_over():
            carry(None)  # the attempt's heartbeats carry nothing now
        return stored

    async def _mark_failed(self, inp: AgentTurnInput) -> None:
        """Bookkeeping on the way out: its failure is logged, never raised over the turn's own
        (non-retryable) reason."""
        try:
            await patiently(self.registry.set_status, inp.spec_id, [inp.role], "failed",
                            what="set_status", budget_s=5.0)
        except Exception as exc:  # noqa: BLE001
            log.warning("agent_turn.set_status_failed", error=str(exc))

    async def _run_tool(self, toolbox: ToolBox, call: dict[str, Any], step: int,
                        index: int, state: _TurnState) -> dict[str, Any]:
        outcome = await finish_first(asyncio.to_thread(
            toolbox.run, call.get("name", ""), call.get("input"), f"x{step}/c{index}"))
        if call.get("name") == "run_checks" and getattr(outcome, "unsandboxed", False):
            state.unsandboxed_checks = True
        log.info("agent_turn.tool", tool=call.get("name"), error=outcome.is_error)
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call["id"],
                                 "content": clean_text(outcome.text)}
        if outcome.is_error:
            block["is_error"] = True
        return block

    @staticmethod
    def _recorded(recorded: dict[tuple[int, str], SessionMessage], step: int,
                  role: Role, tools: bool) -> Exchange | None:
        user, answer = recorded.get((step, "user")), recorded.get((step, "assistant"))
        if user is None or answer is None:
            return None
        if answer.valid:
            output, error = _classify(role, answer.content, tools)
        else:
            output, error = None, answer.error
        return Exchange(
            user=user.content, assistant=answer.content, model=answer.model or "", output=output,
            error=error, source=answer.source, trust=answer.trust,
            usage=TokenUsage(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                             cache_read_input_tokens=answer.cache_read_tokens,
                             cache_creation_input_tokens=answer.cache_write_tokens),
        )

    async def _call_model(self, system: str, role: Role, offered: list[dict[str, Any]],
                          conversation: list[dict[str, Any]], user: list[dict[str, Any]],
                          *, forced: bool) -> Exchange:
        messages = _with_cache_breakpoint([*conversation, {"role": "user", "content": user}])
        tool_choice = ({"type": "tool", "name": OUTPUT_TOOLS[role], "disable_parallel_tool_use": True}
                       if forced else {"type": "any"})
        try:
            message = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                messages=messages,  # type: ignore[arg-type]
                tools=offered,  # type: ignore[arg-type]
                tool_choice=tool_choice,  # type: ignore[arg-type]
            )
        except (anthropic.AnthropicError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            # cause kept for the worker's log; the message Temporal records is one clean line
            raise to_temporal_error(exc, endpoint=str(self.client.base_url)) from exc
        try:
            content = [b.model_dump(mode="json", exclude_none=True) for b in message.content]
            u = message.usage
            usage = TokenUsage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                               cache_read_input_tokens=u.cache_read_input_tokens or 0,
                               cache_creation_input_tokens=u.cache_creation_input_tokens or 0)
        except (AttributeError, TypeError, ValueError) as exc:  # valid JSON, not a Message
            raise bad_response(str(self.client.base_url),
                               f"not a Messages API answer: {type(exc).__name__}") from exc
        output, error = _classify(role, content, not forced)
        stop = getattr(message, "stop_reason", None)
        cut = stop == "max_tokens" and output is None
        if stop == "refusal":
            output, error = None, _refusal(content)
        elif cut:
            error = _cut_at(self.max_tokens)
        return Exchange(user=user, assistant=content, model=message.model, output=output,
                        error=error, usage=usage, cut=cut)
