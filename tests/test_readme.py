"""The README is a contract: every code block in it runs as written.

Every fenced block of README.md is taken by its language, and each one is covered:

- ```text (the directory layout) is not code: the only kind skipped. A block in any other
  language this test does not know fails `test_every_block_is_covered`.
- The two commands of "Two commands": the test command must be exactly the command `.ci/run`
  runs (its last line), so CI runs it. The main job's command is checked in its parts: the
  venv and the editable install are the ones this test runs in (no venv is created here), and
  its `.venv/bin/relay demo` runs from the checkout with `--auto-answer` and a fresh data dir,
  as there is no terminal to ask on (the interactive demo is tests/test_demo.py's, in a pty).
- The ```bash block that is only `relay dev`: started once as the server every other block
  talks to, with `--headless --port <a free port>` added, and stopped at the end.
- Every other ```bash block: its lines in order, in one `bash -euo pipefail` per block, in
  the README order; each must exit 0, and what the README claims of it is checked in its
  output where that is cheap (EXPECTED).
- ```python: the SDK script is saved as health.py and run with `python health.py`; the
  adopters' effects module is saved as yourpkg/effects.py, imported, its effect and
  compensation run through relay.effects.EffectRegistry, and loaded by the test's `relay dev`
  worker through `RELAY_EFFECTS=yourpkg.effects:effects` as the README says, where a spec runs
  it as a hook and a rejection compensates it.

One substitution, the only change to any block: `127.0.0.1:7233` (the default address of
`relay dev`, which the `temporal` lines name) becomes the address of the test's `relay dev`.

The blocks run as a newcomer's shell would: in a directory of the test's own, whose `.relay`
is the data dir (RELAY_DATA_DIR says so too), with the venv's bin (`relay`, `temporal`,
`python`) first on PATH, none of the caller's ANTHROPIC_/RELAY_/TEMPORAL_ settings (so the
scripted model answers) and no temporal.toml of the user's.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.client import RelayClient
from relay.effects import EffectContext, EffectRegistry, load_registry
from relay.models import HookEffect, Phase
from relay.settings import RelaySettings

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent  # the venv's bin: relay, temporal, python
DEFAULT_ADDRESS = "127.0.0.1:7233"

FENCE = re.compile(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def blocks() -> list[tuple[str, str]]:
    """Every fenced block of the README: (language, text), in order."""
    return [(lang, text) for lang, text in FENCE.findall(README.read_text())]


def kind(lang: str, text: str) -> str:
    if lang == "text":
        return "text"
    if lang == "bash":
        if "python3 -m venv" in text:
            return "test-command" if "pytest" in text else "main-job"
        if text.strip() == "relay dev":
            return "dev"
        return "shell"
    if lang == "python":
        if "EffectRegistry" in text:
            return "effects"
        if "RelayClient" in text:
            return "sdk"
    return f"unknown ({lang or 'no language'})"


def of_kind(wanted: str) -> list[str]:
    return [text for lang, text in blocks() if kind(lang, text) == wanted]


SHELL_BLOCKS = of_kind("shell")

# What the README says of a block (picked by its first line), checked in its output.
EXPECTED = {
    'relay run "Add a /health endpoint" --id health-1': [
        "phase waiting_for_answers", "accepted answers q1, q2", "phase waiting_for_approval",
        "validator: approved", "exit code: 0", "worktree: ", "2 files changed",  # at approval
        "health-1: approved", "outcome: delivered", "approved by alice", "ended: delivered",
        "-planner (planner, ses_", "git.deliver", "health-1: next iteration started",
        "health-1: budget now $7.0000", "health-1: cancellation requested", "phase cancelled",
        "health-1: nothing to compensate"],
    "git init -q -b main my-repo": [
        "version-1", "accepted answers q1, q2", "outcome: delivered",
        "relay/version-1 merged into main", "budget $5.0000 and 2,000,000 tokens"],
    "temporal workflow start": [
        "WorkflowId  health-2", "accepted:[q1 q2]", "approved:true", '"outcome": "delivered"',
        "health-2"],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def newcomer_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "RELAY_", "TEMPORAL_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RELAY_DATA_DIR"] = str(data_dir)
    env["TEMPORAL_CONFIG_FILE"] = str(data_dir.parent / "no-temporal.toml")  # not the user's
    env.pop("VIRTUAL_ENV", None)
    return env


def run_block(text: str, cwd: Path, env: dict[str, str], address: str,
              timeout: float = 120) -> str:
    """A block's lines in order in one `bash -euo pipefail`; its output (stdout + stderr)."""
    script = text.replace(DEFAULT_ADDRESS, address)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"README block exited {proc.returncode}:\n{script}\n"
                                  f"--- output ---\n{proc.stdout[-6000:]}")
    return proc.stdout


# --- the blocks and the two commands ------------------------------------------------------


def test_every_block_is_covered() -> None:
    kinds = [kind(lang, text) for lang, text in blocks()]
    unknown = [k for k in kinds if k.startswith("unknown")]
    assert not unknown, f"README blocks this test does not run: {unknown}"
    for wanted in ("test-command", "main-job", "dev", "sdk", "effects"):
        assert kinds.count(wanted) == 1, f"expected one {wanted} block, found {kinds.count(wanted)}"
    assert len(SHELL_BLOCKS) >= 3, kinds
    firsts = [text.splitlines()[0] for text in SHELL_BLOCKS]
    for first in EXPECTED:
        assert any(line.startswith(first) for line in firsts), f"no README block starts {first!r}"


def test_the_test_command_is_what_ci_runs() -> None:
    (command,) = of_kind("test-command")
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert command.strip() == ci_lines[-1].strip()


def test_the_main_job_runs(tmp_path: Path) -> None:
    """`python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/relay demo`: this
    test runs in that venv with relay installed from this checkout; the demo, without a
    terminal, with --auto-answer, runs the example spec to delivery."""
    (command,) = of_kind("main-job")
    parts = [part.strip() for part in command.strip().split("&&")]
    assert parts[0] == "python3 -m venv .venv"
    assert parts[1] == ".venv/bin/pip install -q -e ."
    assert parts[2] == ".venv/bin/relay demo"
    relay = REPO / ".venv" / "bin" / "relay"
    assert relay.exists(), "run the README's command first: no .venv/bin/relay in the checkout"
    import relay as relay_package  # the editable install is this checkout
    assert Path(relay_package.__file__).resolve().is_relative_to(REPO)

    data_dir = tmp_path / ".relay"
    proc = subprocess.run([*parts[2].split(), "--auto-answer"], cwd=REPO,
                          env=newcomer_env(data_dir), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "outcome: delivered" in proc.stdout, proc.stdout[-4000:]
    assert "scripted model" in proc.stdout


# --- against a running `relay dev` -----------------------------------------------------


@pytest.fixture(scope="module")
def adopter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's effects module, saved as yourpkg/effects.py; its directory for PYTHONPATH."""
    (text,) = of_kind("effects")
    root = tmp_path_factory.mktemp("adopter")
    (root / "yourpkg").mkdir()
    (root / "yourpkg" / "__init__.py").write_text("")
    (root / "yourpkg" / "effects.py").write_text(text)
    return root


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory, adopter: Path) -> Iterator[dict]:
    """The README's `relay dev`, on a free port, in a directory of its own; its dev.json."""
    (text,) = of_kind("dev")
    home = tmp_path_factory.mktemp("readme")
    data_dir = home / ".relay"
    env = newcomer_env(data_dir)
    server_env = env | {"RELAY_EFFECTS": "yourpkg.effects:effects",
                        "PYTHONPATH": f"{adopter}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    log = (home / "relay-dev.log").open("w")
    proc = subprocess.Popen([*text.split(), "--headless", "--port", str(free_port())], cwd=home,
                            env=server_env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        info: dict = {}
        while "worker_pid" not in info:
            assert proc.poll() is None, f"relay dev exited:\n{(home / 'relay-dev.log').read_text()}"
            assert time.monotonic() < deadline, "relay dev did not publish dev.json in time"
            time.sleep(0.1)
            if (data_dir / "dev.json").exists():
                try:
                    info = json.loads((data_dir / "dev.json").read_text())
                except ValueError:  # being written
                    info = {}
        yield {**info, "home": home, "data_dir": data_dir, "env": env}
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stops the server and the worker
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.parametrize("text", SHELL_BLOCKS,
                         ids=[re.sub(r"\W+", "-", text.splitlines()[0])[:40].strip("-")
                              for text in SHELL_BLOCKS])
def test_shell_block(text: str, dev: dict) -> None:
    output = run_block(text, dev["home"], dev["env"], dev["address"])
    first = text.splitlines()[0]
    for claim in next((v for k, v in EXPECTED.items() if first.startswith(k)), []):
        assert claim in output, (f"{claim!r} not in the output of:\n{text}\n"
                                 f"--- output ---\n{output[-6000:]}")


def test_sdk_script(dev: dict) -> None:
    (text,) = of_kind("sdk")
    assert "asyncio.run(main())" in text
    (dev["home"] / "health.py").write_text(text.replace(DEFAULT_ADDRESS, dev["address"]))
    proc = subprocess.run(["python", "health.py"], cwd=dev["home"], env=dev["env"],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:]
    out = proc.stdout
    assert re.search(r"^spec-\w+ delivered relay/spec-\w+ in /", out, re.M), out
    assert "validator approved: True" in out and "git.deliver done" in out, out
    assert "5 sessions" in out and "iteration 2: rejected" in out, out
    assert "still needing a human: []" in out, out


def test_effects_snippet_acts_and_compensates_idempotently(adopter: Path, tmp_path: Path) -> None:
    """The module as an adopter writes it: registered, loadable by `module:attribute`, its
    effect and compensation each safe to run twice."""
    sys.path.insert(0, str(adopter))
    try:
        module = importlib.import_module("yourpkg.effects")
        assert load_registry("yourpkg.effects:effects") is module.effects
    finally:
        sys.path.remove(str(adopter))
        for name in ("yourpkg.effects", "yourpkg"):
            sys.modules.pop(name, None)
    registry: EffectRegistry = module.effects
    assert registry.names() == ["tickets.open"]
    definition = registry.get("tickets.open")  # a reversible effect with its compensation
    assert definition.reversible and definition.undo is not None
    ctx = EffectContext(spec_id="health-1", run_id="run-1", key="key-1", data_dir=tmp_path)
    payload = {"title": "Add /health"}
    result = definition(ctx, payload)
    assert definition(ctx, payload) == result == {"ticket": "key-1"}  # run again: the same
    assert module.tracker.open == {"key-1": "Add /health"}
    definition.undo(ctx, payload, None, result)
    definition.undo(ctx, payload, None, result)  # nothing left to undo: fine
    assert module.tracker.open == {}


async def test_effects_snippet_runs_as_a_hook_and_is_compensated(dev: dict) -> None:
    """Loaded by the `relay dev` worker through RELAY_EFFECTS, the README's tickets.open runs
    as a spec's hook, and the spec's rejection compensates it."""
    settings = RelaySettings(data_dir=dev["data_dir"], temporal_address=dev["address"],
                             database_url=f"sqlite:///{dev['data_dir'] / 'registry.db'}",
                             namespace="default", task_queue="relay")
    rc = await RelayClient.connect(settings, address=dev["address"])
    sid = await rc.run("Add a /health endpoint", spec_id="hooks-readme",
                       hooks=[HookEffect(effect="tickets.open", payload={"title": "Add /health"})])
    deadline, answered = time.monotonic() + 60, 0
    while (st := await rc.status(sid)).phase != Phase.waiting_for_approval:
        assert st.phase not in (Phase.completed, Phase.failed, Phase.cancelled), st
        assert time.monotonic() < deadline, st
        if st.pending is not None and st.pending.round > answered:
            answered = st.pending.round
            await rc.answer(sid, {q.id: "the ops team" for q in st.pending.questions})
        await asyncio.sleep(0.2)
    rows = {r.effect: r.status for r in rc.effects(sid)}
    assert rows["tickets.open"] == "done", rows
    await rc.reject(sid, "not this time")
    result = await rc.result(sid)
    assert result.outcome == "rejected"
    assert "tickets.open" in [r.effect for r in result.compensated] and not result.needs_human
    assert {r.effect: r.status for r in rc.effects(sid)}["tickets.open"] == "compensated"
