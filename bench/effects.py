"""Cost of a side effect through the ledger and saga, and of compensating a 20-effect run.

    python -m bench.effects [--n 40]

1. A bare git operation (write a file, `git add`, `git commit`) against the same
   operation as two effects through the EffectExecutor (ledger row registered with
   its compensation snapshot, act, ledger row done).
2. The same effect as the `run_effect` Temporal activity would run it is covered by
   (1) plus one activity round trip; the saga's cost is measured end to end in (3).
3. Compensating a run of 20 file-write effects through the SpecCompensation
   workflow on the embedded dev server (1 query activity + 20 compensation activities).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import anthropic

from activities.effects import EffectExecutor
from activities.git_effects import IDENTITY, git_effects
from relay.client import RelayClient
from relay.ledger import Ledger
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from worker.devserver import DevServer
from worker.main import SCRIPTED_MODEL, ModelEndpoint, build_worker, connect, ensure_search_attributes


def new_repo(root: Path) -> Path:
    repo = root / f"repo-{uuid.uuid4().hex[:6]}"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", *IDENTITY, "commit", "-q", "--allow-empty", "-m", "start"], cwd=repo, check=True)
    return repo


def bare(repo: Path, i: int) -> float:
    started = time.perf_counter()
    (repo / f"f{i}.txt").write_text(f"content {i}\n")
    subprocess.run(["git", "add", "-A", "--", f"f{i}.txt"], cwd=repo, check=True)
    subprocess.run(["git", *IDENTITY, "commit", "-q", "-m", f"bare {i}"], cwd=repo, check=True)
    return (time.perf_counter() - started) * 1000


def through_ledger(executor: EffectExecutor, repo: Path, spec: str, i: int) -> float:
    started = time.perf_counter()
    executor.execute(spec_id=spec, run_id="bench", step=f"w{i}", effect="git.write_file",
                     payload={"worktree": str(repo), "path": f"g{i}.txt", "content": f"content {i}\n"})
    executor.execute(spec_id=spec, run_id="bench", step=f"c{i}", effect="git.commit",
                     payload={"repo": str(repo), "worktree": str(repo), "branch": "main",
                              "paths": [f"g{i}.txt"], "message": f"ledger {i}"})
    return (time.perf_counter() - started) * 1000


async def compensation_time(root: Path, registry: Registry, executor: EffectExecutor) -> float:
    server = await DevServer(root / "temporal", ui=False, persist=True).start()
    try:
        with ScriptedModel() as model:
            settings = RelaySettings(data_dir=root, task_queue="bench-effects", anthropic_api_key=None)
            client = await connect(server.address)
            await ensure_search_attributes(client)
            endpoint = ModelEndpoint(anthropic.AsyncAnthropic(api_key="b", base_url=model.url,
                                                              max_retries=0), SCRIPTED_MODEL)
            repo = new_repo(root)
            spec = f"bench-comp-{uuid.uuid4().hex[:6]}"
            for i in range(20):
                executor.execute(spec_id=spec, run_id="bench", step=f"w{i}", effect="git.write_file",
                                 payload={"worktree": str(repo), "path": f"h{i}.txt", "content": "x"})
            async with build_worker(client, task_queue="bench-effects", registry=registry,
                                    endpoint=endpoint, settings=settings):
                rc = RelayClient(client, settings, registry)
                started = time.perf_counter()
                report = await rc.compensate(spec)
                elapsed = (time.perf_counter() - started) * 1000
            assert len(report.compensated) == 20 and not list(repo.glob("h*.txt"))
            return elapsed
    finally:
        server.stop()


def main(n: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="relay-bench-effects-"))
    registry = Registry.from_url(f"sqlite:///{root / 'registry.db'}")
    executor = EffectExecutor(Ledger(registry), git_effects, root)
    repo_bare, repo_ledger = new_repo(root), new_repo(root)
    spec = f"bench-{uuid.uuid4().hex[:6]}"
    for i in range(3):  # warm up
        bare(repo_bare, 1000 + i)
        through_ledger(executor, repo_ledger, spec, 1000 + i)
    b = [bare(repo_bare, i) for i in range(n)]
    led = [through_ledger(executor, repo_ledger, spec, i) for i in range(n)]
    comp = asyncio.run(compensation_time(root, registry, executor))
    bm, lm = statistics.median(b), statistics.median(led)
    print(f"bare write+add+commit     : median {bm:6.2f} ms (n={n})")
    print(f"same through the ledger   : median {lm:6.2f} ms  overhead {lm - bm:5.2f} ms  ratio {lm / bm:.2f}x")
    print(f"compensate a 20-effect run: {comp:7.1f} ms ({comp / 20:.1f} ms per effect, via SpecCompensation)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40)
    main(parser.parse_args().n)
