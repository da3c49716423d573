"""An adopter's own effects, loaded by workers through RELAY_EFFECTS=tests.adopter_effects:effects.

A file-backed "ticket tracker": opening a ticket is reversible (closing it is
the compensation), announcing a release is not. A flag file makes the
tracker refuse to close tickets, to exercise compensations that keep failing.
"""

from __future__ import annotations

from pathlib import Path

from relay.effects import EffectContext, EffectRegistry

effects = EffectRegistry()


@effects.effect("tickets.open", reversible=True)
def open_ticket(ctx: EffectContext, payload: dict) -> dict:
    ticket = Path(payload["dir"]) / f"{ctx.spec_id}.open"
    ticket.write_text(payload.get("title", "relay change"))
    return {"ticket": ticket.name}


@open_ticket.compensation
def close_ticket(ctx: EffectContext, payload: dict, undo: dict | None, result: dict | None) -> None:
    tracker = Path(payload["dir"])
    attempts = tracker / "close-attempts"
    attempts.write_text(str(int(attempts.read_text() or 0) + 1 if attempts.exists() else 1))
    if (tracker / "tracker-down").exists():
        raise RuntimeError("the ticket tracker is down")
    (tracker / f"{ctx.spec_id}.open").unlink(missing_ok=True)


@effects.effect("tickets.announce", reversible=False)
def announce(ctx: EffectContext, payload: dict) -> dict:
    (Path(payload["dir"]) / f"{ctx.spec_id}.announced").write_text("shipped")
    return {}


@effects.effect("tickets.purge", reversible=False, destructive=True)
def purge(ctx: EffectContext, payload: dict) -> dict:
    """Deletes the tracker's closed tickets: declared destructive, so a person approves it."""
    (Path(payload["dir"]) / f"{ctx.spec_id}.purged").write_text("purged")
    return {}
