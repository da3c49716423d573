"""SIGKILL at the worst moments of a side effect: it still happens exactly once.

Failpoints make a worker kill itself (SIGKILL, no cleanup) exactly between an
effect and its ledger update, between the ledger update and the activity's
completion, and between a compensation's undo and its ledger update. The next
worker picks the run up.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from relay.client import RelayClient
from relay.ledger import Ledger
from relay.models import Phase
from tests.conftest import (
    ANSWERS,
    BACKENDS,
    RELAY_CMD,
    cli_env,
    spec_id,
    wait_for,
    wait_for_questions,
)


async def worker(settings, log: Path, failpoints: str = "") -> asyncio.subprocess.Process:
    env = cli_env(settings) | {"RELAY_FAILPOINTS": failpoints}
    return await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=log.open("ab"))


async def killed(proc: asyncio.subprocess.Process) -> None:
    """Wait for a worker to hit its failpoint."""
    code = await asyncio.wait_for(proc.wait(), timeout=90)
    assert code == -signal.SIGKILL, f"the worker exited with {code} instead of hitting its failpoint"


def relay_commits(repo: Path, branch: str) -> list[str]:
    log = subprocess.run(["git", "log", "--format=%B%x00", branch], cwd=repo, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in log.splitlines() if line.startswith("Relay-Effect:")]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_effects_and_compensations_happen_once_across_kills(client, settings, registry,
                                                                   model_server, tmp_path, data_dir):
    rc = RelayClient(client, settings, registry)
    log = tmp_path / "workers.log"
    ledger = Ledger(registry)
    limits = settings.limits().model_copy(update={"heartbeat_timeout_s": 2})
    procs = [await worker(settings, log, "effect.after_act:git.commit")]
    try:
        sid = await rc.run("Write a greeting module [buggy-first]", spec_id=spec_id("kill"),
                           limits=limits)
        repo = data_dir / "workspaces" / sid
        await wait_for_questions(rc, sid, timeout=90)
        await rc.answer(sid, ANSWERS)

        # 1. killed after the commit was made, before the ledger says done
        await killed(procs[0])
        [commit_row] = [r for r in ledger.effects(sid) if r.effect == "git.commit"]
        assert commit_row.status == "started"
        assert len(relay_commits(repo, f"relay/{sid}")) == 1

        # 2. the retry finds the commit by its key; killed after the ledger update
        procs.append(await worker(settings, log, "effect.after_ledger:git.commit"))
        await killed(procs[1])
        assert ledger.get(commit_row.key).status == "done"
        assert len(relay_commits(repo, f"relay/{sid}")) == 1

        # 3. the next worker serves the recorded commit, fixes the module, commits round 2
        procs.append(await worker(settings, log, "compensate.after_undo:git.commit"))
        st = await wait_for(rc, sid, lambda s: s.phase == Phase.waiting_for_approval, timeout=90)
        commits = relay_commits(repo, f"relay/{sid}")
        assert len(commits) == 2 and len(set(commits)) == 2  # round 1 once, round 2 once

        # 4. rejected: killed during a compensation, after its undo, before the ledger update
        await rc.reject(sid, "roll it back")
        await killed(procs[2])
        procs.append(await worker(settings, log))
        result = await rc.result(sid)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()

    assert result.outcome == "rejected"
    rows = ledger.effects(sid)
    assert len({r.step for r in rows}) == len(rows)  # one row per step, never a duplicate
    assert all(r.status == "compensated" for r in rows)
    last_commit = max((r for r in rows if r.effect == "git.commit"), key=lambda r: r.id)
    assert last_commit.compensation_attempts == 2  # the undo ran again; the second was a no-op
    branches = subprocess.run(["git", "branch", "--format=%(refname:short)"], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.split()
    assert branches == ["main"] and not Path(st.workspace.worktree).exists()
