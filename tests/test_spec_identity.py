"""A run started outside relay on an existing spec id never hides the spec.

`temporal workflow start --workflow-id <spec>` (or the Web UI's start form) on a finished
spec starts a new run of that id. relay refuses it before it touches the registry; `relay
status` and `relay result` keep showing the spec's last real run and say that a stray run
failed; the worker logs the expected conflict without a traceback.
"""

from __future__ import annotations

import json

from relay.models import Phase
from tests.conftest import run_spec, spec_id, wait_for
from tests.test_cli import cli, ok, temporal_cli


async def test_a_stray_run_on_a_finished_spec_never_hides_it(relay, settings, registry):
    sid = spec_id("ident")
    done = await run_spec(relay, "Write a greeting module", sid=sid)
    assert done.outcome == "delivered"
    sessions_before = [(s.role, s.turns) for s in registry.sessions(sid)]

    ok(await temporal_cli(settings, "workflow", "start", "--type", "SpecPipeline",
                          "--task-queue", settings.task_queue, "--workflow-id", sid,
                          "--input", json.dumps({"request": "something else"})))
    out = await temporal_cli(settings, "workflow", "result", "--workflow-id", sid, "-o", "json")
    assert "already exists" in out[1] + out[2]  # the stray run itself failed, saying why

    st = await relay.status(sid)
    assert st.phase == Phase.completed and st.outcome == "delivered" and st.iteration == 1
    assert st.stray_run and "started outside relay" in st.stray_run and "already exists" in st.stray_run
    assert (await relay.result(sid)).outcome == "delivered"
    assert [(s.role, s.turns) for s in registry.sessions(sid)] == sessions_before
    assert registry.spec(sid).status == "completed"

    code, out, err = await cli(settings, "status", sid)
    assert code == 0 and "iteration 1" in out and "started outside relay" in out
    code, out, err = await cli(settings, "result", sid)
    assert code == 0 and "delivered" in out

    # the spec's next real iteration still works after the stray run
    await relay.iterate(sid, "Also say goodbye")
    st = await wait_for(relay, sid, lambda s: s.iteration == 2)
    assert st.stray_run is None
    await relay.cancel(sid)
