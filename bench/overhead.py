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


SAGA = ("run_effect", "prepare_workspace", "inspect_change", "record_gate")
TOOLS = ("agent_tool",)


async def effect_ms(client, sid: str, after: float, kinds: tuple[str, ...] = SAGA) -> float:
    """Time the run spent in its saga steps (git effects, the change inspection and the gate's
    record) after `after` (epoch seconds): from scheduling such an activity to the workflow's
    next command, i.e. the activity and the workflow task that follows it."""
    return (await step_ms(client, sid, after, kinds))[0]


async def step_ms(client, sid: str, after: float, kinds: tuple[str, ...]) -> tuple[float, int]:
    """(milliseconds, count) of the activities of `kinds` after `after`, as effect_ms counts."""
    history = await client.get_workflow_handle(sid).fetch_history()
    total, open_since, count = 0.0, None, 0
    for event in history.events:
        when = event.event_time.ToMicroseconds() / 1e6
        starts_command = (event.HasField("activity_task_scheduled_event_attributes")
                          or event.HasField("workflow_execution_completed_event_attributes"))
        if starts_command and open_since is not None:
            total += (when - open_since) * 1000
            open_since = None
        if event.HasField("activity_task_scheduled_event_attributes") and when >= after:
            kind = event.activity_task_scheduled_event_attributes.activity_type.name
            if kind in kinds:
                open_since = when
                count += 1
    return total, count


async def recheck_costs(client, rc: RelayClient, model: ScriptedModel, specs: int) -> list[float]:
    """The cost of Gate 2's re-check: specs whose planner is answered by a fallback model (the
    primary overloaded for it), delivered after their degraded steps were re-checked."""
    from relay.scripted_model import Fault
    fallback = rc.settings.model_copy(update={"fallback_models": "relay-scripted-fallback-1",
                                              "capacity_attempts": 1})
    frc = RelayClient(client, fallback, rc.registry)
    costs: list[float] = []
    for _ in range(specs):
        sid = await frc.run("Write a greeting module [no-tools]", auto_approve=True,
                            spec_id=f"bench-gate-{uuid.uuid4().hex[:8]}")
        await wait_for_questions(frc, sid)
        model.add_fault(Fault(kind="overloaded", role="planner", model=SCRIPTED_MODEL, count=2))
        wall = time.time()
        await frc.answer(sid, ANSWERS)
        await frc.result(sid)
        total, n = await step_ms(client, sid, wall, ("recheck_step",))
        if n:
            costs.append(total / n)
    return costs


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
                per_turn, per_turn_no_git, per_tool = [], [], []
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
                        tools, n_tools = await step_ms(client, sid, wall, TOOLS)
                        per_turn_no_git.append((elapsed - git - tools) / TURNS_AFTER_ANSWER)
                        if n_tools:
                            per_tool.append(tools / n_tools)

                rechecks = await recheck_costs(client, rc, model, specs=max(3, specs // 4))

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
    if per_tool:
        print(f"tool call (agent_tool)  : median {statistics.median(per_tool):6.2f} ms  "
              f"(its activity and the workflow task after it; n={len(per_tool)} specs)")
    if rechecks:
        print(f"gate re-check            : median {statistics.median(rechecks):6.2f} ms per "
              f"degraded step (recheck_step with its model call, and the task after it)")
    print(f"7-iteration spec history: {len(sizes)} runs, largest {max(s for s, _ in sizes):,} bytes "
          f"({max(e for _, e in sizes)} events), total {sum(s for s, _ in sizes):,} bytes")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=int, default=20)
    parser.add_argument("--direct", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.specs, args.direct))
