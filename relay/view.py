"""How relay shows things to people in a terminal (Rich). No logic lives here."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from relay.models import PipelineResult, Question, Status, TokenUsage, is_scripted
from relay.ledger import EffectRecord
from relay.registry import AgentSession, SessionMessage

SCRIPTED_NOTE = "[yellow]scripted model — deterministic answers, not a real LLM[/yellow]"


EXAMPLES = {
    "greeting": "the constructor writes a module with tests; the checks pass",
    "greeting-fix": "the first module fails its test; the validator sends it back; the fix passes",
}


def example_spec(name: str = "greeting") -> str:
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; examples: {', '.join(EXAMPLES)}")
    return (resources.files("relay") / "examples" / f"{name}.md").read_text(encoding="utf-8").strip()


def model_label(models: list[str] | str | None) -> str:
    names = [models] if isinstance(models, str) else list(models or [])
    if not names:
        return "-"
    label = ", ".join(names)
    return f"{label} ({SCRIPTED_NOTE})" if any(is_scripted(m) for m in names) else label


def cache_read_share(input_tokens: int, cache_read: int, cache_write: int) -> float | None:
    """The share of all input tokens that were read from the prompt cache: the API bills
    input as three disjoint parts (plain input, cache reads, cache writes). None: no input."""
    whole = input_tokens + cache_read + cache_write
    return cache_read / whole if whole else None


def share_text(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def usage_text(u: TokenUsage) -> str:
    share = cache_read_share(u.input_tokens, u.cache_read_input_tokens,
                             u.cache_creation_input_tokens)
    return (f"in {u.input_tokens:,} · out {u.output_tokens:,} · cache read "
            f"{u.cache_read_input_tokens:,} · cache write {u.cache_creation_input_tokens:,}"
            f" · {share_text(share)} of input from cache")


def progress_line(st: Status) -> str:
    role = f" ({st.current_role.value})" if st.current_role else ""
    scripted = " [scripted model]" if any(is_scripted(m) for m in st.models) else ""
    return escape(f"[{st.spec_id}] iteration {st.iteration}: {st.phase.value}{role}{scripted}")


def print_questions(console: Console, questions: list[Question]) -> None:
    console.print("[bold]The clarifier asks:[/bold]")
    for q in questions:
        console.print(Text.assemble("  ", (q.id, "bold"), "  ", q.text))


def print_status(console: Console, st: Status, registry_problem: str | None = None) -> None:
    """The spec as Temporal has it; `registry_problem`: why the registry cannot be read now."""
    console.print(f"[bold]{escape(st.spec_id)}[/bold] · iteration {st.iteration} · phase "
                  f"[bold]{st.phase.value}[/bold]"
                  + (f" · current agent {st.current_role.value}" if st.current_role else ""))
    console.print(f"model: {model_label(st.models)}")
    if st.rounds:
        console.print("rounds: " + ", ".join(f"{k} {v}" for k, v in st.rounds.items()))
    if st.pending:
        print_questions(console, st.pending.questions)
    if st.workspace:
        console.print(Text(f"workspace: {st.workspace.repo} · branch {st.workspace.branch} → "
                           f"{st.workspace.target}"), soft_wrap=True)
    if st.waiting_for:
        console.print(Text(f"waiting for {st.waiting_for}", style="bold"), soft_wrap=True)
    for ref in st.needs_human:
        console.print(Text(f"needs a human: compensation of {ref.effect} ({ref.step}) failed: "
                           f"{ref.error} — run relay compensate {st.spec_id}", style="red"),
                      soft_wrap=True)
    table = Table("agent", "session", "state", "turns", "tokens")
    for ref in st.sessions:
        u = st.usage_by_role.get(ref.role.value, TokenUsage())
        table.add_row(ref.name, ref.session_id, ref.state, str(ref.turns),
                      f"{u.input_tokens:,}/{u.output_tokens:,}")
    console.print(table)
    console.print(f"usage this run: {usage_text(st.usage)}")
    for label, items in (("flags", st.flags), ("rejected inputs", st.rejected_inputs)):
        if items:
            console.print(Text(f"{label}: " + "; ".join(items)), soft_wrap=True)
    print_trajectory(console, st.degraded, st.gate, st.model_wait)
    if st.error:
        console.print(Text(f"error: {st.error}", style="red"), soft_wrap=True)
    if st.stray_run:
        console.print(Text(f"note: {st.stray_run}", style="yellow"), soft_wrap=True)
    if registry_problem:  # one line: the sessions above are Temporal's; history needs the registry
        console.print(Text(f"registry unreachable: {' '.join(registry_problem.split())}",
                           style="yellow"), soft_wrap=True)


def print_trajectory(console: Console, degraded: list, gate: Any, model_wait: Any = None) -> None:
    """Degraded steps (and what they taint), Gate 2's check and decision, a model wait."""
    if model_wait is not None:
        console.print(Text(f"waiting for the model: {model_wait.model} ({model_wait.role.value}) "
                           f"· next attempt {model_wait.next_attempt_at} · last error: "
                           f"{model_wait.last_error}", style="yellow"), soft_wrap=True)
    for d in degraded:
        p = d.provenance
        mark = "verified" if d.verified_by else (
            "degraded" if p.trust.value != "full" else "tainted")
        console.print(Text(f"{mark}: {d.step_id} · {p.source.value}/{p.trust.value} · "
                           f"{p.model} · {d.reason}"
                           + (f" · verified by {d.verified_by}" if d.verified_by else ""),
                           style="green" if d.verified_by else "yellow"), soft_wrap=True)
    if gate is None:
        return
    head = f"Gate 2 ({gate.policy.value}): "
    if gate.decision:
        head += f"{gate.decision}" + (f" by {gate.decided_by}" if gate.decided_by else "") + (
            f" at {gate.decided_at}" if gate.decided_at else "")
    console.print(Text(head, style="bold"), soft_wrap=True)
    for r in gate.rechecks:
        verdict = {True: "agrees", False: "disagrees", None: "no verdict"}[r.agree]
        console.print(Text(f"  re-check of {r.step_id} on {r.model or 'the primary'}: {verdict}"
                           + (f" ({r.error})" if r.error else "")), soft_wrap=True)
        for line in r.diff:
            console.print(Text(f"    {line}"), soft_wrap=True)
    for why in gate.destructive:
        console.print(Text(f"  destructive: {why}", style="red"), soft_wrap=True)
    if gate.needs_human:
        console.print(Text(f"  a person must decide: {gate.reason}", style="bold"),
                      soft_wrap=True)


def print_result(console: Console, res: PipelineResult) -> None:
    console.print(Panel(Text(res.clarified_spec), title=Text(
        f"{res.spec_id} · iteration {res.iteration} · clarified spec")))
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(res.plan.steps, 1))
    console.print(Panel(Text(f"{res.plan.summary}\n\n{steps}"), title="plan"))
    if res.change:
        files = "\n".join(f"  {f.path} ({len(f.content)} chars)" for f in res.change.files)
        console.print(Panel(Text(f"{res.change.summary}\n{files}".rstrip()), title="change"))
    if res.validation:
        verdict = "approved" if res.validation.approved else "rejected: " + "; ".join(
            res.validation.failures)
        console.print(Text(f"validator: {verdict}"))
    if res.delivery:
        console.print(Text(f"delivered: {res.branch} merged into {res.delivery.get('target')} "
                           f"at {str(res.delivery.get('commit'))[:12]}"), soft_wrap=True)
        if recheck := res.delivery.get("recheck"):
            console.print(Text(f"{res.delivery.get('target')} had moved since validation: "
                               f"`{recheck['command']}` re-run on the merge passed"), soft_wrap=True)
        elif res.delivery.get("target_moved"):
            console.print(Text(f"{res.delivery.get('target')} had moved since validation; no "
                               "check command is configured, so the merge was not re-checked",
                               style="yellow"), soft_wrap=True)
    if res.compensated:
        console.print(Text(f"compensated {len(res.compensated)} effect(s): the workspace is "
                           "as it was"), soft_wrap=True)
    for ref in res.needs_human:
        console.print(Text(f"needs a human: {ref.effect} ({ref.step}): {ref.error}", style="red"),
                      soft_wrap=True)
    print_trajectory(console, res.degraded, res.gate)
    console.print(f"outcome: [bold]{res.outcome}[/bold]")
    if res.flags:
        console.print("flags: " + ", ".join(res.flags))
    console.print(f"model: {model_label(res.models)}")
    console.print(f"usage: {usage_text(res.usage)}")


def print_sessions(console: Console, rows: list[AgentSession]) -> None:
    table = Table("name", "session id", "state", "turns", "tokens in/out", "cache r/w",
                  "cached", "model")
    for column in table.columns[:2]:
        column.no_wrap = True
    for s in rows:
        table.add_row(s.name, s.id, s.status, str(s.turns),
                      f"{s.input_tokens:,}/{s.output_tokens:,}",
                      f"{s.cache_read_tokens:,}/{s.cache_write_tokens:,}",
                      share_text(cache_read_share(s.input_tokens, s.cache_read_tokens,
                                                  s.cache_write_tokens)), s.model or "-")
    console.print(table)
    read, whole = (sum(s.cache_read_tokens for s in rows),
                   sum(s.input_tokens + s.cache_read_tokens + s.cache_write_tokens for s in rows))
    if whole:  # "cached": the share of a session's input tokens read from the prompt cache
        console.print(Text(f"cached: {share_text(read / whole)} of all input tokens were read "
                           f"from the prompt cache ({read:,} of {whole:,})"), soft_wrap=True)
    if any(is_scripted(s.model) for s in rows):
        console.print(SCRIPTED_NOTE)
    versions = sorted({s.prompt_version for s in rows if s.prompt_version})
    if versions:
        console.print(Text("prompts: " + ", ".join(versions)), soft_wrap=True)


def _block_text(block: dict[str, Any]) -> str:
    kind = block.get("type")
    if kind == "text":
        return block.get("text", "")
    if kind == "tool_use":
        return f"→ {block.get('name')} {json.dumps(block.get('input'), indent=2)}"
    if kind == "tool_result":
        content = block.get("content")
        text = content if isinstance(content, str) else json.dumps(content)
        return ("✗ " if block.get("is_error") else "✓ ") + text
    return json.dumps(block)


def print_effects(console: Console, rows: list[EffectRecord]) -> None:
    table = Table("#", "effect", "step", "status", "key", "result / error")
    for column in table.columns[1:5]:
        column.no_wrap = True
    for r in rows:
        detail = r.error or (json.dumps(r.result) if r.result else "")
        style = {"needs_human": "red", "failed": "red", "compensated": "yellow"}.get(r.status)
        table.add_row(str(r.id), r.effect + ("" if r.reversible else " (irreversible)"), r.step,
                      Text(r.status, style=style or ""), r.key[:12], Text(detail[:80]))
    console.print(table)
    if not rows:
        console.print("(no effects)")


def print_history(console: Console, session: AgentSession, messages: list[SessionMessage]) -> None:
    console.print(f"[bold]{escape(session.name)}[/bold] ({session.role}, {session.id}) · "
                  f"{len(messages)} messages · {session.turns} turns")
    for m in messages:
        body = "\n".join(_block_text(b) for b in m.content)
        extra = "" if m.role == "user" else f" · {m.model} · {m.source}/{m.trust}" + (
            " · [red]invalid[/red]" if m.valid is False else "")
        marks = []  # in the body: a panel title is cut to the terminal's width
        if m.role == "assistant" and m.trust != "full":
            marks.append(f"{m.trust.upper()} ({m.source} answer)"
                         + (f", verified by {m.verified_by}" if m.verified_by else ""))
        if m.role == "assistant" and m.tainted_by:
            marks.append("tainted by " + ", ".join(m.tainted_by))
        if marks:
            body = "\n".join(f"[{mark}]" for mark in marks) + "\n" + body
        console.print(Panel(Text(body), title=Text.from_markup(
            f"#{m.seq} turn {m.turn} {m.role}{extra}"), title_align="left"))
