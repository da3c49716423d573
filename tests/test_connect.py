"""Where relay finds Temporal: a running `relay dev`, RELAY_*, Temporal's own configuration
(TEMPORAL_* and temporal.toml profiles), and a failed connect that ends cleanly."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

from relay.client import (
    InvalidSettings,
    RelayClient,
    TemporalUnreachable,
    temporal_target,
    write_dev_file,
)
from relay.settings import RelaySettings
from tests.conftest import RELAY_CMD
from worker.devserver import free_port

CONNECTION_VARS = ("RELAY_TEMPORAL_ADDRESS", "RELAY_NAMESPACE", "TEMPORAL_ADDRESS",
                   "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE", "TEMPORAL_TLS")


@pytest.fixture
def clean_env(monkeypatch, tmp_path) -> dict[str, str]:
    """No connection settings from the machine running the tests, and no temporal.toml of its
    user: each test sets exactly what it is about. Returned for subprocesses too."""
    for name in CONNECTION_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("RELAY_DATA_DIR", str(tmp_path / "data"))
    return {k: v for k, v in os.environ.items() if not k.startswith("ANTHROPIC_")}


def closed_address() -> str:
    return f"127.0.0.1:{free_port()}"


async def cli(env: dict[str, str], *args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *RELAY_CMD, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_sdk_finds_relay_dev_through_the_data_dir_like_the_cli(temporal, clean_env, tmp_path):
    """A `relay dev` on a non-default port, published in the data dir as `relay dev` does: the
    SDK's RelayClient.connect() and the CLI both find it with no address given."""
    data_dir = tmp_path / "data"
    assert not temporal.address.endswith(":7233")
    write_dev_file(data_dir, address=temporal.address, ui=None, pid=os.getpid())

    rc = await RelayClient.connect(RelaySettings(data_dir=data_dir))
    assert rc.temporal.service_client.config.target_host == temporal.address

    code, _, err = await cli(clean_env, "status", "no-such-spec")  # RELAY_DATA_DIR = data_dir
    assert code == 1
    assert "unknown spec 'no-such-spec'" in err  # Temporal answered: it found the server

    # a dev.json whose process is gone is no server at all
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    write_dev_file(data_dir, address=temporal.address, ui=None, pid=gone.pid)
    assert temporal_target(RelaySettings(data_dir=data_dir)).source == "default"


async def test_temporal_address_and_namespace_are_honoured(temporal, clean_env, monkeypatch):
    """TEMPORAL_ADDRESS and TEMPORAL_NAMESPACE, as the temporal CLI reads them; RELAY_* and an
    explicit address still come first."""
    monkeypatch.setenv("TEMPORAL_ADDRESS", temporal.address)
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "relay-elsewhere")
    rc = await RelayClient.connect()
    assert rc.temporal.service_client.config.target_host == temporal.address
    assert rc.temporal.namespace == "relay-elsewhere"
    # the server lacks that namespace: the CLI says so, not "unknown spec"
    code, _, err = await cli(dict(os.environ), "status", "some-spec")
    assert code == 1 and "Namespace relay-elsewhere is not found" in err, err

    monkeypatch.setenv("RELAY_NAMESPACE", "default")
    assert (await RelayClient.connect()).temporal.namespace == "default"

    closed = closed_address()
    monkeypatch.setenv("RELAY_TEMPORAL_ADDRESS", closed)  # RELAY_* before TEMPORAL_*
    with pytest.raises(TemporalUnreachable, match=f"^cannot reach Temporal at {closed}"):
        await RelayClient.connect()
    rc = await RelayClient.connect(address=temporal.address)  # explicit before RELAY_*
    assert rc.temporal.service_client.config.target_host == temporal.address


async def test_a_temporal_toml_profile_is_honoured(temporal, clean_env, monkeypatch, tmp_path):
    """A profile of Temporal's config file (TEMPORAL_CONFIG_FILE, TEMPORAL_PROFILE), TLS and API
    key included; an unknown profile is a one-line settings error."""
    config = tmp_path / "temporal.toml"
    config.write_text(f'[profile.local]\naddress = "{temporal.address}"\nnamespace = "default"\n\n'
                      '[profile.cloud]\naddress = "ns.acct.tmprl.cloud:7233"\nnamespace = "ns.acct"\n'
                      'api_key = "key-from-profile"\n')
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(config))
    monkeypatch.setenv("TEMPORAL_PROFILE", "local")
    rc = await RelayClient.connect()
    assert rc.temporal.service_client.config.target_host == temporal.address

    monkeypatch.setenv("TEMPORAL_PROFILE", "cloud")
    target = temporal_target(RelaySettings())
    assert (target.address, target.namespace, target.api_key, target.tls) == (
        "ns.acct.tmprl.cloud:7233", "ns.acct", "key-from-profile", True)
    # the profile's API key (hence TLS) also applies to an address given to relay directly
    monkeypatch.setenv("RELAY_TEMPORAL_ADDRESS", temporal.address)
    with pytest.raises(TemporalUnreachable, match=f"^cannot reach Temporal at {temporal.address}"):
        await RelayClient.connect()  # TLS against the plaintext dev server: refused, promptly

    monkeypatch.setenv("TEMPORAL_PROFILE", "missing")
    with pytest.raises(InvalidSettings, match="missing"):
        await RelayClient.connect()


async def test_the_worker_reads_temporal_settings_too(temporal, clean_env, client):
    """`relay worker` with TEMPORAL_ADDRESS only: it polls its task queue on that server."""
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = clean_env | {"TEMPORAL_ADDRESS": temporal.address, "RELAY_TASK_QUEUE": queue,
                       "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}  # no model call is made
    worker = await asyncio.create_subprocess_exec(
        *RELAY_CMD, "worker", env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    request = DescribeTaskQueueRequest(namespace="default", task_queue=TaskQueue(name=queue),
                                       task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW)
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while not (await client.workflow_service.describe_task_queue(request)).pollers:
            assert worker.returncode is None, (await worker.stderr.read()).decode()[-2000:]
            assert asyncio.get_running_loop().time() < deadline, "the worker never polled"
            await asyncio.sleep(0.1)
    finally:
        worker.terminate()
        _, err = await asyncio.wait_for(worker.communicate(), 30)
    assert worker.returncode == 0, err.decode()[-2000:]


SDK_SCRIPT = """
import asyncio, sys
from relay import RelayClient
asyncio.run(RelayClient.connect(address=sys.argv[1]))
"""


async def run_sdk_script(address: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, float]:
    loop = asyncio.get_running_loop()
    began = loop.time()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SDK_SCRIPT, address, cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode(), loop.time() - began


async def test_a_failed_connect_ends_a_script_promptly_and_cleanly(clean_env, tmp_path):
    """A script whose RelayClient.connect() fails: the exception, exit code 1, in seconds; never
    a hang, a pyo3 panic or `Fatal Python error` at exit (each run is a fresh interpreter, the
    crash was a race at exit, so several runs)."""
    env = clean_env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    closed = closed_address()
    runs = await asyncio.gather(*(run_sdk_script(closed, tmp_path, env) for _ in range(6)))
    for code, err, took in runs:
        assert code == 1, err
        assert f"TemporalUnreachable: cannot reach Temporal at {closed}: Connection refused" in err
        assert "panicked" not in err and "Fatal Python error" not in err, err
        assert took < 20, took

    # a port that accepts connections and never answers (the SDK alone waits ~30 s there)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        code, err, took = await run_sdk_script(address, tmp_path, env)
    finally:
        silent.close()
    assert code == 1, err
    assert "does not answer" in err and "panicked" not in err and "Fatal Python" not in err, err
    assert took < 20, took


async def test_a_failed_connect_ends_the_cli_and_the_worker_cleanly(clean_env):
    """The CLI and `relay worker`: one line, exit code 1, promptly, and a hint at relay dev
    when no server was found at all."""
    closed = closed_address()
    code, _, err = await cli(clean_env, "worker", "--address", closed, timeout=30)
    assert code == 1
    assert err.strip() == f"error: cannot reach Temporal at {closed}: Connection refused", err

    target = temporal_target(RelaySettings())
    assert target.source == "default" and "relay dev" in target.hint
