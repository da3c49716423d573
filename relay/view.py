"""How relay shows things to people in a terminal (Rich). No logic lives here."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from relay.models import PipelineResult, Question, Status, TokenUsage, is_scripted
from relay.registry import AgentSession, SessionMessage

SCRIPTED_NOTE = "[yellow]scripted model — deterministic answers, not a real LLM[/yellow]"


def example_spec() -> str:
    return (resources.files("relay") / "examples" / "greeting.md").read_text(encoding="utf-8").strip()


def model_label(models: list[str] | str | None) -> str:
    names = [models] if isinstance(models, str) else list(models or [])
    if not names:
        return "-"
    label = ", ".join(names)
    return f"{label} ({SCRIPTED_NOTE})" if any(is_scripted(m) for m in names) else label


def usage_text(u: TokenUsage) -> str:
    return (f"in {u.input_tokens:,} · out {u.output_tokens:,} · cache read "
            f"{u.cache_read_input_tokens:,} · cache write {u.cache_creation_input_tokens:,}")


def progress_line(st: Status) -> str:
    role = f" ({st.current_role.value})" if st.current_role else ""
    scripted = " [scripted model]" if any(is_scripted(m) for m in st.models) else ""
    return escape(f"[{st.spec_id}] iteration {st.iteration}: {st.phase.value}{role}{scripted}")


def print_questions(console: Console, questions: list[Question]) -> None:
    console.print("[bold]The clarifier asks:[/bold]")
    for q in questions:
        console.print(f"  [bold]{q.id}[/bold]  {q.text}")


def print_status(console: Console, st: Status) -> None:
    console.print(f"[bold]{st.spec_id}[/bold] · iteration {st.iteration} · phase "
                  f"[bold]{st.phase.value}[/bold]"
                  + (f" · current agent {st.current_role.value}" if st.current_role else ""))
    console.print(f"model: {model_label(st.models)}")
    if st.rounds:
        console.print("rounds: " + ", ".join(f"{k} {v}" for k, v in st.rounds.items()))
    if st.pending:
        print_questions(console, st.pending.questions)
    table = Table("agent", "session", "state", "turns", "tokens")
    for ref in st.sessions:
        u = st.usage_by_role.get(ref.role.value, TokenUsage())
        table.add_row(ref.name, ref.session_id, ref.state, str(ref.turns),
                      f"{u.input_tokens:,}/{u.output_tokens:,}")
    console.print(table)
    console.print(f"usage this run: {usage_text(st.usage)}")
    for label, items in (("flags", st.flags), ("rejected inputs", st.rejected_inputs)):
        if items:
            console.print(f"{label}: " + "; ".join(items))
    if st.error:
        console.print(f"[red]error: {st.error}[/red]")


def print_result(console: Console, res: PipelineResult) -> None:
    console.print(Panel(res.clarified_spec, title=f"{res.spec_id} · iteration {res.iteration} · "
                                                  f"clarified spec"))
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(res.plan.steps, 1))
    console.print(Panel(f"{res.plan.summary}\n\n{steps}", title="plan"))
    if res.change:
        files = "\n".join(f"  {f.path} ({len(f.content)} chars)" for f in res.change.files)
        console.print(Panel(f"{res.change.summary}\n{files}", title="change"))
    if res.validation:
        verdict = "approved" if res.validation.approved else "rejected: " + "; ".join(
            res.validation.failures)
        console.print(f"validator: {verdict}")
    console.print(f"outcome: [bold]{res.outcome}[/bold]")
    if res.flags:
        console.print("flags: " + ", ".join(res.flags))
    console.print(f"model: {model_label(res.models)}")
    console.print(f"usage: {usage_text(res.usage)}")


def print_sessions(console: Console, rows: list[AgentSession]) -> None:
    table = Table("name", "role", "session id", "state", "turns", "tokens in/out",
                  "cache read/write", "model", "prompt")
    for s in rows:
        table.add_row(s.name, s.role, s.id, s.status, str(s.turns),
                      f"{s.input_tokens:,}/{s.output_tokens:,}",
                      f"{s.cache_read_tokens:,}/{s.cache_write_tokens:,}",
                      model_label(s.model), s.prompt_version or "-")
    console.print(table)


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


def print_history(console: Console, session: AgentSession, messages: list[SessionMessage]) -> None:
    console.print(f"[bold]{session.name}[/bold] ({session.role}, {session.id}) · "
                  f"{len(messages)} messages · {session.turns} turns")
    for m in messages:
        body = "\n".join(_block_text(b) for b in m.content)
        extra = "" if m.role == "user" else f" · {m.model} · {m.source}/{m.trust}" + (
            " · [red]invalid[/red]" if m.valid is False else "")
        console.print(Panel(body, title=f"#{m.seq} turn {m.turn} {m.role}{extra}",
                            title_align="left"))
