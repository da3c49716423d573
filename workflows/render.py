"""Pure text rendering of structured outputs for the next agent and for people (no I/O)."""

from __future__ import annotations

from relay.models import Change, Phase, Plan, Question, Status


def bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items) or "- (none given)"


def plan(p: Plan) -> str:
    steps = "\n".join(f"{i}. {step}" for i, step in enumerate(p.steps, 1))
    return f"{p.summary}\n\n{steps}"


def change(c: Change) -> str:
    files = "\n\n".join(f"--- {f.path}\n{f.content}" for f in c.files) or "(no files)"
    return f"{c.summary}\n\n{files}"


def answers(questions: list[Question], given: dict[str, str]) -> str:
    return "\n".join(f"{q.id}. {q.text}\n   -> {given.get(q.id, '')}" for q in questions)


def best_spec_so_far(original: str, request: str, asked: list[tuple[Question, str]]) -> str:
    qa = "\n".join(f"- {q.text} {a}" for q, a in asked) or "- (no answers)"
    head = original if original == request else f"{original}\n\nChange requested: {request}"
    return f"{head}\n\nAnswers given:\n{qa}\n\n(The clarifier did not finish; this spec is best effort.)"


def details(status: Status) -> str:
    """Markdown for the Web UI's current details."""
    lines = [f"**{status.phase.value.replace('_', ' ')}** · iteration {status.iteration}"]
    if status.current_role:
        lines.append(f"current agent: {status.current_role.value}")
    if status.phase == Phase.waiting_for_answers and status.pending:
        lines.append(f"Waiting for answers (round {status.pending.round}) — send the "
                     "`answer` update or `answer_signal` signal with "
                     '`{"answers": {"<id>": "<text>"}}`:')
        lines += [f"- `{q.id}`: {q.text}" for q in status.pending.questions]
    if status.phase == Phase.waiting_for_approval and status.waiting_for:
        lines.append(f"Waiting for {status.waiting_for}")
    if status.needs_human:
        lines.append("**needs a human**: compensation failed for "
                     + ", ".join(f"{e.effect} ({e.step})" for e in status.needs_human)
                     + f" — `relay compensate {status.spec_id}`")
    if status.flags:
        lines.append("flags: " + ", ".join(status.flags))
    if status.error:
        lines.append(f"error: {status.error}")
    return "\n\n".join(lines)
