"""Prompt-cache reads on resumed turns: the share of input tokens read from cache.

Runs one spec and its next iterations (`RelayClient.iterate`) on the embedded dev
server, one in-process worker and the scripted model, which accounts prompt caching
as the Messages API does (breakpoints, prefix matches, 5-minute / 1-hour TTLs; see
relay.scripted_model.PromptCache). Each agent works in the spec's workspace with its
tools, so constructor and validator turns have tool steps. A resumed turn is a turn
with earlier history in its session (turn > 1); all its model calls count. The share
is cache reads / (plain input + cache reads + cache writes), from the usage relay
recorded in the registry.

Scenarios: the run with no pause, and with a person who takes 10 minutes to answer
the questions and to ask for each next iteration (the scripted model's clock is moved,
so the TTLs see the pause and the run does not wait).

`--ttl 1h` is a what-if: the bench's HTTP transport rewrites every cache breakpoint relay
sends to `"ttl": "1h"` (relay's agent_turn sends the default 5 minutes).

    python -m bench.cache [--iterations 7] [--min-tokens 256] [--ttl 1h]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

import anthropic
import httpx2

from relay import logs
from relay.client import RelayClient
from relay.models import Phase
from relay.registry import Registry, SessionMessage
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from worker.devserver import DevServer
from worker.main import SCRIPTED_MODEL, ModelEndpoint, build_worker, connect, ensure_search_attributes

ANSWERS = {"q1": "Developers on the team, from the command line.", "q2": "Its tests pass."}
PAUSE_S = 600.0  # a person answering or coming back for the next iteration: past the 5-minute TTL


class Clock:
    """The scripted model's clock: real time plus the pauses a person would take."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped


def share(rows: list[SessionMessage]) -> tuple[float, int, int]:
    read = sum(r.cache_read_tokens for r in rows)
    whole = sum(r.input_tokens + r.cache_read_tokens + r.cache_write_tokens for r in rows)
    return (read / whole if whole else 0.0), read, whole


class OneHourBreakpoints(httpx2.AsyncHTTPTransport):
    """What-if: every cache breakpoint of a request is sent with a 1-hour TTL."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.path.endswith("/v1/messages"):
            body = json.loads(request.content)
            for block in [*(body.get("system") or []), *(body.get("tools") or []),
                          *(b for m in body.get("messages") or [] for b in m["content"])]:
                if isinstance(block, dict) and "cache_control" in block:
                    block["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            request = httpx2.Request(request.method, request.url, headers=headers,
                                     content=json.dumps(body).encode())
        return await super().handle_async_request(request)


async def wait_for_questions(rc: RelayClient, sid: str) -> None:
    while (await rc.status(sid)).phase != Phase.waiting_for_answers:
        await asyncio.sleep(0.01)


async def run_scenario(rc: RelayClient, clock: Clock, iterations: int, pause: bool) -> str:
    sid = f"bench-cache-{uuid.uuid4().hex[:8]}"
    await rc.run("Write a greeting module", spec_id=sid, auto_approve=True)
    await wait_for_questions(rc, sid)
    clock.skipped += PAUSE_S if pause else 0.0
    await rc.answer(sid, ANSWERS)
    await rc.result(sid)
    for n in range(2, iterations + 1):
        clock.skipped += PAUSE_S if pause else 0.0
        await rc.iterate(sid, f"Change {n}: greet in one more language", auto_approve=True)
        await rc.result(sid)
    return sid


def report(name: str, registry: Registry, sid: str) -> None:
    by_role: dict[str, list[SessionMessage]] = defaultdict(list)
    first: list[SessionMessage] = []
    for session in registry.sessions(sid):
        for m in registry.messages(session.id):
            if m.role == "assistant":
                (by_role[session.role] if m.turn > 1 else first).append(m)
    resumed = [m for rows in by_role.values() for m in rows]
    s, read, whole = share(resumed)
    print(f"{name}: resumed turns {s:6.1%} of input tokens read from cache "
          f"({read:,} of {whole:,} over {len(resumed)} model calls)")
    s, read, whole = share(first)
    print(f"{'':{len(name)}}  first turns   {s:6.1%} ({read:,} of {whole:,})")
    for role, rows in by_role.items():
        s, read, whole = share(rows)
        print(f"{'':{len(name)}}  {role:<12}  {s:6.1%} ({read:,} of {whole:,})")


async def main(iterations: int, min_tokens: int, ttl: str) -> None:
    logs.configure("json", "warning")
    data = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    server = await DevServer(data / "temporal", ui=False, persist=True).start()
    clock = Clock()
    try:
        with ScriptedModel(model_name=SCRIPTED_MODEL, min_cacheable_tokens=min_tokens,
                           clock=clock) as model:
            settings = RelaySettings(data_dir=data, task_queue="bench", anthropic_api_key=None)
            client = await connect(server.address)
            await ensure_search_attributes(client)
            registry = Registry.from_url(settings.registry_url())
            http = anthropic.DefaultAsyncHttpxClient(
                transport=OneHourBreakpoints() if ttl == "1h" else None)
            sdk = anthropic.AsyncAnthropic(api_key="bench", base_url=model.url, max_retries=0,
                                           http_client=http)
            endpoint = ModelEndpoint(client=sdk, model=SCRIPTED_MODEL)
            async with build_worker(client, task_queue="bench", registry=registry,
                                    endpoint=endpoint, settings=settings):
                rc = RelayClient(client, settings, registry)
                print(f"{iterations} iterations, minimum cacheable prefix {min_tokens} tokens, "
                      f"breakpoint TTL {ttl}")
                for name, pause in (("no pauses", False), ("10-minute pauses", True)):
                    model.cache.clear()
                    report(name, registry, await run_scenario(rc, clock, iterations, pause))
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=7)
    parser.add_argument("--min-tokens", type=int, default=256)
    parser.add_argument("--ttl", choices=["5m", "1h"], default="5m")
    args = parser.parse_args()
    asyncio.run(main(args.iterations, args.min_tokens, args.ttl))
