"""A script that uses the SDK and simply returns exits cleanly.

Without care, a process that used a Temporal client can abort at exit with "Fatal Python
error: PyGILState_Release" (temporalio/sdk-python#300) — measured at 5 of 25 runs of the
README's pattern. relay frees the client's native objects at exit; this runs the pattern
repeatedly in real processes and expects every one to exit 0.
"""

from __future__ import annotations

import asyncio
import sys

from tests.conftest import cli_env

SCRIPT = """
import asyncio
from relay import RelayClient

async def main() -> None:
    client = await RelayClient.connect()
    sid = await client.run("Write a greeting module")
    while (await client.status(sid)).pending is None:
        await asyncio.sleep(0.1)
    await client.cancel(sid)

asyncio.run(main())
"""
RUNS = 12


async def test_sdk_scripts_exit_cleanly(relay, settings, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    codes, errors = [], []
    for _ in range(RUNS):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), env=cli_env(settings), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        codes.append(proc.returncode)
        if proc.returncode:
            errors.append(err.decode(errors="replace")[-400:])
    assert codes == [0] * RUNS, errors
