"""Pure text rendering of structured outputs for the next agent and for people (no I/O)."""

from __future__ import annotations

import json

from relay.models import Change, ChangeReport, Phase, Plan, Question, Status


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
        lines.append("Send it from **More Actions → Send an Update** (or **Send a Signal**):")
        lines.append(f"- approve: update `approve` (signal `approve_signal`), JSON "
                     f"`{APPROVE_PAYLOAD}`\n"
                     f"- reject: update `reject` (signal `reject_signal`), JSON `{REJECT_PAYLOAD}`")
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
