"""One agent turn: resolve the role's session, resume its history, call the model.

The turn is idempotent on (session, turn number): each model exchange is
recorded atomically after the model answers, and an attempt that finds an
exchange already recorded uses it instead of calling (and paying for) the
model again. An output that fails validation gets one repair exchange in the
same session, with the validation error shown to the model.
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

import anthropic
import structlog
from pydantic import BaseModel, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.model_errors import to_temporal_error
from relay import prompts
from relay.models import OUTPUT_MODELS, OUTPUT_TOOLS, AgentTurnInput, AgentTurnResult, Role, TokenUsage
from relay.registry import Registry, SessionMessage

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


def _validate(role: Role, content: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    tool = OUTPUT_TOOLS[role]
    call = next((b for b in content if b.get("type") == "tool_use" and b.get("name") == tool), None)
    if call is None:
        return None, f"the answer did not call {tool}"
    try:
        parsed = OUTPUT_MODELS[role].model_validate(call.get("input"))
    except ValidationError as exc:
        return None, str(exc)
    return parsed.model_dump(mode="json"), None


@lru_cache(maxsize=None)
def _output_tool(role: Role) -> dict[str, Any]:
    return {"name": OUTPUT_TOOLS[role], "description": f"Submit the {role.value}'s result.",
            "input_schema": OUTPUT_MODELS[role].model_json_schema()}


def _with_cache_breakpoint(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the end of the conversation cacheable so the next turn reads it from cache."""
    if not messages:
        return messages
    last = dict(messages[-1])
    blocks = [dict(b) for b in last["content"]]
    blocks[-1]["cache_control"] = {"type": "ephemeral"}
    last["content"] = blocks
    return [*messages[:-1], last]


class AgentTurnActivities:
    def __init__(self, registry: Registry, model_client: anthropic.AsyncAnthropic, model: str,
                 max_tokens: int = 4096) -> None:
        self.registry = registry
        self.client = model_client
        self.model = model
        self.max_tokens = max_tokens

    @activity.defn(name="agent_turn")
    async def agent_turn(self, inp: AgentTurnInput) -> AgentTurnResult:
        info = activity.info()
        structlog.contextvars.bind_contextvars(
            spec_id=inp.spec_id, workflow_id=info.workflow_id, run_id=info.workflow_run_id,
            role=inp.role.value, turn=inp.turn, attempt=info.attempt,
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            return await self._turn(inp)
        finally:
            heartbeat.cancel()
            structlog.contextvars.unbind_contextvars(
                "spec_id", "workflow_id", "run_id", "role", "turn", "attempt", "session_id")

    async def _heartbeat(self) -> None:
        timeout = activity.info().heartbeat_timeout
        interval = max(0.5, timeout.total_seconds() / 3) if timeout else 10.0
        while True:  # the first beat waits: a quick turn needs none, and each beat is a server write
            await asyncio.sleep(interval)
            activity.heartbeat()

    async def _turn(self, inp: AgentTurnInput) -> AgentTurnResult:
        prompt = prompts.load(inp.role)
        try:
            text = prompt.render(inp.kind, inp.variables)
        except KeyError as exc:
            raise ApplicationError(str(exc), type="InvalidTurnInput", non_retryable=True) from None
        session, created, history = await asyncio.to_thread(
            self.registry.begin_turn, inp.spec_id, inp.role, inp.turn)
        structlog.contextvars.bind_contextvars(session_id=session.id)
        before = [m for m in history if m.turn < inp.turn]
        recorded = {(m.step, m.role): m for m in history if m.turn == inp.turn}
        log.info("agent_turn.start", scenario="A" if created else "B", history=len(before))

        tool = OUTPUT_TOOLS[inp.role]
        usage = TokenUsage()
        conversation = [{"role": m.role, "content": m.content} for m in before]
        last_assistant = next((m for m in reversed(before) if m.role == "assistant"), None)
        user = [*_tool_results_for(last_assistant), {"type": "text", "text": text}]
        replayed = True
        for step in (0, 1):
            exchange = self._recorded(recorded, step, inp.role)
            if exchange is None:
                replayed = False
                exchange = await self._call_model(prompt.system, tool, inp.role, conversation, user)
                stored = await asyncio.to_thread(
                    self.registry.append_exchange, session.id, turn=inp.turn, step=step,
                    user_content=exchange.user, assistant_content=exchange.assistant,
                    model=exchange.model, usage=exchange.usage, valid=exchange.output is not None,
                    error=exchange.error,
                    prompt_version=prompt.version, source=exchange.source, trust=exchange.trust,
                    status="idle" if exchange.output is not None else None,
                )
                if not stored:  # a concurrent attempt recorded this exchange first: use theirs
                    fresh = await asyncio.to_thread(self.registry.messages, session.id)
                    recorded = {(m.step, m.role): m for m in fresh if m.turn == inp.turn}
                    exchange = self._recorded(recorded, step, inp.role)
                    assert exchange is not None
                    log.info("agent_turn.duplicate_attempt_discarded", step=step)
                else:
                    usage = usage + exchange.usage
            if exchange.output is not None:
                log.info("agent_turn.done", replayed=replayed, repaired=step == 1,
                         input_tokens=usage.input_tokens, output_tokens=usage.output_tokens)
                return AgentTurnResult(
                    session_id=session.id, session_name=session.name, turn=inp.turn,
                    output=exchange.output, model=exchange.model, source=exchange.source,
                    trust=exchange.trust, usage=usage, replayed=replayed, repaired=step == 1,
                )
            log.warning("agent_turn.invalid_output", step=step, error=exchange.error)
            conversation += [{"role": "user", "content": exchange.user},
                             {"role": "assistant", "content": exchange.assistant}]
            repair = prompt.render("repair", {"tool": tool, "error": exchange.error or ""})
            user = [{"type": "tool_result", "tool_use_id": b["id"], "is_error": True, "content": repair}
                    for b in exchange.assistant if b.get("type") == "tool_use"] or [
                        {"type": "text", "text": repair}]

        await asyncio.to_thread(self.registry.set_status, inp.spec_id, [inp.role], "failed")
        raise ApplicationError(
            f"{inp.role.value} gave invalid output twice (turn {inp.turn}); last error: {exchange.error}",
            type="InvalidModelOutput", non_retryable=True,
        )

    @staticmethod
    def _recorded(recorded: dict[tuple[int, str], SessionMessage], step: int,
                  role: Role) -> Exchange | None:
        user, answer = recorded.get((step, "user")), recorded.get((step, "assistant"))
        if user is None or answer is None:
            return None
        output, error = _validate(role, answer.content) if answer.valid else (None, answer.error)
        return Exchange(
            user=user.content, assistant=answer.content, model=answer.model or "", output=output,
            error=error, source=answer.source, trust=answer.trust,
            usage=TokenUsage(input_tokens=answer.input_tokens, output_tokens=answer.output_tokens,
                             cache_read_input_tokens=answer.cache_read_tokens,
                             cache_creation_input_tokens=answer.cache_write_tokens),
        )

    async def _call_model(self, system: str, tool: str, role: Role,
                          conversation: list[dict[str, Any]], user: list[dict[str, Any]]) -> Exchange:
        messages = _with_cache_breakpoint([*conversation, {"role": "user", "content": user}])
        try:
            message = await self.client.messages.create(
                model=self.model,
                max_tokens=self.max_tokens,
                system=[{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                messages=messages,  # type: ignore[arg-type]
                tools=[_output_tool(role)],
                tool_choice={"type": "tool", "name": tool, "disable_parallel_tool_use": True},
            )
        except anthropic.AnthropicError as exc:
            raise to_temporal_error(exc, endpoint=str(self.client.base_url)) from exc
        content = [b.model_dump(mode="json", exclude_none=True) for b in message.content]
        output, error = _validate(role, content)
        u = message.usage
        return Exchange(
            user=user, assistant=content, model=message.model, output=output, error=error,
            usage=TokenUsage(input_tokens=u.input_tokens, output_tokens=u.output_tokens,
                             cache_read_input_tokens=u.cache_read_input_tokens or 0,
                             cache_creation_input_tokens=u.cache_creation_input_tokens or 0),
        )
