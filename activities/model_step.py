"""One step of an agent turn's loop: one model call, or one tool call. The loop itself is
workflow code (workflows/agent_loop.py); these are its activities.

`model_step` reads the role's session from the registry (creating it: scenario A; finding it:
scenario B), composes the step's user message (the turn's prompt at step 0; the previous
step's tool results or a repair request after it), calls the model, records the exchange
idempotently on (session, turn, step) and returns a compact result: the output or the tool
calls, the usage and the step's provenance. The bodies stay in the registry.

A recorded step is never paid twice: an attempt that finds the step recorded returns it.
A paid answer whose recording fails (a registry outage) rides in the heartbeat details, so
the next attempt records it instead of asking again (heartbeat.carry, per activity).

Two live attempts of one step never both pay. With one model call per activity the window
is smaller than with a whole turn, but it is still there: Temporal starts a retry when an
attempt's heartbeat or start-to-close timeout lapses, and it cannot stop the old attempt if
its worker lost the server (a partition, a stalled event loop): that attempt goes on, pays
for its call, and only learns of the retry at its next heartbeat. So the session lease
(activities/turn_lease.py) stays, per step: taken in the transaction that reads the
session, ended in the one that records the exchange, and waited for by a second attempt —
no extra registry write per step. tests/test_agent_loop.py shows the case.

Gate 1 lives in the workflow; this activity only says what failed: a capacity error (429,
529, 5xx, timeouts, connection errors) is retried here `capacity_attempts` times, then
raised non-retryable with its type so the workflow falls back or waits; a retry-after longer
than `max_retry_after_s` does that at once. Other errors keep their meaning (a refusal, a 4xx).

Cost and budget (as agent_turn did per turn): the spec's spend is read from the registry at
each step, and a call is checked against the spec's budget before it is paid, with an
estimate of its cost (relay.pricing.estimate_call). A call that would go over ends the step
with the non-retryable, benign BudgetExhausted before anything is paid; the workflow waits
for a raise and makes the same step again. An attempt that takes over the lapsed lease of an
attempt of this step that died holding it counts that one's unrecorded call as possibly
billed; a paid answer discarded because a concurrent attempt recorded the step first is
counted the same way. Tool results are cleaned (activities.tools.clean_text) before they
reach the model.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import anthropic
import httpx2
import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.agent_turn import (
    refuse_over_budget,
    BUDGET_EXHAUSTED, CHECK_REPORT_MAX, REFUSED, Exchange, _classify, _cut_at, _output_tool,
    _Pending, _refusal, _same_activity, _tool_results_for, _TurnState, _with_cache_breakpoint,
)
from activities.effects import EffectExecutor
from activities.heartbeat import carried_over, carry, finish_first, patiently, with_heartbeat
from activities.model_errors import bad_response, registry_error, to_temporal_error
from activities.tools import ToolBox, ToolRefused, clean_text, tool_definitions
from activities.turn_lease import TurnLease
from relay import prompts
from relay.models import (
    OUTPUT_TOOLS, ModelStepInput, ModelStepResult, Provenance, RecheckInput, RecheckResult, Role,
    BudgetWait, Cost, Source, SpecCost, TokenUsage, ToolCallRef, ToolResultBlock, ToolStepInput,
    ToolStepResult, ToolUse, Trust,
)
from relay.pricing import PriceTable, estimate_call, estimate_input_tokens, load_prices, spec_cost
from relay.registry import AgentSession, GateRecord, Registry, SessionMessage

log = structlog.get_logger("relay.agent_turn")

# Error types that mean "no capacity now", never "this answer is bad": they alone trip Gate 1.
CAPACITY_ERRORS = ("ModelRateLimited", "ModelOverloaded", "ModelServerError", "ModelTimeout",
                   "ModelUnreachable", "ModelConflict")

# A model call's timeout, sized to the answer it may produce: a connection and first-byte
# allowance plus a generous per-token rate. 4,096 tokens: 30 + 4096/50 ≈ 112 s.
CALL_BASE_S, TOKENS_PER_S = 30.0, 50.0


def call_timeout(max_tokens: int, configured: float | None = None) -> float:
    return configured if configured else CALL_BASE_S + max_tokens / TOKENS_PER_S


def step_id(role: Role, turn: int, step: int) -> str:
    return f"{role.value}/t{turn}/s{step}"


def _taint_in(history: list[SessionMessage], role: Role, before: tuple[int, int]) -> list[str]:
    """Unverified degraded or untrusted answers of the session before (turn, step): the taint a
    step inherits from its own history, earlier iterations included, until verified."""
    return [step_id(role, m.turn, m.step) for m in history
            if m.role == "assistant" and m.trust != Trust.full.value and not m.verified_by
            and (m.turn, m.step) < before]


def _merge(*lists: list[str]) -> list[str]:
    out: list[str] = []
    for items in lists:
        out += [i for i in items if i not in out]
    return out


class ModelStepActivities:
    def __init__(self, registry: Registry, model_client: anthropic.AsyncAnthropic, model: str,
                 max_tokens: int = 4096, executor: EffectExecutor | None = None,
                 prices: PriceTable | None = None) -> None:
        self.registry = registry
        self.client = model_client
        self.model = model
        self.max_tokens = max_tokens
        self.executor = executor
        self.prices = prices or load_prices()

    # --- the model call ---------------------------------------------------------------

    @activity.defn(name="model_step")
    async def model_step(self, inp: ModelStepInput) -> ModelStepResult:
        info = activity.info()
        structlog.contextvars.bind_contextvars(
            spec_id=inp.spec_id, workflow_id=info.workflow_id, run_id=info.workflow_run_id,
            role=inp.role.value, turn=inp.turn, step=inp.step, attempt=info.attempt)
        try:
            return await with_heartbeat(self._step(inp))
        except ApplicationError as exc:
            raise self._gate1(inp, exc) from exc.__cause__
        except Exception as exc:
            if (outage := registry_error(exc)) is not None:
                log.warning("agent_turn.registry_unavailable", error=outage.message)
                raise outage from None
            raise
        finally:
            structlog.contextvars.unbind_contextvars(
                "spec_id", "workflow_id", "run_id", "role", "turn", "step", "attempt",
                "session_id")

    def _gate1(self, inp: ModelStepInput, exc: ApplicationError) -> ApplicationError:
        """A capacity error that used up this model's attempts (or asks for a longer wait than
        allowed) goes to the workflow, which falls back or waits; others stay as they are."""
        if exc.type not in CAPACITY_ERRORS or exc.non_retryable:
            return exc
        wait = exc.next_retry_delay.total_seconds() if exc.next_retry_delay else 0.0
        if activity.info().attempt < inp.capacity_attempts and wait <= inp.max_retry_after_s:
            return exc
        return ApplicationError(exc.message, {"retry_after_s": wait, "model": inp.model or self.model},
                                type=exc.type, non_retryable=True)

    async def _step(self, inp: ModelStepInput) -> ModelStepResult:
        prompt = prompts.load(inp.role)
        lease = TurnLease.for_this_attempt(self.registry)
        pending = _Pending.from_details(carried_over())
        if pending is not None and (pending.turn, pending.step) == (inp.turn, inp.step):
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
            if self._recorded(history, inp) is None and await lease.wait_for(session.id):
                # another live attempt held the step: it may have recorded it meanwhile
                history = await patiently(self.registry.messages, session.id, what="messages")
            if (done := self._recorded(history, inp)) is not None:
                if pending is not None:
                    carry(None)
                result = self._result(inp, session, done, prompt.version, history, replayed=True)
                result.spend = await self._spend(inp)
                return result
            async with lease.renewed(session.id):
                return await self._pay(inp, prompt, session, created, history, lease, pending)
        finally:
            await lease.end()

    async def _pay(self, inp: ModelStepInput, prompt: prompts.RolePrompt, session: AgentSession,
                   created: bool, history: list[SessionMessage], lease: TurnLease,
                   pending: _Pending | None) -> ModelStepResult:
        tools = inp.workspace is not None and self.executor is not None
        conversation = [{"role": m.role, "content": m.content} for m in history
                        if (m.turn, m.step) < (inp.turn, inp.step)]
        user = self._user(inp, prompt, history, tools)
        state = _TurnState(spend=await self._spend(inp))
        if pending is not None and pending.session == session.id:
            exchange = Exchange.model_validate(pending.exchange)
            log.info("agent_turn.carried_answer_used", step=inp.step, from_attempt=pending.owner)
        else:
            if inp.step == 0:
                log.info("agent_turn.start", scenario="A" if created else "B",
                         history=len(conversation))
            lease.check()
            await self._before_call(inp, session, lease, state, prompt.system, conversation,
                                    user, tools)
            exchange = await self._call_model(inp, prompt.system, conversation, user, tools)
        if inp.source != Source.primary:
            exchange.source, exchange.trust = inp.source.value, Trust.degraded.value
        tainted = _merge(inp.tainted_by, _taint_in(history, inp.role, (inp.turn, inp.step)))
        stored = await self._record(inp, prompt, session, exchange, lease, tainted)
        if not stored:  # a concurrent attempt recorded this step first: theirs stands
            # paid, yet discarded: counted as possibly billed, never dropped
            await self._possibly_billed(inp, session, lease.owner, state, "duplicate_discarded",
                                        exchange.model,
                                        *self._usage_cost(exchange.model, exchange.usage))
            fresh = await patiently(self.registry.messages, session.id, what="messages")
            done = self._recorded(fresh, inp)
            assert done is not None
            log.info("agent_turn.duplicate_attempt_discarded", step=inp.step)
            result = self._result(inp, session, done, prompt.version, fresh, replayed=True)
            result.spend, result.cost_usd = state.spent(inp.role), state.paid.usd
            return result
        state.paid = state.paid + self._cost(exchange.model, exchange.usage)
        if exchange.error is not None and exchange.error.startswith(REFUSED):
            log.warning("agent_turn.refused", step=inp.step, error=exchange.error)
        elif exchange.error is not None:
            log.warning("agent_turn.invalid_output", step=inp.step, error=exchange.error)
        elif exchange.output is not None:
            log.info("agent_turn.done", steps=inp.step + 1, source=exchange.source,
                     model=exchange.model, input_tokens=exchange.usage.input_tokens,
                     output_tokens=exchange.usage.output_tokens)
        return ModelStepResult(
            session_id=session.id, session_name=session.name,
            step_id=step_id(inp.role, inp.turn, inp.step), output=exchange.output,
            error=exchange.error, refused=(exchange.error or "").startswith(REFUSED),
            cut=exchange.cut, tool_calls=_calls(inp.role, exchange.assistant), usage=exchange.usage,
            provenance=Provenance(source=Source(exchange.source), trust=Trust(exchange.trust),
                                  model=exchange.model, prompt_version=prompt.version,
                                  tainted_by=tainted),
            spend=state.spent(inp.role), cost_usd=state.paid.usd)

    # --- cost and budget ------------------------------------------------------------------

    async def _spend(self, inp: ModelStepInput) -> SpecCost:
        """The spec's cost so far (every session, every iteration), as the registry has it."""
        return spec_cost(*await patiently(self.registry.spend, inp.spec_id, what="spend"),
                         self.prices)

    def _usage_cost(self, model: str, usage: TokenUsage) -> tuple[int, float | None]:
        price = self.prices.price(model)
        args = (usage.input_tokens, usage.output_tokens, usage.cache_read_input_tokens,
                usage.cache_creation_input_tokens)
        return sum(args), (price.cost(*args) if price else None)

    def _cost(self, model: str, usage: TokenUsage) -> Cost:
        tokens, usd = self._usage_cost(model, usage)
        return Cost(tokens=tokens, calls=1, usd=usd or 0.0,
                    unpriced_models=[model] if usd is None and tokens else [])

    async def _possibly_billed(self, inp: ModelStepInput, session: AgentSession, owner: str,
                               state: _TurnState, reason: str, model: str, tokens: int,
                               usd: float | None) -> None:
        counted = await patiently(
            self.registry.record_possibly_billed, inp.spec_id, session.id, turn=inp.turn,
            step=inp.step, owner=owner, reason=reason, model=model, tokens=tokens, usd=usd,
            what="record_possibly_billed")
        log.warning("agent_turn.possibly_billed", step=inp.step, reason=reason,
                    lost_attempt=owner, tokens=tokens, usd=usd, counted=counted)
        if counted:
            state.paid = state.paid + Cost(possibly_billed_calls=1, possibly_billed_tokens=tokens,
                                           possibly_billed_usd=usd or 0.0)

    async def _before_call(self, inp: ModelStepInput, session: AgentSession, lease: TurnLease,
                           state: _TurnState, system: str, conversation: list[dict[str, Any]],
                           user: list[dict[str, Any]], tools: bool) -> None:
        """Before paying for a call: count the lost call of an attempt this one took over, and
        refuse the call (BudgetExhausted) if its estimate would take the spec over budget."""
        budget = inp.budget
        limited = budget is not None and (budget.usd is not None or budget.tokens is not None)
        lost = lease.took_over
        if not limited and lost is None:
            return  # nothing to check: no estimate is made
        model = inp.model or self.model
        offered = [_output_tool(inp.role), *(tool_definitions(inp.role) if tools else [])]
        messages = [*conversation, {"role": "user", "content": user}]
        tokens, usd = estimate_call(self.prices.price(model),
                                    estimate_input_tokens(system, offered, messages),
                                    self.max_tokens)
        if lost is not None:
            lease.took_over = None
            if _same_activity(lost, lease.owner):  # an earlier attempt of this very step
                await self._possibly_billed(inp, session, lost, state, "attempt_lost", model,
                                            tokens, usd)
        if not limited:
            return
        assert budget is not None
        refuse_over_budget(inp.role, inp.turn, inp.step, tokens, usd, budget,
                           state.spent(inp.role))

    def _user(self, inp: ModelStepInput, prompt: prompts.RolePrompt,
              history: list[SessionMessage], tools: bool) -> list[dict[str, Any]]:
        """The step's user message: the turn's prompt, or what answers the previous step."""
        if inp.step == 0:
            try:
                text = prompt.render(inp.kind, inp.variables)
            except KeyError as exc:
                raise ApplicationError(str(exc), type="InvalidTurnInput",
                                       non_retryable=True) from None
            before = [m for m in history if m.turn < inp.turn]
            last = next((m for m in reversed(before) if m.role == "assistant"), None)
            return [*_tool_results_for(last), {"type": "text", "text": text}]
        previous = next((m for m in history if (m.turn, m.step, m.role)
                         == (inp.turn, inp.step - 1, "assistant")), None)
        if previous is None:
            raise ApplicationError(f"step {inp.step - 1} of {inp.role.value} turn {inp.turn} is "
                                   "not recorded", type="InvalidTurnInput", non_retryable=True)
        tool = OUTPUT_TOOLS[inp.role]
        error = None if previous.valid else previous.error
        cut = (error or "").startswith("the answer was cut at max_tokens")
        if cut:
            repair = (f"Your last answer was cut off at max_tokens ({self.max_tokens} tokens, "
                      f"the setting RELAY_MAX_TOKENS) before it was complete, so it was not "
                      f"accepted and none of its tool calls ran. "
                      f"Answer again, more concisely, and call {tool} with complete input "
                      f"that matches its schema.")
        else:
            repair = prompt.render("repair", {"tool": tool, "error": error or ""})
        results = {r.tool_use_id: r for r in inp.tool_results}
        user: list[dict[str, Any]] = []
        calls = [b for b in previous.content if b.get("type") == "tool_use"]
        for call in calls:
            if call.get("name") == tool or cut:
                user.append({"type": "tool_result", "tool_use_id": call["id"], "is_error": True,
                             "content": repair})
            elif not tools:
                user.append({"type": "tool_result", "tool_use_id": call["id"], "is_error": True,
                             "content": f"refused: no tools are available; call {tool}"})
            else:
                given = results.get(call["id"])
                block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call["id"],
                                         "content": given.content if given else "not run"}
                if given is None or given.is_error:
                    block["is_error"] = True
                user.append(block)
        if not user or (cut and not any(c.get("name") == tool for c in calls)):
            user.append({"type": "text", "text": repair})
        return user

    @staticmethod
    def _recorded(history: list[SessionMessage], inp: ModelStepInput
                  ) -> tuple[SessionMessage, SessionMessage] | None:
        found = {m.role: m for m in history if (m.turn, m.step) == (inp.turn, inp.step)}
        if "user" in found and "assistant" in found:
            return found["user"], found["assistant"]
        return None

    def _result(self, inp: ModelStepInput, session: AgentSession,
                done: tuple[SessionMessage, SessionMessage], version: str,
                history: list[SessionMessage], *, replayed: bool) -> ModelStepResult:
        _, answer = done
        tools = inp.workspace is not None and self.executor is not None
        if answer.valid:
            output, error = _classify(inp.role, answer.content, tools)
        else:
            output, error = None, answer.error
        tainted = answer.tainted_by if answer.tainted_by is not None else _merge(
            inp.tainted_by, _taint_in(history, inp.role, (inp.turn, inp.step)))
        return ModelStepResult(
            session_id=session.id, session_name=session.name,
            step_id=step_id(inp.role, inp.turn, inp.step), output=output, error=error,
            refused=(error or "").startswith(REFUSED),
            cut=(error or "").startswith("the answer was cut at max_tokens"),
            tool_calls=_calls(inp.role, answer.content), replayed=replayed,
            usage=TokenUsage(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                             cache_read_input_tokens=answer.cache_read_tokens,
                             cache_creation_input_tokens=answer.cache_write_tokens),
            provenance=Provenance(source=Source(answer.source), trust=Trust(answer.trust),
                                  model=answer.model or "",
                                  prompt_version=answer.prompt_version or version,
                                  tainted_by=list(tainted)))

    async def _record(self, inp: ModelStepInput, prompt: prompts.RolePrompt,
                      session: AgentSession, exchange: Exchange, lease: TurnLease,
                      tainted: list[str]) -> bool:
        """Record a paid exchange, patiently: through a registry outage the answer is carried in
        the heartbeats, so that if this attempt gives up (or dies) the next one records it."""
        pending = _Pending(session=session.id, turn=inp.turn, step=inp.step, owner=lease.owner,
                           exchange=exchange.model_dump(mode="json", exclude_defaults=True))
        refused = (exchange.error or "").startswith(REFUSED)
        append = functools.partial(
            self.registry.append_exchange, session.id, turn=inp.turn, step=inp.step,
            user_content=exchange.user, assistant_content=exchange.assistant,
            model=exchange.model, usage=exchange.usage, error=exchange.error,
            valid=True if exchange.output is not None else (
                False if exchange.error is not None else None),
            prompt_version=prompt.version, source=exchange.source, trust=exchange.trust,
            status="idle" if exchange.output is not None else ("failed" if refused else None),
            release_lease=lease.owner, tainted_by=tainted)
        try:
            stored = await asyncio.to_thread(append)
        except Exception as exc:
            if registry_error(exc) is None:
                raise
            carry(pending.details())
            log.warning("agent_turn.record_failed", step=inp.step, carried=True,
                        error=str(registry_error(exc).message))
            try:
                stored = await patiently(append, what="append_exchange")
            except Exception:
                pending.gave_up = True  # this attempt ends: the next one may take its lease
                carry(pending.details())
                raise
            log.info("agent_turn.recorded_after_outage", step=inp.step)
            carry(None)
            lease.released = True
            return stored
        if carried_over():
            carry(None)
        lease.released = stored
        return stored

    async def _call_model(self, inp: ModelStepInput, system: str,
                          conversation: list[dict[str, Any]], user: list[dict[str, Any]],
                          tools: bool) -> Exchange:
        role = inp.role
        offered = [_output_tool(role), *(tool_definitions(role) if tools else [])]
        messages = _with_cache_breakpoint([*conversation, {"role": "user", "content": user}])
        tool_choice = ({"type": "tool", "name": OUTPUT_TOOLS[role], "disable_parallel_tool_use": True}
                       if not tools else {"type": "any"})
        timeout = call_timeout(self.max_tokens, inp.call_timeout_s)
        try:
            message = await self.client.messages.create(
                model=inp.model or self.model,
                max_tokens=self.max_tokens,
                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                messages=messages,  # type: ignore[arg-type]
                tools=offered,  # type: ignore[arg-type]
                tool_choice=tool_choice,  # type: ignore[arg-type]
                timeout=httpx2.Timeout(timeout, connect=min(10.0, timeout)),
            )
        except (anthropic.AnthropicError, json.JSONDecodeError, UnicodeDecodeError) as exc:
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
        output, error = _classify(role, content, tools)
        stop = getattr(message, "stop_reason", None)
        cut = stop == "max_tokens" and output is None
        if stop == "refusal":
            output, error = None, _refusal(content)
        elif cut:
            error = _cut_at(self.max_tokens)
        return Exchange(user=user, assistant=content, model=message.model, output=output,
                        error=error, usage=usage, cut=cut)

    # --- Gate 2: re-check a degraded step on the primary -----------------------------------

    @activity.defn(name="recheck_step")
    async def recheck_step(self, inp: RecheckInput) -> RecheckResult:
        """Re-run a degraded step on the primary with the same inputs (its recorded
        conversation up to that step) and compare the structured outputs, role-aware. The
        verdict is recorded once (relay_gate_record); an agreeing step is marked verified.
        A primary that is still unavailable gives no verdict (agree None): a person decides."""
        structlog.contextvars.bind_contextvars(spec_id=inp.spec_id, role=inp.role.value,
                                               turn=inp.turn, step=inp.step)
        try:
            return await with_heartbeat(self._recheck(inp))
        except Exception as exc:
            if (outage := registry_error(exc)) is not None:
                raise outage from None
            raise
        finally:
            structlog.contextvars.unbind_contextvars("spec_id", "role", "turn", "step")

    async def _recheck(self, inp: RecheckInput) -> RecheckResult:
        key = f"i{inp.iteration}/recheck/{inp.step_id}"
        if (done := await patiently(self.registry.gate_record, inp.spec_id, key,
                                    what="gate_record")) is not None:
            return RecheckResult(step_id=inp.step_id, role=inp.role, model=done.model or "",
                                 agree=done.agree, diff=done.diff or [])
        history = await patiently(self.registry.messages, inp.session_id, what="messages")
        found = {m.role: m for m in history if (m.turn, m.step) == (inp.turn, inp.step)}
        answer, user = found.get("assistant"), found.get("user")
        tools = inp.workspace is not None and self.executor is not None
        degraded = _classify(inp.role, answer.content, tools)[0] if answer and answer.valid else None
        if answer is None or user is None or degraded is None:
            return RecheckResult(step_id=inp.step_id, role=inp.role, error=(
                "an intermediate step (tool calls, no result) cannot be compared"))
        carried = next((d.get("recheck") for d in carried_over()
                        if isinstance(d, dict) and isinstance(d.get("recheck"), dict)), None)
        if carried is not None and carried.get("key") == key:
            fresh, model = carried["output"], carried["model"]
            log.info("gate.recheck_carried_answer_used", key=key)
        else:
            conversation = [{"role": m.role, "content": m.content} for m in history
                            if (m.turn, m.step) < (inp.turn, inp.step)]
            probe = ModelStepInput(spec_id=inp.spec_id, role=inp.role, turn=inp.turn,
                                   step=inp.step, kind="plan", call_timeout_s=inp.call_timeout_s)
            try:
                exchange = await self._call_model(probe, prompts.load(inp.role).system,
                                                  conversation, user.content, tools)
            except ApplicationError as exc:
                if exc.type in CAPACITY_ERRORS or exc.non_retryable:
                    return RecheckResult(step_id=inp.step_id, role=inp.role,
                                         error=f"the primary could not re-check it: {exc.message}")
                raise
            if exchange.output is None:
                return RecheckResult(step_id=inp.step_id, role=inp.role, model=exchange.model,
                                     error=f"the primary gave no valid result: {exchange.error}")
            fresh, model = exchange.output, exchange.model
            # paid: carried in the heartbeats until the verdict is recorded, so an attempt that
            # dies now hands it to the next one instead of paying for it again
            carry({"recheck": {"key": key, "output": fresh, "model": model}})
            if self.executor is not None:
                await asyncio.to_thread(self.executor.failpoints.hit, "gate.after_recheck_call",
                                        inp.step_id)
        diff = compare(inp.role, degraded, fresh)
        record = await patiently(self.registry.add_gate_record, GateRecord(
            spec_id=inp.spec_id, iteration=inp.iteration, key=key, kind="recheck",
            step_id=inp.step_id, model=model, output=fresh, agree=not diff, diff=diff),
            what="add_gate_record")
        if record.agree:
            await patiently(self.registry.verify, inp.session_id, inp.turn, inp.step,
                            f"recheck on {model}", what="verify")
        log.info("gate.rechecked", step_id=inp.step_id, agree=record.agree, model=model)
        return RecheckResult(step_id=inp.step_id, role=inp.role, model=record.model or model,
                             agree=record.agree, diff=record.diff or [])

    # --- one tool call ----------------------------------------------------------------

    @activity.defn(name="agent_tool")
    async def agent_tool(self, inp: ToolStepInput) -> ToolStepResult:
        """Run one tool call of a recorded answer (its input is read from the registry)."""
        structlog.contextvars.bind_contextvars(spec_id=inp.spec_id, role=inp.role.value,
                                               turn=inp.turn, step=inp.step)
        try:
            return await with_heartbeat(self._tool(inp))
        except Exception as exc:
            if (outage := registry_error(exc)) is not None:
                raise outage from None
            raise
        finally:
            structlog.contextvars.unbind_contextvars("spec_id", "role", "turn", "step")

    async def _tool(self, inp: ToolStepInput) -> ToolStepResult:
        if self.executor is None:
            raise ApplicationError("this worker runs no workspace tools", type="NoTools",
                                   non_retryable=True)
        recorded = await patiently(self.registry.exchange, inp.session_id, inp.turn, inp.step,
                                   what="exchange")
        answer = recorded.get("assistant")
        call = next((b for b in (answer.content if answer else [])
                     if b.get("type") == "tool_use" and b.get("id") == inp.call_id), None)
        if call is None:
            raise ApplicationError(f"tool call {inp.call_id} of {inp.role.value} turn {inp.turn} "
                                   f"step {inp.step} is not recorded", type="InvalidTurnInput",
                                   non_retryable=True)
        toolbox = ToolBox(role=inp.role, workspace=inp.workspace, executor=self.executor,
                          spec_id=inp.spec_id, run_id=activity.info().workflow_run_id,
                          step_prefix=f"i{inp.iteration}/{inp.role.value}/t{inp.turn}",
                          check_timeout_s=inp.check_timeout_s)
        name = call.get("name", "")
        outcome = await finish_first(asyncio.to_thread(
            toolbox.run, name, call.get("input"), f"x{inp.step}/c{inp.index}"))
        log.info("agent_turn.tool", tool=name, error=outcome.is_error)
        text = clean_text(outcome.text)  # no lone surrogates: the model's SDK refuses them
        args = call.get("input") if isinstance(call.get("input"), dict) else {}
        path = args.get("path") if isinstance(args.get("path"), str) else None
        report = None
        if name == "run_checks":
            report = text
            if len(report) > CHECK_REPORT_MAX:  # keep "$ command" and "exit code: N"
                head = "\n".join(report.splitlines()[:2])[:300]
                report = f"{head}\n...\n{report[-CHECK_REPORT_MAX:]}"
        changed = None
        if name in ("write_file", "delete_file") and not outcome.is_error:
            try:
                changed = toolbox.confine((call.get("input") or {}).get("path"))[1]
            except ToolRefused:
                changed = None
        return ToolStepResult(
            block=ToolResultBlock(tool_use_id=inp.call_id, content=text,
                                  is_error=bool(outcome.is_error)),
            changed_path=changed,
            use=ToolUse(name=str(name)[:64], path=path[:300] if path else None,
                        error=bool(outcome.is_error)),
            check_report=report,
            unsandboxed=name == "run_checks" and bool(getattr(outcome, "unsandboxed", False)))


def _norm(text: Any) -> str:
    return " ".join(str(text).lower().split())


def compare(role: Role, degraded: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """What differs between two structured outputs of a role, in the terms that matter for it:
    the verdicts of the auditor and the validator, the plan's steps, the change's files, the
    clarifier's questions or spec. Empty: they agree (wording aside)."""
    if role in (Role.auditor, Role.validator):
        if bool(degraded.get("approved")) != bool(fresh.get("approved")):
            return [f"verdict: approved={bool(degraded.get('approved'))} (degraded) vs "
                    f"approved={bool(fresh.get('approved'))} (primary)"]
        return []
    if role == Role.planner:
        a, b = [_norm(s) for s in degraded.get("steps") or []], [_norm(s) for s in fresh.get("steps") or []]
        if a == b:
            return []
        return ([f"- {s}" for s in a if s not in b] + [f"+ {s}" for s in b if s not in a]
                or ["the plan's steps are in another order"])
    if role == Role.constructor:
        a = {f.get("path") for f in degraded.get("files") or [] if isinstance(f, dict)}
        b = {f.get("path") for f in fresh.get("files") or [] if isinstance(f, dict)}
        return [f"- file {p}" for p in sorted(a - b)] + [f"+ file {p}" for p in sorted(b - a)]
    asks_a, asks_b = bool(degraded.get("questions")), bool(fresh.get("questions"))
    if asks_a != asks_b:
        return ["the clarifier " + ("asked questions" if asks_a else "gave a spec")
                + " (degraded) but " + ("asked questions" if asks_b else "gave a spec")
                + " (primary)"]
    return []


def _calls(role: Role, content: list[dict[str, Any]]) -> list[ToolCallRef]:
    tool = OUTPUT_TOOLS[role]
    return [ToolCallRef(id=b["id"], name=b.get("name", "")) for b in content
            if b.get("type") == "tool_use" and b.get("name") != tool]
