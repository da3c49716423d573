"""Edges of the workspace saga found in review: hostile ids and paths, cancels mid-step, a busy
checkout at delivery, stale branches, awkward commits, late results."""

from __future__ import annotations

import os

import pytest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError

from activities.effects import EffectExecutor
from activities.git_effects import GitError, git_effects
from relay.client import SpecFailed
from relay.ledger import EffectConflict, Ledger
from relay.models import Role, WorkspaceInput
from relay.scripted_model import Fault
from tests.conftest import (
    ANSWERS,
    approve_when_asked,
    git,
    make_repo,
    snapshot,
    spec_id,
    wait_for,
    wait_for_questions,
)
from tests.test_tools import toolbox
from tests.test_workspace import start, waiting_for_approval


class TestHostileInput:
    async def test_a_path_like_workflow_id_fails_and_deletes_nothing(self, relay, client, settings,
                                                                     tmp_path):
        """A spec id from the UI that is a path never becomes a directory relay would remove."""
        victim = tmp_path / "victim"
        victim.mkdir()
        (victim / "precious.txt").write_text("keep me")
        for bad in (str(victim), f"x/../../{victim.name}", "a..b", "x.lock"):
            handle = await client.start_workflow("SpecPipeline", {"request": "x"}, id=bad,
                                                 task_queue=settings.task_queue)
            with pytest.raises(WorkflowFailureError) as failure:
                await handle.result()
            assert "invalid spec id" in str(failure.value.cause)
        assert (victim / "precious.txt").read_text() == "keep me"

    @pytest.mark.parametrize("path, reason", [("a\x00b", "NUL"), ("loop/x", "cannot be resolved")])
    def test_unresolvable_paths_are_tool_errors(self, tmp_path, registry, path, reason):
        root = tmp_path / "wt"
        root.mkdir()
        os.symlink(root / "loop", root / "loop")
        box = toolbox(root, registry)
        for name in ("read_file", "write_file", "delete_file", "list_files", "search_text"):
            outcome = box.run(name, {"path": path, "content": "x", "text": "x"}, "c0")
            assert outcome.is_error and reason in outcome.text, (name, outcome.text)

    def test_compensation_refuses_a_planted_symlink(self, tmp_path, registry):
        """Checks may replace a directory by a symlink out; the undo must not follow it."""
        root, outside = tmp_path / "wt", tmp_path / "outside"
        (root / "pkg").mkdir(parents=True)
        outside.mkdir()
        (outside / "mod.py").write_text("the user's file")
        executor = EffectExecutor(Ledger(registry), git_effects, tmp_path)
        sid = spec_id("plant")
        row, _ = executor.execute(spec_id=sid, run_id="r", step="w", effect="git.write_file",
                                  payload={"worktree": str(root), "path": "pkg/mod.py", "content": "x"})
        (root / "pkg" / "mod.py").unlink()
        (root / "pkg").rmdir()
        os.symlink(outside, root / "pkg")
        with pytest.raises(GitError, match="leads outside the worktree"):
            executor.compensate(row.key)
        assert (outside / "mod.py").read_text() == "the user's file"

    def test_deleting_a_symlink_deletes_the_link(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        (root / "a.txt").write_text("target")
        os.symlink(root / "a.txt", root / "alias")
        box = toolbox(root, registry)
        assert not box.run("delete_file", {"path": "alias"}, "c0").is_error
        assert (root / "a.txt").read_text() == "target" and not (root / "alias").is_symlink()
        again = box.run("delete_file", {"path": "alias"}, "c0")  # a replay of the same call
        assert not again.is_error and "already done" in again.text


class TestLedgerRaces:
    def test_a_late_result_never_overwrites_a_compensation(self, tmp_path, registry):
        ledger = Ledger(registry)
        row, _ = ledger.register(spec_id=spec_id("late"), run_id="r", step="s", effect="git.write_file",
                                 reversible=True, payload={"x": 1})
        ledger.update(row.key, status="compensated")
        with pytest.raises(EffectConflict, match="is compensated already"):
            ledger.update(row.key, only_from=("started", "failed"), status="done")
        assert ledger.get(row.key).status == "compensated"


class TestCommits:
    def test_ignored_and_written_then_deleted_files_commit_cleanly(self, tmp_path, registry):
        repo = make_repo(tmp_path / "repo", {".gitignore": "*.log\n"})
        (repo / "kept.log").write_text("wanted anyway")
        (repo / "new.py").write_text("x = 1\n")
        (repo / ":(exclude)zz").write_text("odd name")
        (repo / "untracked-by-checks.txt").write_text("must not be committed")
        executor = EffectExecutor(Ledger(registry), git_effects, tmp_path)
        row, _ = executor.execute(
            spec_id=spec_id("commit"), run_id="r", step="c", effect="git.commit",
            payload={"repo": str(repo), "worktree": str(repo), "branch": "main",
                     "paths": ["kept.log", "new.py", "gone.py", ":(exclude)zz"], "message": "m"})
        assert row.status == "done" and row.result["commit"]
        committed = git(repo, "show", "--name-only", "--format=", "HEAD").splitlines()
        assert sorted(committed) == [":(exclude)zz", "kept.log", "new.py"]


class TestCancelMidStep:
    async def test_cancel_during_a_model_call_ends_cancelled_and_rolls_back(
            self, relay, registry, user_repo, model_server, client):
        """Cancelled while the constructor works: the run ends CANCELLED (not failed), after the
        in-flight step stopped, and everything it did is undone."""
        before = snapshot(user_repo)
        model_server.add_fault(Fault(kind="slow", role="constructor", delay_s=1.5, count=1))
        sid = await start(relay, "Write a greeting module", user_repo)
        await wait_for(relay, sid, lambda s: s.current_role == Role.constructor)
        await relay.cancel(sid)
        with pytest.raises(SpecFailed, match="cancelled"):
            await relay.result(sid)
        desc = await client.get_workflow_handle(sid).describe()
        assert desc.status == WorkflowExecutionStatus.CANCELED
        assert snapshot(user_repo) == before
        assert all(r.status == "compensated" for r in Ledger(registry).effects(sid))


class TestDelivery:
    async def test_a_busy_checkout_is_never_overwritten(self, relay, registry, user_repo):
        """Uncommitted work on the target in the user's checkout: delivery refuses, the work
        stays, the run is rolled back with the reason."""
        (user_repo / "README.md").write_text("# project\nwork in progress\n")
        sid = await start(relay, "Write a greeting module", user_repo)
        await waiting_for_approval(relay, sid)
        await relay.approve(sid)
        with pytest.raises(SpecFailed, match="has uncommitted changes on main"):
            await relay.result(sid)
        assert (user_repo / "README.md").read_text() == "# project\nwork in progress\n"
        assert git(user_repo, "branch", "--format=%(refname:short)") == "main"

    async def test_target_not_checked_out_is_merged_without_touching_the_checkout(
            self, relay, user_repo):
        """The user works on another branch: main moves, their checkout does not."""
        git(user_repo, "checkout", "-q", "-b", "feature")
        (user_repo / "scratch.txt").write_text("uncommitted, on feature")
        sid = await start(relay, "Write a greeting module", user_repo)
        result = await approve_when_asked(relay, sid)
        assert result.outcome == "delivered"
        assert "greeting.py" in git(user_repo, "ls-tree", "--name-only", "main")
        assert git(user_repo, "symbolic-ref", "--short", "HEAD") == "feature"
        assert (user_repo / "scratch.txt").exists() and not (user_repo / "greeting.py").exists()
        assert len(git(user_repo, "worktree", "list").splitlines()) == 1

    async def test_a_stale_branch_from_an_earlier_run_is_not_delivered(self, relay, user_repo):
        """A relay/<spec> branch left behind (e.g. a compensation that needed a human) is reset
        to the target when the next run starts."""
        sid = spec_id("stale")
        git(user_repo, "checkout", "-q", "-b", f"relay/{sid}")
        (user_repo / "rejected.py").write_text("old rejected code")
        git(user_repo, "add", "rejected.py")
        git(user_repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "stale")
        git(user_repo, "checkout", "-q", "main")
        await relay.run("Write a greeting module", spec_id=sid,
                        workspace=WorkspaceInput(path=str(user_repo), check="python -m unittest"))
        await wait_for_questions(relay, sid)
        await relay.answer(sid, ANSWERS)
        assert (await approve_when_asked(relay, sid)).outcome == "delivered"
        assert "rejected.py" not in git(user_repo, "ls-tree", "--name-only", "main")
