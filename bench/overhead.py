"""Orchestration overhead per agent turn, and history size of a 7-iteration spec.

Runs on the embedded dev server (with relay's throttle-lifting flags) and the
scripted model answering instantly and without tool calls ([no-tools]), with
auto-approve, so a turn is one model call; the run's git side effects
(commit, merge, cleanup) are reported in and out of the per-turn figure. Compares the time of one agent turn
through relay with the same model call made directly through the anthropic SDK
against the same server.

    python -m bench.overhead [--specs 20] [--direct 200]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import anthropic

from relay import logs
from relay.client import RelayClient
from relay.models import OUTPUT_TOOLS, Plan, Role
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from worker.devserver import DevServer
from worker.main import SCRIPTED_MODEL, ModelEndpoint, build_worker, connect, ensure_search_attributes

ANSWERS = {"q1": "developers", "q2": "tests pass"}
TURNS_AFTER_ANSWER = 7  # clarifier, planner, auditor, planner (revise), auditor, constructor, validator


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct_calls(client: anthropic.AsyncAnthropic, n: int) -> list[float]:
    tool = OUTPUT_TOOLS[Role.planner]
    times = []
    for i in range(n):
        started = time.perf_counter()
        await client.messages.create(
            model=SCRIPTED_MODEL, max_tokens=4096, system="You are the planner.",
            messages=[{"role": "user", "content": f"Plan request {i}"}],
            tools=[{"name": tool, "description": "Submit", "input_schema": Plan.model_json_schema()}],
            tool_choice={"type": "tool", "name": tool})
        times.append((time.perf_counter() - started) * 1000)
    return times


async def wait_for_questions(rc: RelayClient, sid: str) -> None:
    while (await rc.status(sid)).pending is None:
        await asyncio.sleep(0.005)


async def effect_ms(client, sid: str, after: float) -> float:
    """Time the run spent in its saga steps (git effects) after `after` (epoch seconds):
    from scheduling an effect to the workflow's next command, i.e. the effect's activity and
    the workflow task that follows it."""
    history = await client.get_workflow_handle(sid).fetch_history()
    total, open_since = 0.0, None
    for event in history.events:
        when = event.event_time.ToMicroseconds() / 1e6
        starts_command = (event.HasField("activity_task_scheduled_event_attributes")
                          or event.HasField("workflow_execution_completed_event_attributes"))
        if starts_command and open_since is not None:
            total += (when - open_since) * 1000
            open_since = None
        if event.HasField("activity_task_scheduled_event_attributes") and when >= after:
            kind = event.activity_task_scheduled_event_attributes.activity_type.name
            if kind in ("run_effect", "prepare_workspace"):
                open_since = when
    return total


async def history_bytes(client, sid: str) -> list[tuple[int, int]]:
    sizes = []
    async for execution in client.list_workflows(f'WorkflowId = "{sid}"'):
        history = await client.get_workflow_handle(sid, run_id=execution.run_id).fetch_history()
        sizes.append((sum(e.ByteSize() for e in history.events), len(history.events)))
    return sizes


async def main(specs: int, direct_n: int) -> None:
    logs.configure("json", "info")  # as a production worker logs (stderr)
    data = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    server = await DevServer(data / "temporal", ui=False, persist=True).start()
    try:
        with ScriptedModel(model_name=SCRIPTED_MODEL) as model:
            settings = RelaySettings(data_dir=data, task_queue="bench", anthropic_api_key=None)
            client = await connect(server.address)
            await ensure_search_attributes(client)
            registry = Registry.from_url(settings.registry_url())
            sdk = anthropic.AsyncAnthropic(api_key="bench", base_url=model.url, max_retries=0)
            endpoint = ModelEndpoint(client=sdk, model=SCRIPTED_MODEL)
            await direct_calls(sdk, 20)  # warm up the connection pool
            direct = await direct_calls(sdk, direct_n)
            async with build_worker(client, task_queue="bench", registry=registry,
                                    endpoint=endpoint, settings=settings):
                rc = RelayClient(client, settings, registry)
                per_turn, per_turn_no_git = [], []
                for i in range(specs + 2):
                    sid = await rc.run("Write a greeting module [no-tools]", auto_approve=True,
                                       spec_id=f"bench-{uuid.uuid4().hex[:8]}")
                    await wait_for_questions(rc, sid)
                    started, wall = time.perf_counter(), time.time()
                    await rc.answer(sid, ANSWERS)
                    await rc.result(sid)
                    elapsed = (time.perf_counter() - started) * 1000
                    if i >= 2:  # the first specs warm up the worker's caches
                        per_turn.append(elapsed / TURNS_AFTER_ANSWER)
                        git = await effect_ms(client, sid, wall)
                        per_turn_no_git.append((elapsed - git) / TURNS_AFTER_ANSWER)

                sid = f"bench-iter-{uuid.uuid4().hex[:8]}"
                await rc.run("Write a greeting module", spec_id=sid, auto_approve=True)
                await wait_for_questions(rc, sid)
                await rc.answer(sid, ANSWERS)
                await rc.result(sid)
                for n in range(2, 8):
                    await rc.iterate(sid, f"Change {n}", auto_approve=True)
                    await rc.result(sid)
                sizes = await history_bytes(client, sid)
    finally:
        server.stop()

    d_med, d_p95 = statistics.median(direct), pct(direct, 0.95)
    r_med, r_p95 = statistics.median(per_turn), pct(per_turn, 0.95)
    n_med, n_p95 = statistics.median(per_turn_no_git), pct(per_turn_no_git, 0.95)
    print(f"direct anthropic call   : median {d_med:6.2f} ms  p95 {d_p95:6.2f} ms  (n={len(direct)})")
    print(f"agent turn through relay: median {r_med:6.2f} ms  p95 {r_p95:6.2f} ms  "
          f"(n={len(per_turn)} specs x {TURNS_AFTER_ANSWER} turns)")
    print(f"overhead per turn       : median {r_med - d_med:6.2f} ms  p95 {r_p95 - d_p95:6.2f} ms  "
          f"ratio {r_med / d_med:.1f}x")
    print(f"without the saga steps  : median {n_med:6.2f} ms  p95 {n_p95:6.2f} ms  "
          f"overhead {n_med - d_med:6.2f} ms  ratio {n_med / d_med:.1f}x")
    print(f"7-iteration spec history: {len(sizes)} runs, largest {max(s for s, _ in sizes):,} bytes "
          f"({max(e for _, e in sizes)} events), total {sum(s for s, _ in sizes):,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=20)
    parser.add_argument("--direct", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.specs, args.direct))
