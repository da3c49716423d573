"""The README's main job and the embedded server, exactly as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import signal

import pytest

from tests.conftest import RELAY_CMD


def user_env(data_dir) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "RELAY_"))}
    env["RELAY_DATA_DIR"] = str(data_dir)
    return env


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
        dev_file = tmp_path / "dev.json"
        deadline = asyncio.get_running_loop().time() + 60
        while not dev_file.exists():
            assert dev.returncode is None and asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        info = json.loads(dev_file.read_text())
        run = await asyncio.create_subprocess_exec(
            *RELAY_CMD, "run", "Write a greeting module", "--id", "dev-spec", env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(run.communicate(), timeout=60)
        assert run.returncode == 0, err.decode()
        assert out.decode().strip() == "dev-spec"
    finally:
        dev.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(dev.communicate(), timeout=30)
    assert dev.returncode == 0, err.decode()[-2000:]
    assert not dev_file.exists()
    # the dev server child is gone: its port no longer accepts connections
    host, port = info["address"].split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        pass
    else:
        writer.close()
        raise AssertionError("the Temporal dev server is still listening after relay dev stopped")


async def test_demo_asks_the_clarifiers_questions_on_the_terminal(tmp_path):
    """`relay demo` in a terminal: the questions are asked there and the answers reach the agent."""
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "demo", "--headless", env=user_env(tmp_path) | {"TERM": "dumb"},
        stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    screen = ""

    async def read_until(predicate, timeout: float = 60.0) -> None:
        nonlocal screen
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate(screen):
            assert asyncio.get_running_loop().time() < deadline, screen[-2000:]
            try:
                chunk = await asyncio.get_running_loop().run_in_executor(None, os.read, master, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", chunk.decode(errors="replace"))

    try:
        await read_until(lambda s: s.count("Who will use the result") >= 2)  # listed, then asked
        os.write(master, b"Travellers at the front desk\n")
        await read_until(lambda s: s.count("What must be true") >= 2)
        os.write(master, b"It greets in three languages\n")
        await read_until(lambda s: "Approve delivery?" in s)
        os.write(master, b"y\n")
        await read_until(lambda s: "outcome:" in s)
        await read_until(lambda s: False, timeout=30)  # drain until the terminal closes
    finally:
        if proc.returncode is None:
            await asyncio.wait_for(proc.wait(), timeout=30)
        os.close(master)
    assert proc.returncode == 0, screen[-2000:]
    assert "outcome: delivered" in screen
    assert "Travellers at the front desk" in screen  # the answer is in the clarified spec
