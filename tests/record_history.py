"""Record a full-run history into tests/histories/ (run from the repo root)."""
import asyncio
import sys
import tempfile
from pathlib import Path

import anthropic

from relay.client import RelayClient
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from worker.devserver import DevServer
from worker.main import (
    SCRIPTED_MODEL,
    ModelEndpoint,
    build_worker,
    connect,
    ensure_search_attributes,
)


async def main(out: str):
    d = Path(tempfile.mkdtemp())
    srv = await DevServer(d / "t", ui=False, persist=False).start()
    with ScriptedModel() as model:
        s = RelaySettings(data_dir=d, task_queue="record", anthropic_api_key=None)
        client = await connect(srv.address); await ensure_search_attributes(client)
        reg = Registry.from_url(s.registry_url())
        ep = ModelEndpoint(anthropic.AsyncAnthropic(api_key="k", base_url=model.url, max_retries=0), SCRIPTED_MODEL)
        async with build_worker(client, task_queue="record", registry=reg, endpoint=ep, settings=s):
            rc = RelayClient(client, s, reg)
            sid = await rc.run("Write a greeting module [buggy-first]", spec_id="recorded-spec")
            while (await rc.status(sid)).pending is None: await asyncio.sleep(0.05)
            await rc.answer(sid, {"q1": "devs", "q2": "tests pass"})
            while (await rc.status(sid)).phase.value != "waiting_for_approval": await asyncio.sleep(0.05)
            await rc.approve(sid, reviewer="recorder")
            await rc.result(sid)
            h = await client.get_workflow_handle(sid).fetch_history()
            Path(out).write_text(h.to_json())
    srv.stop()
asyncio.run(main(sys.argv[1]))
