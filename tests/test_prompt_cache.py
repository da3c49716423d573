"""Prompt caching you can see: a resumed turn reads its history from the prompt cache.

A spec and its second iteration run through a real worker against the scripted
model, which accounts cache reads and writes as the Messages API does (cache
breakpoints, prefix matches, TTLs; see relay.scripted_model.PromptCache).
Asserted on what the model double received and on the usage relay recorded in
the registry, so it holds for the requests relay really sends.
"""

from __future__ import annotations

from rich.console import Console

from relay import view
from relay.scripted_model import FRAMING_TOKENS, prompt_blocks
from tests.conftest import approve_when_asked, run_spec, spec_id


def tokens_through_message(body: dict, count: int) -> int:
    """Tokens of the prompt's tools, system and its first `count` messages."""
    blocks = sum(len(m["content"]) if isinstance(m["content"], list) else 1
                 for m in body["messages"][:count])
    rendered = prompt_blocks(body)
    skipped = sum(len(m["content"]) if isinstance(m["content"], list) else 1
                  for m in body["messages"])
    head = len(rendered) - skipped  # the tools and system blocks come first
    return sum(b.tokens for b in rendered[: head + blocks])


async def test_resumed_turns_read_their_history_from_cache(relay, model_server, registry):
    sid = spec_id()
    await run_spec(relay, "Write a greeting module", sid=sid)
    await relay.iterate(sid, "Greet in Italian too", auto_approve=True)
    assert (await approve_when_asked(relay, sid)).outcome == "delivered"

    resumed = 0
    for session in registry.sessions(sid):
        answers = [m for m in registry.messages(session.id) if m.role == "assistant"]
        requests = [r for r in model_server.recorded(session.role) if r.status == 200]
        assert len(answers) == len(requests) > 1, session.role
        # The first call writes its whole prompt (the cache was cold): nothing to read yet.
        assert answers[0].cache_read_tokens == 0 and answers[0].cache_write_tokens > 0
        for k in range(1, len(answers)):
            before, answer, request = answers[k - 1], answers[k], requests[k]
            # Each later call (a tool step, or a turn resumed later) reads everything the call
            # before it read or wrote, writes only what is new, and pays plain input for the
            # turn's framing alone.
            assert answer.cache_read_tokens == before.cache_read_tokens + before.cache_write_tokens
            assert answer.input_tokens == FRAMING_TOKENS
            if answer.step == 0 and answer.turn > 1:
                resumed += 1
                # what it read is the role's whole history up to its last answer, as sent
                earlier = len(requests[k - 1].body["messages"])
                assert answer.cache_read_tokens == tokens_through_message(request.body, earlier)
                assert len(request.body["messages"]) == earlier + 2  # + that answer, + new turn
        assert session.cache_read_tokens == sum(a.cache_read_tokens for a in answers)
    assert resumed >= 6  # clarifier, planner and auditor twice over; every role in iteration 2


async def test_sessions_view_shows_the_cache_read_share(relay, registry):
    sid = spec_id()
    result = await run_spec(relay, "Write a greeting module", sid=sid)
    rows = relay.sessions(sid)
    console = Console(record=True, width=200)
    view.print_sessions(console, rows)
    out = console.export_text()
    assert "cached" in out.splitlines()[1]  # the column header
    for s in rows:
        whole = s.input_tokens + s.cache_read_tokens + s.cache_write_tokens
        row = next(line for line in out.splitlines() if s.id in line)
        assert f"{s.cache_read_tokens / whole:.0%}" in row
    read = sum(s.cache_read_tokens for s in rows)
    whole = sum(s.input_tokens + s.cache_read_tokens + s.cache_write_tokens for s in rows)
    assert read > 0
    assert f"cached: {read / whole:.0%} of all input tokens were read from the prompt cache" in out
    shown = view.usage_text(result.usage)  # input counted whole, then its cache split
    u = result.usage
    whole = u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens
    assert f"tokens in {whole:,} (uncached {u.input_tokens:,}" in shown
    assert "from cache)" in shown
