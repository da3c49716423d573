"""How relay shows things to people in a terminal (Rich). No logic lives here."""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from relay.models import (PipelineResult, Phase, ProgressEvent, Question, Review, Status,
                          TokenUsage, is_scripted)
from workflows.render import change_stat, check_tail, ended_text
from relay.ledger import EffectRecord
from relay.models import Budget, Cost, SpecCost
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
    """Input counted whole (uncached + cache read + cache write), as the live line counts it,
    then how it splits: one way of counting tokens everywhere."""
    share = cache_read_share(u.input_tokens, u.cache_read_input_tokens,
                             u.cache_creation_input_tokens)
    whole = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    return (f"tokens in {whole:,} (uncached {u.input_tokens:,} · cache read "
            f"{u.cache_read_input_tokens:,} · cache write {u.cache_creation_input_tokens:,}; "
            f"{share_text(share)} from cache) · out {u.output_tokens:,}")


def cost_text(c: Cost | None, *, short: bool = False) -> str:
    """"$0.0123" with what may be missing from it: possibly billed calls, unpriced models."""
    if c is None:
        return "-"
    text = f"${c.usd:,.4f}"
    if c.possibly_billed_calls:
        text += (f" + ≤${c.possibly_billed_usd:,.4f} possibly billed" if not short
                 else f" +{c.possibly_billed_calls} possibly billed")
        if not short:
            text += (f" ({c.possibly_billed_calls} call(s) sent and never recorded, "
                     f"≤{c.possibly_billed_tokens:,} tokens)")
    if c.unpriced_models:
        text += " (unpriced: " + ", ".join(c.unpriced_models) + ")"
    return text


def budget_option(budget: Budget | None) -> str:
    """The `relay budget` option(s) that fit the spec's budget."""
    usd = budget is None or budget.usd is not None
    tokens = budget is not None and budget.tokens is not None
    return " or ".join((["--add 2.00"] if usd else []) + (["--tokens N"] if tokens else []))


def print_cost(console: Console, c: Cost | None, budget: Budget | None) -> None:
    """The spec's cost over all iterations, and its budget."""
    if c is None and budget is None:
        return
    line = f"cost (all iterations): {cost_text(c)}"
    if c is not None:
        line += f" · {c.tokens:,} tokens in {c.calls} model call(s)"
    if budget is not None and (budget.usd is not None or budget.tokens is not None):
        parts = ([f"${budget.usd:,.4f}"] if budget.usd is not None else []) + (
            [f"{budget.tokens:,} tokens"] if budget.tokens is not None else [])
        line += " · budget " + " and ".join(parts)
    console.print(Text(line), soft_wrap=True)


def progress_line(st: Status) -> str:
    """One line for a spec's phase (markup). Before the registry opened the run there is no
    iteration yet: it says the spec is starting, not "iteration 0"."""
    role = f" ({st.current_role.value})" if st.current_role else ""
    scripted = " [scripted model]" if any(is_scripted(m) for m in st.models) else ""
    if st.phase == Phase.starting and not st.iteration:
        return escape(f"[{st.spec_id}] starting: waiting for a worker to open it")
    return escape(f"[{st.spec_id}] iteration {st.iteration}: {phase_word(st)}{role}{scripted}")


def phase_word(st: Status) -> str:
    """The phase as people read it: a finished run says how it ended (a rejected or rolled-back
    run never reads "completed")."""
    if st.phase in (Phase.completed, Phase.failed, Phase.cancelled):
        return ended_text(st.outcome, st.phase)
    return st.phase.value


def print_questions(console: Console, questions: list[Question]) -> None:
    console.print("[bold]The clarifier asks:[/bold]")
    for q in questions:
        console.print(Text.assemble("  ", (q.id, "bold"), "  ", q.text))


def print_status(console: Console, st: Status, registry_problem: str | None = None,
                 web_ui: str | None = None) -> None:
    """The spec as Temporal has it; `registry_problem`: why the registry cannot be read now."""
    ended = st.phase in (Phase.completed, Phase.failed, Phase.cancelled)
    # a finished run says how it ended first: "completed" alone would read as success
    outcome = f" · outcome [bold]{escape(st.outcome)}[/bold]" if ended and st.outcome else ""
    console.print(f"[bold]{escape(st.spec_id)}[/bold] · iteration {st.iteration} · phase "
                  f"[bold]{st.phase.value}[/bold]" + outcome
                  + (f" · current agent {st.current_role.value}" if st.current_role else ""),
                  soft_wrap=True)
    if ended:
        console.print(Text(f"ended: {phase_word(st)}", style="bold"), soft_wrap=True)
    if web_ui:
        console.print(Text(f"Web UI: {web_ui}"), soft_wrap=True)
    console.print(f"model: {model_label(st.models)}")
    if st.rounds:
        console.print("rounds: " + ", ".join(f"{k} {v}" for k, v in st.rounds.items()))
    if st.pending:
        print_questions(console, st.pending.questions)
    if st.workspace:
        console.print(Text(f"workspace: {st.workspace.repo} · branch {st.workspace.branch} → "
                           f"{st.workspace.target}"), soft_wrap=True)
    if st.waiting_for and not ended:  # an ended run waits for nothing (a cancel mid-wait)
        console.print(Text(f"waiting for {st.waiting_for}", style="bold"), soft_wrap=True)
    if st.review is not None:
        print_review(console, st.review, st.spec_id, gone=bool(st.delivery) or st.phase in (
            Phase.completed, Phase.failed, Phase.cancelled))
    for ref in st.needs_human:
        console.print(Text(f"needs a human: compensation of {ref.effect} ({ref.step}) failed: "
                           f"{ref.error} — run relay compensate {st.spec_id}", style="red"),
                      soft_wrap=True)
    table = Table("agent", "session", "state", "turns", "tokens", "cost")
    for ref in st.sessions:
        u = st.usage_by_role.get(ref.role.value, TokenUsage())
        table.add_row(ref.name, ref.session_id, ref.state, str(ref.turns),
                      f"{u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens:,}"
                      f"/{u.output_tokens:,}",
                      cost_text(st.cost_by_role.get(ref.role.value), short=True))
    print_table(console, table)
    console.print(f"usage this run: {usage_text(st.usage)}")
    print_cost(console, st.cost, st.budget)
    if st.phase == Phase.waiting_for_budget and st.budget_wait:
        console.print(Text(f"waiting for budget: {st.budget_wait.reason}. Raise it: relay budget "
                           f"{st.spec_id} {budget_option(st.budget)}", style="bold yellow"),
                      soft_wrap=True)
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


def print_result(console: Console, res: PipelineResult, web_ui: str | None = None) -> None:
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
        console.print(Text(f"validator: {verdict}"), soft_wrap=True)
    if res.review is not None and res.review.check_report:
        head = res.review.check_report.strip().splitlines()[:2]
        console.print(Text("checks: " + " · ".join(head)), soft_wrap=True)
    if res.delivery:
        console.print(Text(f"delivered: {res.branch} merged into {res.delivery.get('target')} "
                           f"at {str(res.delivery.get('commit'))[:12]}"), soft_wrap=True)
        merged = res.delivery.get("merged") or res.validated_commit
        console.print(Text(f"merge commit {res.delivery.get('commit')} on "
                           f"{res.delivery.get('target')}"
                           + (f" (validated commit {str(merged)[:12]})" if merged else "")),
                      soft_wrap=True)
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
    if res.repository:
        console.print(Text(f"repository: {res.repository}"
                           + (f" · branch {res.branch}" if res.branch else "")), soft_wrap=True)
    if res.review is not None and res.review.diff_stat and not res.review.diff_error:
        console.print(Text(f"change: {change_stat(res.review)} · relay diff {res.spec_id}"),
                      soft_wrap=True)
    print_trajectory(console, res.degraded, res.gate)
    words = ended_text(res.outcome, Phase.completed)
    console.print(Text.assemble("outcome: ", (res.outcome, "bold"),
                                "" if words == res.outcome else f" ({words})"), soft_wrap=True)
    if web_ui:
        console.print(Text(f"Web UI: {web_ui}"), soft_wrap=True)
    if res.flags:
        console.print("flags: " + ", ".join(res.flags))
    console.print(f"model: {model_label(res.models)}")
    console.print(f"usage: {usage_text(res.usage)}")
    print_cost(console, res.cost, res.budget)


def print_sessions(console: Console, rows: list[AgentSession],
                   cost: SpecCost | None = None) -> None:
    """`cost`: the spec's, per role (one session per role), from the registry."""
    table = Table("name", "session id", "state", "turns", "tokens in/out", "cache r/w",
                  "cached", "cost", "model")
    for column in table.columns[:2]:
        column.no_wrap = True
    for s in rows:
        table.add_row(s.name, s.id, s.status, str(s.turns),
                      f"{s.input_tokens + s.cache_read_tokens + s.cache_write_tokens:,}"
                      f"/{s.output_tokens:,}",
                      f"{s.cache_read_tokens:,}/{s.cache_write_tokens:,}",
                      share_text(cache_read_share(s.input_tokens, s.cache_read_tokens,
                                                  s.cache_write_tokens)),
                      cost_text(cost.by_role.get(s.role) if cost else None, short=True),
                      s.model or "-")
    print_table(console, table)  # piped at 80 columns: one line per session, nothing cut
    if cost is not None:
        print_cost(console, cost.total, None)
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
    """A table when it fits the width; else one block per effect, so that a narrow or piped
    output (80 columns) never squeezes a column out."""
    table = Table("#", "effect", "step", "status", "key", "result / error")
    for column in table.columns:
        column.no_wrap = True
    styles = {"needs_human": "red", "failed": "red", "compensated": "yellow"}
    cells = []
    for r in rows:
        detail = r.error or (json.dumps(r.result) if r.result else "")
        cells.append((str(r.id), r.effect + ("" if r.reversible else " (irreversible)"), r.step,
                      r.status, r.key[:12], detail))
        table.add_row(*cells[-1][:3], Text(r.status, style=styles.get(r.status, "")),
                      cells[-1][4], Text(detail))
    if not rows:
        console.print("(no effects)")
    elif fits(console, table):
        console.print(table)
    else:
        for number, effect, step, status, key, detail in cells:
            console.print(Text.assemble(f"#{number} ", (effect, "bold"), f" · {step} · ",
                                        (status, styles.get(status, "")), f" · key {key}"),
                          soft_wrap=True)
            if detail:
                console.print(Text(f"    {detail}"), soft_wrap=True)


def print_table(console: Console, table: Table) -> None:
    """`table` when it fits the width; else one line per row, `column: value` (wrapped, never
    cut), so that a narrow or piped output keeps every cell whole."""
    if fits(console, table):
        console.print(table)
        return
    columns = table.columns
    for index in range(table.row_count):
        cells = [str(getattr(c, "_cells")[index]) for c in columns]
        line = Text(cells[0], style="bold")
        for column, cell in zip(columns[1:], cells[1:]):
            line.append(f" · {column.header}: {cell}")
        console.print(line, soft_wrap=True)


def fits(console: Console, table: Table) -> bool:
    """Whether `table` shows every cell whole, unwrapped, in the console's width."""
    unbounded = console.options.update_width(1_000_000)  # else the measure is capped at the width
    return Measurement.get(console, unbounded, table).maximum <= console.width


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


# --- live progress and the reviewer's view ------------------------------------------------


def _offset(ev: ProgressEvent, started: datetime | None) -> str:
    if ev.at is None or started is None:
        return "       "
    seconds = max(0.0, (ev.at - started).total_seconds())
    return f"+{int(seconds // 60)}:{seconds % 60:04.1f}"


def event_parts(ev: ProgressEvent, started: datetime | None) -> tuple[Text, Text, list[str]]:
    """(time and indentation, what happened, lines shown under it) of one progress event.
    Phase transitions stand out (▸); a step inside a phase is indented under it."""
    style = {"approved": "green", "rejected": "red"}.get(ev.verdict or "", "")
    if ev.kind == "phase":
        ended = ev.phase in ("completed", "failed", "cancelled")
        bad = ended and not ev.text.startswith("ended: delivered")
        head = Text.assemble((_offset(ev, started), "dim"), "  ")
        body = Text("▸ " + ev.text, style="bold red" if bad else "bold")
    else:
        head = Text.assemble((_offset(ev, started), "dim"), "    ")
        body = Text(ev.text, style=style)
    return head, body, (ev.detail or "").splitlines()


def event_text(ev: ProgressEvent, started: datetime | None) -> Text:
    """One progress event as plain lines: its time since the run started, then what happened."""
    head, body, detail = event_parts(ev, started)
    line = Text.assemble(head, body)
    for part in detail:
        line.append("\n" + " " * 13 + part, style="dim")
    return line


def missed_text(count: int) -> Text:
    return Text(f"        ({count} earlier event(s) not shown: the watcher fell behind; "
                "relay status --json has the last ones)", style="yellow")


def live_header(st: Status, web_ui: str | None, now: datetime) -> Any:
    """The live view's bottom line: a spinner, where the spec is, for how long, tokens, cost."""
    from rich.spinner import Spinner

    started = st.started_at
    elapsed = f"{(now - started).total_seconds():.0f} s" if started else "-"
    u = st.usage
    tokens = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    cost = _cost_text(getattr(st, "cost", None))
    who = f" · {st.current_role.value}" if st.current_role else ""
    hint = {Phase.waiting_for_answers: f": relay answer {st.spec_id}",
            Phase.waiting_for_approval: f": relay approve {st.spec_id}"}.get(st.phase, "")
    where = ("starting: waiting for a worker to open it" if st.phase == Phase.starting
             and not st.iteration else
             f"iteration {st.iteration} · {phase_word(st).replace('_', ' ')}{hint}{who}")
    text = Text.assemble((st.spec_id, "bold"), f" · {where} · {elapsed} · tokens {tokens:,} in / "
                         f"{u.output_tokens:,} out" + (f" · {cost}" if cost else ""))
    if web_ui:
        text.append(" · ")
        text.append("Web UI", style=f"link {web_ui}")
    return Spinner("dots", text=text)


def _cost_text(cost: Any) -> str | None:
    from workflows.render import usd

    value = usd(cost)
    return None if value is None else f"${value:.4f}"


def print_review(console: Console, review: Review, spec_id: str, gone: bool = False) -> None:
    """What a reviewer needs at approval: verdict, the checks' tail, diff stat, worktree."""
    verdict = "approved" if review.approved else "rejected: " + "; ".join(review.failures)
    commit = f" (validated commit {review.commit[:12]})" if review.commit else ""
    console.print(Text.assemble("validator: ", (verdict, "green" if review.approved else "red"),
                                commit), soft_wrap=True)
    if tail := check_tail(review.check_report, 3 if review.approved else 10):
        console.print(Text("checks:"))
        console.print(Text("\n".join("  " + line for line in tail.splitlines()), style="dim"),
                      soft_wrap=True)
    if review.diff_error:
        console.print(Text(f"change: the diff could not be read: {review.diff_error}",
                           style="yellow"), soft_wrap=True)
    elif review.diff_stat:
        console.print(Text(f"change: {change_stat(review)}"), soft_wrap=True)
        console.print(Text("\n".join("  " + line for line in review.diff_stat.splitlines())),
                      soft_wrap=True)
    if review.worktree:
        console.print(Text(f"worktree: {review.worktree}"
                           + (" (removed when the run ended)" if gone else "")), soft_wrap=True)
    if review.diff_stat:
        console.print(Text(f"the whole diff: relay diff {spec_id}"), soft_wrap=True)


class ProgressPrinter:
    """Prints a run's progress events as they arrive: under a Rich live line (spinner, phase,
    elapsed time, tokens, cost, Web UI link) on a terminal, as plain lines otherwise (piped,
    or a dumb terminal). Events are numbered; each is printed once, in order, and a gap (the
    watcher fell more than PROGRESS_KEPT events behind) is said, never hidden."""

    def __init__(self, console: Console, web_ui: str | None = None,
                 live: bool | None = None) -> None:
        self.console, self.web_ui = console, web_ui
        self.live_wanted = (console.is_terminal and not console.is_dumb_terminal) if live is None \
            else live
        self.seq = 0
        self.last: Status | None = None
        self._live: Any = None

    def show(self, st: Status) -> None:
        events = [e for e in st.progress if e.seq > self.seq]
        if events and events[0].seq > self.seq + 1:
            self.console.print(missed_text(events[0].seq - self.seq - 1), soft_wrap=True)
        for ev in events:
            if self.live_wanted:  # a terminal: long lines wrap under their text, not the time
                from rich.table import Table as Grid

                head, body, detail = event_parts(ev, st.started_at)
                grid = Grid.grid()
                grid.add_column(no_wrap=True)
                grid.add_column(overflow="fold")
                grid.add_row(head, body)
                for part in detail:
                    grid.add_row("", Text("  " + part, style="dim"))
                self.console.print(grid)
            else:  # piped: one line per event, whole (grep-able)
                self.console.print(event_text(ev, st.started_at), soft_wrap=True)
            self.seq = ev.seq
        self.last = st
        self.resume()
        if self._live is not None:
            self._live.update(self._header(st))

    def _header(self, st: Status) -> Any:
        from datetime import timezone

        return live_header(st, self.web_ui, datetime.now(timezone.utc))

    def pause(self) -> None:
        """Stop the live line (before a prompt or a pager); show() or resume() brings it back."""
        if self._live is not None:
            self._live.stop()
            self._live = None

    def resume(self) -> None:
        if self._live is None and self.live_wanted and self.last is not None:
            from rich.live import Live

            self._live = Live(self._header(self.last), console=self.console,
                              refresh_per_second=8, transient=True)
            self._live.start()

    def close(self) -> None:
        self.pause()
        self.live_wanted = False


def print_diff(console: Console, d: Any, *, color: bool = True) -> None:
    """The validated change: which commit, its stat, and the diff (colored on a terminal)."""
    from rich.syntax import Syntax

    console.print(Text(f"{d.spec_id} · validated commit {d.commit or '-'} · against "
                       f"{d.base or '-'}", style="bold"), soft_wrap=True)
    if d.stat:
        console.print(Text(d.stat), soft_wrap=True)
    console.print()
    if color and console.is_terminal:
        console.print(Syntax(d.diff, "diff", theme="ansi_dark", background_color="default",
                             word_wrap=False))
    else:
        console.print(Text(d.diff), soft_wrap=True, end="")
    if d.truncated:
        console.print(Text(f"\n(the diff is {d.diff_chars:,} characters; relay keeps the first "
                           f"{len(d.diff):,}: run `git diff {(d.base or '')[:12]} "
                           f"{(d.commit or '')[:12]}` in the repository for the rest)",
                           style="yellow"), soft_wrap=True)
