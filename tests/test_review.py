"""What a reviewer needs at approval, everywhere: the CLI, the SDK, the status query and the
Web UI's current details show the diff stat, the validator's verdict with the tail of the
check output, and the worktree; `relay diff` prints the validated change; the result names
the repository, the branch and the merge commit; narrow or piped tables keep every column.
"""

from __future__ import annotations

import json

from temporalio.api.sdk.v1 import WorkflowMetadata

from relay import view
from relay.models import ChangeDiff, Phase
from tests.conftest import ANSWERS, git, make_repo, spec_id, wait_for, wait_for_questions
from tests.test_cli import cli, ok
from tests.test_progress import finished, watch
from workflows import render

CHECK = "python -m unittest"


async def until_approval(relay, sid: str):
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    return await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)


async def test_the_approval_view_shows_diff_stat_verdict_check_tail_and_worktree(
        relay, settings, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    sid = await relay.run("Write a greeting module", spec_id=spec_id("review"),
                          workspace={"path": str(repo), "check": CHECK})
    st = await until_approval(relay, sid)

    # the SDK and the status query
    review = st.review
    assert review is not None and review.approved is True
    assert review.commit == st.validated_commit and review.base == st.workspace.base
    assert review.worktree == st.workspace.worktree and review.repo == str(repo)
    assert review.check_command == CHECK
    assert review.check_report.startswith(f"$ {CHECK}\nexit code: 0") and "OK" in review.check_report
    assert {f.path for f in review.files} == {"greeting.py", "test_greeting.py"}
    assert review.insertions > 0 and "2 files changed" in review.diff_stat
    # what git says the validated commit changed
    assert review.diff_stat.splitlines()[-1].strip() == git(
        repo, "diff", "--stat=100", review.base, review.commit).splitlines()[-1].strip()

    # the CLI: relay status, with one approval hint (the workflow's text names no command)
    out = ok(await cli(settings, "status", sid))
    assert "validator: approved" in out and f"$ {CHECK}" in out and "exit code: 0" in out
    assert "greeting.py" in out and "2 files changed" in out
    assert f"worktree: {st.workspace.worktree}" in out and f"relay diff {sid}" in out
    assert out.count(f"relay approve {sid}") == 1
    assert "relay approve" not in st.waiting_for

    # the Web UI's current details (read as the UI reads them)
    metadata = await client.get_workflow_handle(sid).query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata)
    details = metadata.current_details
    assert details == render.details(st)
    assert "**Validator: approved**" in details and "exit code: 0" in details
    assert "2 files changed" in details and st.workspace.worktree in details
    assert "`diff` query" in details

    # relay approve shows what it approves, then approves it
    out = ok(await cli(settings, "approve", sid, "--reviewer", "rita"))
    assert out.index("2 files changed") < out.index(f"{sid}: approved; delivering")
    assert f"merge relay/{sid} into main of {repo}" in out

    # the result names the repository, the branch and the merge commit
    out = ok(await cli(settings, "result", sid))
    merge = git(repo, "rev-parse", "main")
    assert f"merge commit {merge} on main" in out
    assert f"repository: {repo} · branch relay/{sid}" in out
    assert "checks: $ python -m unittest · exit code: 0" in out
    res = await relay.result(sid)
    assert res.repository == str(repo) and res.branch == f"relay/{sid}"
    assert res.delivery["commit"] == merge and res.review == st.review


async def test_relay_diff_prints_the_validated_change(relay, settings, client, tmp_path):
    repo = make_repo(tmp_path / "repo")
    sid = await relay.run("Write a greeting module", spec_id=spec_id("review"),
                          workspace={"path": str(repo), "check": CHECK})
    await wait_for_questions(relay, sid)
    code, _, err = await cli(settings, "diff", sid)  # nothing validated yet: said, exit 1
    assert code == 1 and "no validated change yet (phase: waiting_for_answers)" in err
    await relay.answer(sid, ANSWERS)
    st = await wait_for(relay, sid, lambda s: s.phase == Phase.waiting_for_approval, 60)

    expected = git(repo, "diff", st.review.base, st.review.commit)
    out = ok(await cli(settings, "diff", sid))  # piped: plain, the whole diff
    assert expected in out and "\x1b[" not in out
    assert f"validated commit {st.review.commit}" in out
    d = await relay.diff(sid)
    assert d.diff.strip() == expected and not d.truncated and d.diff_chars == len(d.diff)
    as_json = ChangeDiff.model_validate_json(ok(await cli(settings, "diff", sid, "--json")))
    assert as_json == d

    # the diff query takes any payload shape cleanly
    handle = client.get_workflow_handle(sid)
    for args in ([], ["x"], [{"a": 1}], [1, 2, 3], [None]):
        assert await handle.query("diff", args=args, result_type=ChangeDiff) == d

    await relay.approve(sid)
    await relay.result(sid)
    # after delivery (worktree and branch gone) the validated change is still readable
    assert not (tmp_path / "worktrees" / sid).exists()
    assert expected in ok(await cli(settings, "diff", sid))


async def test_greeting_fix_shows_the_failing_check_and_the_fix_round(relay, settings):
    """The demo's second example: the first module fails its test, the validator sends it back
    with the failing check's output, the constructor fixes it in round 2, and it passes."""
    sid = await relay.run(view.example_spec("greeting-fix"), spec_id=spec_id("review"),
                          auto_approve=True)
    watcher = await watch(settings, sid)
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    code, out, err = await finished(watcher)
    assert code == 0, err
    lines = out.splitlines()

    def at(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    failing = at("validator turn 1 (validate)")
    assert "verdict: change rejected: The checks failed" in lines[failing]
    shown_under = "\n".join(lines[failing + 1:failing + 20])
    assert "$ python -m unittest" in shown_under and "exit code: 1" in shown_under
    assert "FAILED (failures=1)" in shown_under and "AssertionError" in shown_under
    assert failing < at("▸ constructing · constructor (fix round 2 of 3)") \
        < at("constructor turn 2 (fix)") < at("committed round 2") \
        < at("▸ validating · validator (round 2 of 3)") < at("verdict: change approved") \
        < at("▸ ended: delivered")
    assert "outcome: delivered" in out


async def test_tables_keep_every_column_at_80_columns(relay, settings, registry, tmp_path):
    """Piped at COLUMNS=80, `relay effects` and `relay status` show every cell whole (effects
    falls back to one block per effect when its table does not fit)."""
    repo = make_repo(tmp_path / "repo")
    sid = await relay.run("Write a greeting module", spec_id=spec_id("review"),
                          workspace={"path": str(repo), "check": CHECK})
    await until_approval(relay, sid)
    await relay.approve(sid)
    await relay.result(sid)
    narrow = {"COLUMNS": "80"}

    out = ok(await cli(settings, "effects", sid, env=narrow))
    assert max(len(line) for line in out.splitlines()) <= 80 or "…" not in out
    assert "…" not in out
    for row in relay.effects(sid):
        detail = row.error or (json.dumps(row.result) if row.result else "")
        for cell in (f"#{row.id}", row.effect, row.step, row.status, row.key[:12], detail):
            assert cell in out, f"{cell!r} is missing at 80 columns:\n{out}"
    wide = ok(await cli(settings, "effects", sid, env={"COLUMNS": "400"}))
    assert "result / error" in wide  # a table where it fits

    out = ok(await cli(settings, "status", sid, env=narrow))
    assert "…" not in out
    for s in (await relay.status(sid)).sessions:
        assert s.name in out and s.session_id in out


async def test_an_ended_run_says_how_it_ended_and_waits_for_nothing(relay, settings, user_repo):
    """A run cancelled at approval no longer shows 'waiting for approval'; a rejected run's
    first line names its outcome, never a bare 'completed'."""
    from tests.test_cli import cli, ok
    from tests.test_workspace import start, waiting_for_approval

    cancelled = await start(relay, "Write a greeting module", user_repo)
    await waiting_for_approval(relay, cancelled)
    await relay.cancel(cancelled)
    await wait_for(relay, cancelled, lambda s: s.phase == Phase.cancelled)
    out = ok(await cli(settings, "status", cancelled))
    assert "phase cancelled" in out and "waiting for" not in out, out

    rejected = await start(relay, "Write a greeting module", user_repo)
    await waiting_for_approval(relay, rejected)
    await relay.reject(rejected, "not now")
    await wait_for(relay, rejected, lambda s: s.phase == Phase.completed)
    first = ok(await cli(settings, "status", rejected)).splitlines()[0]
    assert "phase completed · outcome rejected" in first, first
