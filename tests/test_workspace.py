"""Agents act on a real git repository: a branch in its own worktree, real checks, delivery.

Everything here runs real git and the real check command; the user's
checkout is inspected directly to prove it is untouched until delivery and
restored when a run is rolled back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.client import SpecFailed
from relay.ledger import Ledger
from relay.models import Phase, WorkspaceInput
from tests.conftest import (
    ANSWERS,
    BACKENDS,
    approve_when_asked,
    git,
    run_spec,
    snapshot,
    spec_id,
    until,
    wait_for,
    wait_for_questions,
)
from tests.test_cli import cli

CHECK = "python -m unittest -v"


async def waiting_for_approval(relay, sid: str):
    return await wait_for(relay, sid, lambda s: s.phase in (Phase.waiting_for_approval, Phase.failed,
                                                           Phase.completed))


async def start(relay, request: str, repo: Path | None, check: str | None = CHECK,
                **options) -> str:
    workspace = WorkspaceInput(path=str(repo), check=check) if repo else None
    sid = await relay.run(request, spec_id=spec_id("ws"), workspace=workspace, **options)
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    return sid


class TestDelivery:
    @pytest.mark.parametrize("backend", BACKENDS)
    async def test_built_on_a_branch_checked_for_real_and_merged_after_approval(
            self, relay, registry, user_repo, model_server, data_dir):
        """Files land on relay/<spec> in a separate worktree; the checks really run; the
        user's checkout is untouched until approval; then main gets the merge."""
        before = snapshot(user_repo)
        sid = await start(relay, "Write a greeting module", user_repo)
        st = await waiting_for_approval(relay, sid)
        assert st.phase == Phase.waiting_for_approval, st.error

        assert snapshot(user_repo) == (before[0], "", before[2], f"main\nrelay/{sid}")
        assert "def greet" in git(user_repo, "show", f"relay/{sid}:greeting.py")
        assert "unittest" in git(user_repo, "show", f"relay/{sid}:test_greeting.py")
        worktree = Path(st.workspace.worktree)
        assert worktree.is_dir() and worktree.parent == data_dir.resolve() / "worktrees"
        check_output = str([r.body["messages"][-1] for r in model_server.recorded("validator")])
        assert "Ran 3 tests" in check_output and "exit code: 0" in check_output

        await relay.approve(sid, reviewer="maintainer")
        result = await relay.result(sid)
        assert result.outcome == "delivered"
        assert result.delivery["target"] == "main"
        assert git(user_repo, "rev-parse", "main") == result.delivery["commit"] != before[0]
        assert (user_repo / "greeting.py").is_file() and git(user_repo, "status", "--porcelain") == ""
        assert git(user_repo, "branch", "--format=%(refname:short)") == "main"
        assert not worktree.exists()
        assert len(git(user_repo, "worktree", "list").splitlines()) == 1
        rows = Ledger(registry).effects(sid)
        assert [r.effect for r in rows] == ["git.prepare_workspace", "git.write_file",
                                           "git.write_file", "git.commit", "git.deliver",
                                           "git.cleanup"]
        assert all(r.status == "done" for r in rows)
        assert [r.reversible for r in rows][-2:] == [False, False]

    async def test_failing_check_sends_the_constructor_back_to_fix_it(self, relay, user_repo,
                                                                      model_server):
        """The first module fails its test; the validator sees it; the fix passes and ships."""
        sid = await start(relay, "Write a greeting module [buggy-first]", user_repo)
        result = await approve_when_asked(relay, sid)
        assert result.outcome == "delivered"
        first_check = str(model_server.recorded("validator")[0].body) + str(
            model_server.recorded("validator")[1].body["messages"][-1])
        assert "FAILED" in first_check
        assert '"es": "Hola"' in (user_repo / "greeting.py").read_text()
        assert git(user_repo, "log", "--format=%s", "main").count("relay ") == 2  # round 1 and 2

    async def test_auto_approve_policy_delivers_without_a_human(self, relay, user_repo):
        """With auto_approve the spec never waits, and says who decided."""
        sid = await start(relay, "Write a greeting module", user_repo, auto_approve=True)
        result = await relay.result(sid)
        assert result.outcome == "delivered"
        assert result.decision.reviewer == "policy: auto_approve"

    async def test_without_a_workspace_relay_creates_one(self, relay, data_dir):
        """No path: a fresh repository in the data directory, delivered into its main."""
        result = await run_spec(relay, "Write a greeting module")
        repo = data_dir / "workspaces" / result.spec_id
        assert result.outcome == "delivered"
        assert (repo / "greeting.py").is_file()
        assert git(repo, "branch", "--format=%(refname:short)") == "main"


def commit_on(repo: Path, files: dict[str, str], message: str) -> str:
    """Someone else's commit on the user's main while the spec waits for approval."""
    for name, content in files.items():
        (repo / name).write_text(content)
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=colleague", "-c", "user.email=c@x", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "main")


class TestTargetMovedBeforeDelivery:
    """What the validator checked was the branch on the old main; if main moved while the spec
    waited for approval, the merge is checked again before it lands, and refused if it fails."""

    async def test_a_merge_that_passes_its_check_again_is_delivered(self, relay, user_repo,
                                                                     settings):
        sid = await start(relay, "Write a greeting module", user_repo)
        st = await waiting_for_approval(relay, sid)
        assert st.phase == Phase.waiting_for_approval, st.error
        theirs = commit_on(user_repo, {"NOTES.md": "unrelated\n"}, "notes")

        await relay.approve(sid)
        result = await relay.result(sid)
        assert result.outcome == "delivered"
        assert result.delivery["target_moved"] is True
        assert result.delivery["recheck"] == {"base": st.workspace.base, "target_was": theirs,
                                              "command": CHECK, "exit_code": 0}
        assert git(user_repo, "rev-parse", "main^1") == theirs  # the merge sits on their commit
        assert (user_repo / "NOTES.md").is_file() and (user_repo / "greeting.py").is_file()
        assert git(user_repo, "status", "--porcelain") == ""
        code, out, _ = await cli(settings, "result", sid)
        assert code == 0 and f"main had moved since validation: `{CHECK}` re-run on the merge passed" in out

    async def test_a_target_that_is_not_checked_out_is_rechecked_too(self, relay, user_repo):
        """The user works on another branch; main moved meanwhile: re-checked, then moved."""
        git(user_repo, "checkout", "-q", "-b", "work")
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        git(user_repo, "checkout", "-q", "main")
        theirs = commit_on(user_repo, {"NOTES.md": "unrelated\n"}, "notes")
        git(user_repo, "checkout", "-q", "work")

        await relay.approve(sid)
        result = await relay.result(sid)
        assert result.outcome == "delivered" and result.delivery["recheck"]["exit_code"] == 0
        assert git(user_repo, "rev-parse", "main^1") == theirs
        assert "greeting.py" in git(user_repo, "ls-tree", "--name-only", "main")
        assert git(user_repo, "symbolic-ref", "--short", "HEAD") == "work"
        assert not (user_repo / "greeting.py").exists()  # the user's checkout is untouched

    async def test_a_target_that_moves_again_during_the_recheck_is_merged_afresh(
            self, relay, user_repo, data_dir):
        """A colleague pushes while the merge is being re-checked: that merge is not forced in
        (nor the spec failed); delivery builds and checks the merge on the newest target."""
        # the check runs sandboxed, seeing only its worktree and the repository's git dir (read
        # only): the gate and its hold file live in the git dir, it signals in its worktree
        git_dir = user_repo / ".git"
        hold, gate = git_dir / "test-hold", git_dir / "test-gate.py"
        gate.write_text(
            "import pathlib, sys, time\n"
            "hold = pathlib.Path(sys.argv[1])\n"
            "if hold.exists():\n    pathlib.Path('entered').touch()\n"
            "    while hold.exists():\n        time.sleep(0.02)\n")
        check = f"{CHECK} && python {gate} {hold}"
        sid = await start(relay, "Write a greeting module", user_repo, check=check)
        await waiting_for_approval(relay, sid)
        hold.touch()
        commit_on(user_repo, {"NOTES.md": "one\n"}, "first push")

        await relay.approve(sid)
        await until(lambda: any(data_dir.glob("deliver/*/entered")), timeout=60)
        second = commit_on(user_repo, {"MORE.md": "two\n"}, "second push")
        hold.unlink()

        result = await relay.result(sid)
        assert result.outcome == "delivered"
        assert result.delivery["recheck"]["target_was"] == second
        assert git(user_repo, "rev-parse", "main^1") == second
        assert (user_repo / "MORE.md").is_file() and (user_repo / "greeting.py").is_file()

    async def test_without_a_check_command_a_moved_target_is_said_plainly(self, relay, user_repo,
                                                                           settings):
        sid = await start(relay, "Write a greeting module", user_repo, check=None)
        await waiting_for_approval(relay, sid)
        commit_on(user_repo, {"NOTES.md": "unrelated\n"}, "notes")
        await relay.approve(sid)
        result = await relay.result(sid)
        assert result.outcome == "delivered"
        assert result.delivery["target_moved"] is True and "recheck" not in result.delivery
        code, out, _ = await cli(settings, "result", sid)
        assert code == 0 and "no check command is configured, so the merge was not" in out

    async def test_a_merge_that_fails_its_check_is_not_delivered(self, relay, registry, user_repo):
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        theirs = commit_on(user_repo, {"test_policy.py": (
            "import unittest\n\n\nclass Policy(unittest.TestCase):\n"
            "    def test_no_greetings(self):\n"
            "        import os\n        self.assertFalse(os.path.exists('greeting.py'))\n")},
            "forbid greetings")

        await relay.approve(sid)
        with pytest.raises(SpecFailed, match=(
                r"effect git.deliver failed: main moved since validation \(\w+ -> \w+\) and the "
                r"merged result fails its check: exit code: 1; FAILED \(failures=1\); nothing was "
                rf"merged; run 'relay iterate {sid}' to rebuild it on the new target")):
            await relay.result(sid)
        assert git(user_repo, "rev-parse", "main") == theirs
        assert git(user_repo, "status", "--porcelain") == ""
        # the branch and its worktree are rolled back
        assert git(user_repo, "branch", "--format=%(refname:short)") == "main"
        assert len(git(user_repo, "worktree", "list").splitlines()) == 1
        rows = {r.effect: r.status for r in Ledger(registry).effects(sid)}
        assert rows.pop("git.deliver") == "failed"
        assert set(rows.values()) == {"compensated"}

    async def test_an_untracked_file_in_the_way_is_kept_and_the_delivery_refused(self, relay,
                                                                                 user_repo):
        """Git's own reason, at once (not retried as if the target had moved again)."""
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        theirs = commit_on(user_repo, {"NOTES.md": "unrelated\n"}, "notes")
        (user_repo / "greeting.py").write_text("mine, not committed\n")

        await relay.approve(sid)
        with pytest.raises(SpecFailed, match="untracked working tree files would be overwritten"):
            await relay.result(sid)
        assert (user_repo / "greeting.py").read_text() == "mine, not committed\n"
        assert git(user_repo, "rev-parse", "main") == theirs

    async def test_a_merge_that_conflicts_is_not_delivered(self, relay, user_repo):
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        theirs = commit_on(user_repo, {"greeting.py": "GREETING = 'hello'\n"}, "their greeting")

        await relay.approve(sid)
        with pytest.raises(SpecFailed, match="main moved since the change was built and no "
                                             "longer merges cleanly"):
            await relay.result(sid)
        assert git(user_repo, "rev-parse", "main") == theirs
        assert git(user_repo, "status", "--porcelain") == ""


class TestRollback:
    async def assert_restored(self, relay, registry, sid: str, repo: Path, before) -> None:
        assert snapshot(repo) == before
        assert len(git(repo, "worktree", "list").splitlines()) == 1
        rows = Ledger(registry).effects(sid)
        assert rows and all(r.status == "compensated" for r in rows)

    @pytest.mark.parametrize("backend", BACKENDS)
    async def test_final_validator_rejection_compensates_in_reverse_order(
            self, relay, registry, user_repo, settings):
        """Out of fix rounds: every effect is undone newest first and the repo is as it was."""
        before = snapshot(user_repo)
        limits = settings.limits().model_copy(update={"max_fix_rounds": 1})
        sid = await start(relay, "Write a greeting module [buggy-first]", user_repo, limits=limits)
        result = await relay.result(sid)
        assert result.outcome == "change_rejected"
        ledger_order = [r.key for r in Ledger(registry).effects(sid)]
        assert [r.key for r in result.compensated] == ledger_order[::-1]
        await self.assert_restored(relay, registry, sid, user_repo, before)

    async def test_human_rejection_compensates(self, relay, registry, user_repo):
        """`reject` with a reason: nothing is merged and the branch and worktree are gone."""
        before = snapshot(user_repo)
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        decision = await relay.reject(sid, "not this week", reviewer="lead")
        assert decision.approved is False
        result = await relay.result(sid)
        assert result.outcome == "rejected" and result.decision.reason == "not this week"
        await self.assert_restored(relay, registry, sid, user_repo, before)

    @pytest.mark.parametrize("backend", BACKENDS)
    async def test_cancel_compensates(self, relay, registry, user_repo):
        """`relay cancel` while waiting for approval rolls the run back before it ends."""
        before = snapshot(user_repo)
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        await relay.cancel(sid)
        with pytest.raises(SpecFailed, match="cancelled"):
            await relay.result(sid)
        await self.assert_restored(relay, registry, sid, user_repo, before)

    async def test_approval_is_refused_when_nothing_waits(self, relay, user_repo):
        """Approving a spec that is still clarifying is rejected at once, with the phase."""
        sid = await relay.run("Write a greeting module", spec_id=spec_id("ws"),
                              workspace=WorkspaceInput(path=str(user_repo), check=CHECK))
        await wait_for_questions(relay, sid)
        from relay.client import InvalidAnswer

        with pytest.raises(InvalidAnswer, match="nothing is waiting for approval"):
            await relay.approve(sid)
        with pytest.raises(InvalidAnswer, match="nothing is waiting for approval"):
            await relay.reject(sid, "too early")
        await relay.cancel(sid)


class TestBadWorkspaces:
    async def test_not_a_repository(self, relay, tmp_path):
        """A path that is not a git repository is refused before anything starts."""
        from relay.client import InvalidRequest

        with pytest.raises(InvalidRequest, match="is not a git repository"):
            await relay.run("x", workspace=WorkspaceInput(path=str(tmp_path)))
        with pytest.raises(InvalidRequest, match="does not exist"):
            await relay.run("x", workspace=WorkspaceInput(path=str(tmp_path / "nope")))

    async def test_unknown_target_branch(self, relay, user_repo):
        from relay.client import InvalidRequest

        with pytest.raises(InvalidRequest, match="has no branch 'release'"):
            await relay.run("x", workspace=WorkspaceInput(path=str(user_repo), target="release"))

    async def test_bad_workspace_from_the_ui_fails_the_spec_clearly(self, relay, client, settings,
                                                                    tmp_path):
        """Raw JSON naming a non-repository: the spec fails with the reason, not stuck."""
        from temporalio.client import WorkflowFailureError

        sid = spec_id("ws")
        handle = await client.start_workflow(
            "SpecPipeline", {"request": "x", "workspace": {"path": str(tmp_path)}}, id=sid,
            task_queue=settings.task_queue)
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        assert "is not a git repository" in str(failure.value.cause)


class TestIterations:
    async def test_an_iteration_works_on_the_specs_own_repository(self, relay, user_repo):
        """`relay iterate` without --workspace continues in the repository the spec started in,
        also after an iteration that was rejected and rolled back."""
        sid = await start(relay, "Write a greeting module", user_repo)
        assert (await approve_when_asked(relay, sid)).outcome == "delivered"
        first = git(user_repo, "rev-parse", "main")

        await relay.iterate(sid, "Greet in Italian too")
        await waiting_for_approval(relay, sid)
        await relay.reject(sid, "not yet")
        assert (await relay.result(sid)).outcome == "rejected"
        assert git(user_repo, "rev-parse", "main") == first

        await relay.iterate(sid, "Greet in Italian too, again", auto_approve=True)
        result = await relay.result(sid)
        assert result.outcome == "delivered" and result.iteration == 3
        assert git(user_repo, "rev-parse", "main") != first
        assert git(user_repo, "branch", "--format=%(refname:short)") == "main"
