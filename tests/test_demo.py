"""The README's main job and the embedded server, exactly as a user runs them."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import termios
from pathlib import Path

import pytest

from tests.conftest import RELAY_CMD


def user_env(data_dir) -> dict[str, str]:
    """A newcomer's environment: no relay or Temporal settings, a data dir of the test's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ANTHROPIC_", "RELAY_", "TEMPORAL_"))}
    env["RELAY_DATA_DIR"] = str(data_dir)
    env["TEMPORAL_CONFIG_FILE"] = str(Path(data_dir) / "no-temporal.toml")  # not the user's
    return env


async def relay(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Another terminal: one `relay` command, its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


def living(pids: set[int]) -> list[str]:
    """Processes (not zombies) that are one of `pids` or in one of their process groups."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, pgrp = fields[0], int(fields[2])
        if state != "Z" and (int(entry.name) in pids or pgrp in pids):
            found.append(stat[:120])
    return found


async def port_closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return True
    writer.close()
    return False


async def dev_info(data_dir: Path, proc: asyncio.subprocess.Process, timeout: float = 60) -> dict:
    """What `relay dev` or the demo published, once the worker runs."""
    path = data_dir / "dev.json"
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if path.exists():
            info = json.loads(path.read_text())
            if "worker_pid" in info:
                return info
        assert proc.returncode is None, "relay exited before it published dev.json"
        assert asyncio.get_running_loop().time() < deadline, "no dev.json in time"
        await asyncio.sleep(0.05)


async def assert_all_gone(info: dict, timeout: float = 30) -> None:
    """No process the demo or relay dev started survives, and the server's port is closed."""
    started = {info["server_pid"], info["worker_pid"]}
    deadline = asyncio.get_running_loop().time() + timeout
    while living(started) or not await port_closed(info["address"]):
        assert asyncio.get_running_loop().time() < deadline, (
            f"still running: {living(started)}; port {info['address']} open: "
            f"{not await port_closed(info['address'])}")
        await asyncio.sleep(0.05)


class Terminal:
    """A command in a pseudo-terminal that is its controlling terminal, as in a real one:
    Ctrl-C typed there is a SIGINT from the line discipline, and closing it is a SIGHUP."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc, self.master, self.screen = proc, master, ""
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    @classmethod
    async def start(cls, *args: str, env: dict[str, str]) -> Terminal:
        master, slave = pty.openpty()
        proc = await asyncio.create_subprocess_exec(
            *args, env=env | {"TERM": "dumb", "COLUMNS": "100"}, stdin=slave, stdout=slave,
            stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        return cls(proc, master)

    def _read(self) -> None:
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # the other side closed: no more output
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(self.master)
        self.screen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", chunk.decode(errors="replace"))
        self._changed.set()

    async def until(self, predicate, timeout: float = 60.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(self.screen):
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"not on screen in {timeout}s:\n{self.screen[-3000:]}"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    async def exit_code(self, timeout: float = 60) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.sleep(0)  # let the reader take the last output
        return code

    def close(self) -> None:
        """Close the terminal, as a closed window does (the kernel sends SIGHUP)."""
        if self.master >= 0:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master)
            os.close(self.master)
            self.master = -1

    async def kill(self) -> None:
        self.close()
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.mark.parametrize("example", ["greeting", "greeting-fix"])
async def test_demo_runs_the_example_spec_end_to_end(tmp_path, example):
    """`relay demo --auto-answer`: embedded server, worker, scripted model, a delivered spec."""
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "demo", "--auto-answer", "--headless", "--example", example,
        env=user_env(tmp_path),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    text = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "The clarifier asks" in text
    assert "outcome: delivered" in text
    assert "scripted model" in text
    assert "Temporal dev server at" in err.decode()
    assert (tmp_path / "temporal" / "temporal.db").exists()  # state persisted in the data dir
    assert not (tmp_path / "dev.json").exists()  # cleaned up on the way out


async def test_relay_dev_serves_other_commands_and_stops_everything(tmp_path):
    """`relay dev` runs until SIGTERM; other commands find it through the data dir."""
    env = user_env(tmp_path)
    dev = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "dev", "--headless", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        info = await dev_info(tmp_path, dev)
        code, out, err = await relay(env, "run", "Write a greeting module", "--id", "dev-spec")
        assert code == 0, err
        assert out.strip() == "dev-spec"
    finally:
        dev.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(dev.communicate(), timeout=30)
    assert dev.returncode == 0, err.decode()[-2000:]
    assert not (tmp_path / "dev.json").exists()
    await assert_all_gone(info)  # the server and the worker are gone, the port is closed


def asked(question: str):
    """The question is on screen as a prompt (listed once, then asked)."""
    return lambda screen: screen.count(question) >= 2


async def test_demo_asks_the_clarifiers_questions_on_the_terminal(tmp_path):
    """`relay demo` in a terminal: the questions are asked there and the answers reach the agent."""
    term = await Terminal.start(*RELAY_CMD, "demo", "--headless", env=user_env(tmp_path))
    try:
        await term.until(asked("Who will use the result"))
        term.type("Travellers at the front desk\n")
        await term.until(asked("What must be true"))
        term.type("It greets in three languages\n")
        await term.until(lambda s: "Approve delivery?" in s)
        term.type("y\n")
        assert await term.exit_code() == 0, term.screen[-3000:]
    finally:
        await term.kill()
    assert "outcome: delivered" in term.screen
    assert "Travellers at the front desk" in term.screen  # the answer is in the clarified spec
    assert "\\[spec-" not in term.screen  # progress lines are not shown with escapes


async def test_demo_serves_other_terminals_while_it_asks_and_ctrl_c_stops_everything(tmp_path):
    """While the demo waits at its prompts, `relay status`, `relay answer` and `relay approve`
    from another process work at once; Ctrl-C at the prompt stops every process the demo
    started, and the spec, kept in the data dir, resumes under `relay dev` as the demo says."""
    env = user_env(tmp_path)
    term = await Terminal.start(*RELAY_CMD, "demo", "--headless", env=env)
    try:
        await term.until(asked("Who will use the result"))
        info = await dev_info(tmp_path, term.proc)
        sid = re.search(r"Started spec (\S+)", term.screen).group(1)

        code, out, err = await relay(env, "status", sid, "--json", timeout=10)
        assert code == 0, err
        assert json.loads(out)["phase"] == "waiting_for_answers"
        code, _, err = await relay(env, "answer", sid, "--answer", "q1=the ops team",
                                   "--answer", "q2=it greets", timeout=10)
        assert code == 0, err
        await term.until(lambda s: "answered elsewhere" in s)  # the prompt was withdrawn

        await term.until(lambda s: "Approve delivery?" in s)
        code, out, err = await relay(env, "status", sid, "--json", timeout=10)
        assert code == 0, err
        assert json.loads(out)["phase"] == "waiting_for_approval"

        term.type("\x03")  # Ctrl-C at the approval prompt
        assert await term.exit_code(timeout=60) == 128 + signal.SIGINT, term.screen[-3000:]
    finally:
        await term.kill()
    await assert_all_gone(info)
    assert not (tmp_path / "dev.json").exists()
    assert "Stopped (Ctrl-C)" in term.screen
    assert f"relay approve {sid}" in term.screen  # how to go on

    # what the exit message says: relay dev, then relay approve; the spec was kept
    dev = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "dev", "--headless", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        info = await dev_info(tmp_path, dev)
        code, _, err = await relay(env, "approve", sid, timeout=20)
        assert code == 0, err
        code, out, err = await relay(env, "result", sid, "--json", timeout=60)
        assert code == 0, err
        assert json.loads(out)["outcome"] == "delivered"
    finally:
        dev.send_signal(signal.SIGTERM)
        await asyncio.wait_for(dev.communicate(), 60)
    await assert_all_gone(info)


async def test_closing_the_terminal_stops_everything_the_demo_started(tmp_path):
    """A closed terminal (SIGHUP) at a prompt: the demo stops its server and worker and exits."""
    term = await Terminal.start(*RELAY_CMD, "demo", "--headless", env=user_env(tmp_path))
    try:
        await term.until(asked("Who will use the result"))
        info = await dev_info(tmp_path, term.proc)
        term.close()
        assert await term.exit_code(timeout=60) == 128 + signal.SIGHUP
    finally:
        await term.kill()
    await assert_all_gone(info)
    assert not (tmp_path / "dev.json").exists()


async def test_a_killed_relay_dev_leaves_no_orphans(tmp_path):
    """SIGKILL gives relay no chance to clean up: its children die with it (parent-death signal)."""
    dev = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "dev", "--headless", env=user_env(tmp_path), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    info = await dev_info(tmp_path, dev)
    dev.kill()
    await dev.wait()
    await assert_all_gone(info)


async def test_demo_without_a_terminal_says_what_to_do_and_starts_nothing(tmp_path):
    """`relay demo </dev/null`: no dead end. It refuses at once, names --auto-answer and
    --keep-running, and has started nothing that would need stopping."""
    code, out, err = await relay(user_env(tmp_path), "demo", "--headless", timeout=30)
    assert code == 2, out + err
    assert "--auto-answer" in err and "--keep-running" in err
    assert not (tmp_path / "dev.json").exists()
    assert not (tmp_path / "temporal").exists()  # no server was started


async def test_demo_keep_running_without_a_terminal_prints_the_commands_that_answer(tmp_path):
    """`relay demo --keep-running </dev/null`: the server stays up and the printed commands
    (with --address) answer and approve the spec from elsewhere."""
    env = user_env(tmp_path)
    demo = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "demo", "--headless", "--keep-running", env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []

    async def line_with(text: str) -> str:
        while not any(text in line for line in lines):
            line = await asyncio.wait_for(demo.stdout.readline(), 60)
            assert line, "".join(lines)
            lines.append(line.decode())
        return next(line for line in lines if text in line)

    try:
        info = await dev_info(tmp_path, demo)
        command = (await line_with("relay answer ")).split("run ", 1)[1].split()
        if info["address"] != "127.0.0.1:7233":  # where a bare `relay answer` would not look
            assert command[-2:] == ["--address", info["address"]]
        code, _, err = await relay(env | {"RELAY_DATA_DIR": str(tmp_path / "elsewhere")},
                                   *command[1:], "--answer", "q1=ops", "--answer", "q2=it greets")
        assert code == 0, err
        command = (await line_with("relay approve ")).split("run ", 1)[1].split(" or ")[0].split()
        code, _, err = await relay(env, *command[1:])
        assert code == 0, err
        await line_with("outcome: delivered")
    finally:
        demo.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(demo.communicate(), 60)
    assert demo.returncode == 0, err.decode()[-2000:]
    await assert_all_gone(info)
