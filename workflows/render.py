"""Pure text rendering of structured outputs for the next agent and for people (no I/O)."""

from __future__ import annotations

import json

from typing import Any

from relay.models import Change, ChangeReport, Limits, Phase, Plan, Question, Review, Status, ToolUse


def bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) or "- (none given)"


def plan(p: Plan) -> str:
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(p.steps, 1))
    return f"{p.summary}\n\n{steps}"


def change(c: Change) -> str:
    files = "\n\n".join(f"--- {f.path}\n{f.content}" for f in c.files) or "(no files)"
    return f"{c.summary}\n\n{files}"


EMPTY_CHANGE = ("No file changed on the branch: the change you described did not happen. Only "
                "what you write with write_file (or remove with delete_file) reaches the "
                "repository; your submitted description is not applied. Write each file through "
                "your tools, then submit the change again.")


def real_change(c: Change, report: ChangeReport) -> str:
    """What the validator judges: the branch's real diff against the target, with the
    constructor's summary for context and any declared file that differs flagged."""
    files = "\n".join(f"{f.status} {f.path} (+{f.added} -{f.removed})" for f in report.files)
    parts = [f"The constructor's summary: {c.summary}",
             f"Files changed on the branch (git, against the target):\n{files}"]
    if report.declared_mismatch:
        parts.append("WARNING: what the constructor declared differs from the branch:\n"
                     + "\n".join(f"- {m}" for m in report.declared_mismatch))
    parts.append(f"The diff:\n{report.diff}")
    return "\n\n".join(parts)


def answers(questions: list[Question], given: dict[str, str]) -> str:
    return "\n".join(f"{q.id}. {q.text}\n   -> {given.get(q.id, '')}" for q in questions)


def best_spec_so_far(original: str, request: str, asked: list[tuple[Question, str]]) -> str:
    qa = "\n".join(f"- {q.text} {a}" for q, a in asked) or "- (no answers)"
    head = original if original == request else f"{original}\n\nChange requested: {request}"
    return f"{head}\n\nAnswers given:\n{qa}\n\n(The clarifier did not finish; this spec is best effort.)"


def question_ids(questions: list[Question]) -> str:
    """The ids of pending questions, for activity and timer summaries: "q1, q2"."""
    return ", ".join(q.id for q in questions) or "(none)"


def answers_payload(questions: list[Question]) -> str:
    """The exact one-line JSON the `answer` update takes, with the real ids."""
    return json.dumps({"answers": {q.id: "..." for q in questions}}, ensure_ascii=False)


APPROVE_PAYLOAD = '{"reviewer": "your name"}'
REJECT_PAYLOAD = '{"reason": "why not"}'
BUDGET_PAYLOAD = '{"add_usd": 2.0}'
BUDGET_TOKENS_PAYLOAD = '{"add_tokens": 100000}'


def usd_text(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def budget_payloads(status: Status) -> list[str]:
    """The raise payloads that fit the spec's budget (a part with no limit cannot be raised)."""
    b = status.budget
    return ([BUDGET_PAYLOAD] if b is None or b.usd is not None else []) + (
        [BUDGET_TOKENS_PAYLOAD] if b is not None and b.tokens is not None else [])


def budget_text(status: Status) -> str:
    """ "$1.2345 of $5.0000 · 120,000 of 200,000 tokens" (what is spent of what is allowed)."""
    b, c = status.budget, status.cost
    parts = []
    if b is not None and b.usd is not None:
        parts.append(f"{usd_text(c.usd + c.possibly_billed_usd if c else 0.0)} of {usd_text(b.usd)}")
    if b is not None and b.tokens is not None:
        parts.append(f"{(c.tokens + c.possibly_billed_tokens if c else 0):,} of {b.tokens:,} tokens")
    return " · ".join(parts) or "no budget"
_ENDED = {Phase.completed, Phase.failed, Phase.cancelled}


def details(status: Status) -> str:
    """Markdown for the Web UI's current details (its "User Metadata" section).

    A Web UI user must be able to act on this alone: it says what the spec waits for and
    which update or signal to send, with the JSON to paste. No CLI command stands in for a
    payload here; the CLI prints its own hints.
    """
    phase = status.phase
    if phase in _ENDED:
        outcome = status.outcome or phase.value
        # the raw value: it is what the RelayOutcome search attribute holds and filters on
        lines = [f"**outcome: {outcome}** · iteration {status.iteration}"]
    else:
        lines = [f"**{phase.value.replace('_', ' ')}** · iteration {status.iteration}"]
    if phase == Phase.waiting_for_answers and status.pending:
        questions = status.pending.questions
        lines.append(f"Waiting for answers to the clarifier's questions "
                     f"(round {status.pending.round}):")
        lines.append("\n".join(f"- `{q.id}`: {q.text}" for q in questions))
        lines.append("To answer, send from **More Actions → Send an Update** the update `answer` "
                     "(or from **Send a Signal** the signal `answer_signal`) with this JSON, each "
                     "`...` replaced by your answer:")
        lines.append(f"`{answers_payload(questions)}`")
    elif phase == Phase.waiting_for_approval:
        ws = status.workspace
        target = (f"merge branch `{ws.branch}` into `{ws.target}`" if ws
                  else "deliver the validated change")
        lines.append(f"Waiting for a human to approve: {target}.")
        if status.review is not None:
            lines += review_details(status.review)
        lines.append("Send it from **More Actions → Send an Update** (or **Send a Signal**):")
        lines.append(f"- approve: update `approve` (signal `approve_signal`), JSON "
                     f"`{APPROVE_PAYLOAD}`\n"
                     f"- reject: update `reject` (signal `reject_signal`), JSON `{REJECT_PAYLOAD}`")
    elif phase == Phase.waiting_for_budget:
        wait = status.budget_wait
        lines.append(f"Waiting for a **budget raise**: {wait.reason if wait else 'over budget'}.")
        lines.append(f"Spent (all iterations): {budget_text(status)}.")
        lines.append("Raise it from **More Actions → Send an Update**: update `raise_budget` "
                     "(or from **Send a Signal** the signal `raise_budget_signal`) with JSON "
                     + " or ".join(f"`{p}`" for p in budget_payloads(status))
                     + "; the agent then goes on where it stopped, nothing paid twice.")
    elif phase == Phase.waiting_for_model and status.model_wait:
        w = status.model_wait
        lines.append(f"Waiting for the {w.role.value}'s model `{w.model}`: no model of its chain "
                     f"is available. Next attempt at {w.next_attempt_at}; last error: "
                     f"{w.last_error}. Nothing to send: relay tries again by itself.")
    elif phase not in _ENDED:
        who = f"the {status.current_role.value}" if status.current_role else "relay"
        lines.append(f"Nothing to send now: {who} is working.")
    if status.gate is not None and status.gate.needs_human:
        lines.append(f"**Gate 2: a person must decide** — {status.gate.reason}")
    if status.degraded:
        lines.append("degraded trajectory:\n" + "\n".join(
            f"- `{d.step_id}` {d.provenance.source.value}/{d.provenance.trust.value}"
            f" ({d.provenance.model}): {d.reason}"
            + (f" — verified by {d.verified_by}" if d.verified_by else "")
            for d in status.degraded))
    if status.gate is not None and status.gate.decision and not status.gate.needs_human:
        lines.append(f"Gate 2: {status.gate.decision}"
                     + (f" by {status.gate.decided_by}" if status.gate.decided_by else ""))
    if status.needs_human:
        lines.append("**needs a human**: compensation failed for "
                     + ", ".join(f"{e.effect} ({e.step})" for e in status.needs_human)
                     + f" — `relay compensate {status.spec_id}`")
    if status.flags:
        lines.append("flags: " + ", ".join(status.flags))
    if status.error:
        lines.append(f"error: {status.error}")
    return "\n\n".join(lines)


# --- progress: one line per step, for `relay watch` and every reader of the status query ----

ENDED_WORDS = {
    "delivered": "delivered",
    "rejected": "rejected by the reviewer; the change was rolled back",
    "change_rejected": "rejected: the validator did not approve the change; it was rolled back",
    "plan_rejected": "rejected: the auditor did not approve the plan",
    "approved": "approved by the validator (no workspace to deliver to)",
}


def ended_text(outcome: str | None, phase: Phase) -> str:
    """How a finished run reads: never "completed" for a rejected or rolled-back one."""
    if phase == Phase.failed:
        return "failed"
    if phase == Phase.cancelled:
        return "cancelled"
    return ENDED_WORDS.get(outcome or "", outcome or phase.value)


def phase_text(status: Status, limits: Limits) -> str:
    """The line for a phase transition, e.g. "validating · validator (round 2 of 3)"."""
    phase, role = status.phase, status.current_role
    words = phase.value.replace("_", " ")
    if phase in _ENDED:
        text = f"ended: {ended_text(status.outcome, phase)}"
        return f"{text}: {status.error}" if phase == Phase.failed and status.error else text
    if phase == Phase.waiting_for_answers and status.pending:
        return (f"waiting for answers (round {status.pending.round}): "
                + question_ids(status.pending.questions))
    if phase == Phase.waiting_for_approval:
        ws = status.workspace
        return (f"waiting for approval: merge {ws.branch} into {ws.target}" if ws
                else "waiting for approval")
    if phase == Phase.waiting_for_budget:
        wait = status.budget_wait
        return (f"waiting for budget ({role.value if role else 'agent'}): "
                f"{budget_text(status)}" + (f"; next call ≈ {wait.estimate_tokens:,} tokens"
                                             + (f" / {usd_text(wait.estimate_usd)}"
                                                if wait.estimate_usd is not None else "")
                                             if wait else ""))
    if phase == Phase.delivering and status.workspace:
        return f"delivering: merging {status.workspace.branch} into {status.workspace.target}"
    if phase == Phase.compensating:
        return "compensating: undoing this run's effects, newest first"
    text = f"{words} · {role.value}" if role else words
    rounds = status.rounds
    if phase == Phase.auditing and "audit" in rounds:
        text += f" (round {rounds['audit']} of {limits.max_audit_rounds})"
    elif phase == Phase.planning and rounds.get("audit"):
        text += f" (revision after audit round {rounds['audit']})"
    elif phase == Phase.validating and "validate" in rounds:
        text += f" (round {rounds['validate']} of {limits.max_fix_rounds})"
    elif phase == Phase.constructing and rounds.get("validate"):
        text += f" (fix round {rounds['validate'] + 1} of {limits.max_fix_rounds})"
    return text


def tools_text(uses: list[ToolUse], shown: int = 12) -> str:
    """ "list_files ., write_file greeting.py, run_checks (failed)" """
    words = [" ".join(filter(None, [u.name, u.path])) + (" (failed)" if u.error else "")
             for u in uses[:shown]]
    more = f" and {len(uses) - shown} more" if len(uses) > shown else ""
    return ", ".join(words) + more


def verdict(role: str, output: dict[str, Any]) -> tuple[str | None, str]:
    """(verdict, what the turn produced) from a role's structured output, for people."""
    def first(items: Any) -> str:
        items = [str(i) for i in items or [] if str(i).strip()]
        return (_cut(items[0], 120) + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")) \
            if items else "no reason given"

    if role == "clarifier":
        questions = output.get("questions") or []
        if questions:
            return None, "asks " + ", ".join(str(q.get("id")) for q in questions
                                             if isinstance(q, dict))
        return None, "the spec is clarified"
    if role == "planner":
        return None, f"plan of {len(output.get('steps') or [])} steps"
    if role in ("auditor", "validator"):
        what = "plan" if role == "auditor" else "change"
        if output.get("approved"):
            return "approved", f"verdict: {what} approved"
        return "rejected", (f"verdict: {what} rejected: "
                            + first(output.get("findings") or output.get("failures")))
    if role == "constructor":
        return None, str(output.get("summary") or "change made")[:200]
    return None, ""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def usd(value: Any) -> float | None:
    """A cost in USD from whatever carries it (a number, or an object with a usd total)."""
    for name in ("usd", "total_usd", "cost_usd", "total"):
        if value is not None and not isinstance(value, (int, float)):
            value = getattr(value, name, value)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def turn_text(role: str, turn: int, kind: str, said: str, elapsed_s: float,
              input_tokens: int, output_tokens: int, cost: float | None,
              uses: list[ToolUse], tool_calls: int, replayed: bool) -> str:
    parts = [f"{role} turn {turn} ({kind})", f"{elapsed_s:.1f} s",
             f"tokens {input_tokens:,} in / {output_tokens:,} out"]
    if cost is not None:
        parts.append(f"${cost:.4f}")
    if replayed:
        parts.append("replayed from the registry (not paid again)")
    if uses:
        parts.append("tools: " + tools_text(uses))
    elif tool_calls:
        parts.append(f"{tool_calls} tool call(s)")
    if said:
        parts.append(said)
    return " · ".join(parts)


def check_tail(report: str | None, lines: int = 12) -> str | None:
    """The status line and the last lines of a check's output."""
    if not report:
        return None
    all_lines = [line.rstrip() for line in report.strip().splitlines()]
    head, rest = all_lines[:2], [line for line in all_lines[2:] if line.strip()]
    if len(rest) > lines:
        rest = [f"[{len(rest) - lines} earlier line(s) not shown]"] + (rest[-lines:] if lines else [])
    return "\n".join(head + rest)


def change_stat(review: Review) -> str:
    """ "2 files changed, +30 -1" """
    return (f"{len(review.files)} file{'s' if len(review.files) != 1 else ''} changed, "
            f"+{review.insertions} -{review.deletions}")


def review_details(review: Review) -> list[str]:
    """Markdown paragraphs of what a reviewer needs: verdict, checks, diff stat, worktree."""
    lines = []
    commit = f" (validated commit `{review.commit[:12]}`)" if review.commit else ""
    lines.append(f"**Validator: {'approved' if review.approved else 'rejected'}**{commit}"
                 + ("" if review.approved else ": " + "; ".join(review.failures)))
    if review.check_report:
        tail = check_tail(review.check_report, 10) or ""
        lines.append("Check output (tail):\n\n```\n" + tail[-1500:] + "\n```")
    if review.diff_error:
        lines.append(f"The diff could not be read: {review.diff_error}")
    elif review.diff_stat:
        stat = review.diff_stat if len(review.diff_stat) < 2500 else review.diff_stat[-2500:]
        lines.append(f"Change: {change_stat(review)}\n\n```\n{stat}\n```")
        lines.append("The whole diff: the `diff` query (Queries tab).")
    if review.worktree:
        lines.append(f"Worktree (on the worker): `{review.worktree}`"
                     + (f" · repository `{review.repo}`" if review.repo else ""))
    return lines
