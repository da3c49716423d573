"""Workspace tools: per-role allowlists in code, paths confined to the worktree, bounded loops."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from activities.effects import EffectExecutor
from activities.git_effects import git_effects
from activities.tools import ROLE_TOOLS, ToolBox
from relay.client import SpecFailed
from relay.ledger import EffectConflict, Ledger
from relay.models import Role, WorkspaceRef
from tests.conftest import ANSWERS, approve_when_asked, spec_id, wait_for_questions


@pytest.fixture
def worktree(tmp_path: Path) -> Path:
    root = tmp_path / "wt"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    (root / "src").mkdir()
    (root / "src" / "app.py").write_text("print('hi')\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    os.symlink(tmp_path / "secret.txt", root / "link-out")
    os.symlink(tmp_path, root / "dir-out")
    os.symlink(root / ".git", root / "git-link")
    return root


def toolbox(worktree: Path, registry, role: Role = Role.constructor) -> ToolBox:
    executor = EffectExecutor(Ledger(registry), git_effects, worktree.parent)
    ref = WorkspaceRef(repo=str(worktree), target="main", branch="b", worktree=str(worktree),
                       check="python -c 'print(42)'")
    return ToolBox(role=role, workspace=ref, executor=executor, spec_id=spec_id("tools"),
                   run_id="run", step_prefix="i1/t1")


class TestConfinement:
    @pytest.mark.parametrize("path, reason", [
        ("/etc/passwd", "absolute paths are not allowed"),
        ("~/x", "absolute paths are not allowed"),
        ("../secret.txt", "'..' is not allowed"),
        ("src/../../secret.txt", "'..' is not allowed"),
        (".git/config", "the .git directory is off limits"),
        (".GIT/config", "the .git directory is off limits"),
        ("git-link/config", "the .git directory is off limits"),
        ("src/../.git/HEAD", "'..' is not allowed"),
        ("link-out", "leads outside the workspace"),
        ("dir-out/secret.txt", "leads outside the workspace"),
    ])
    def test_escapes_are_refused_with_a_clear_tool_error(self, worktree, registry, path, reason):
        """Reading or writing outside the worktree is refused, and nothing is written."""
        box = toolbox(worktree, registry)
        for name, args in (("read_file", {"path": path}),
                           ("write_file", {"path": path, "content": "pwned"})):
            outcome = box.run(name, args, "c0")
            assert outcome.is_error and reason in outcome.text, (name, outcome.text)
        assert (worktree.parent / "secret.txt").read_text() == "outside\n"
        assert Ledger(registry).effects(box.spec_id) == []  # no effect was even registered

    def test_inside_paths_work(self, worktree, registry):
        box = toolbox(worktree, registry)
        assert box.run("read_file", {"path": "src/app.py"}, "c0").text == "print('hi')\n"
        listing = box.run("list_files", {}, "c1").text.splitlines()
        assert "src/app.py" in listing and not any(p.startswith(".git") for p in listing)
        assert "link-out" not in listing  # a symlink leading out is not even listed
        assert not any(p.startswith("git-link") for p in listing)  # nor one into .git
        assert "src/app.py:1: print('hi')" in box.run("search_text", {"text": "hi"}, "c2").text
        wrote = box.run("write_file", {"path": "src/new.py", "content": "x = 1\n"}, "c3")
        assert not wrote.is_error and wrote.changed_path == "src/new.py"
        assert (worktree / "src" / "new.py").read_text() == "x = 1\n"

    def test_large_files_are_capped(self, worktree, registry):
        (worktree / "big.txt").write_text("a" * 100_000)
        text = toolbox(worktree, registry).run("read_file", {"path": "big.txt"}, "c0").text
        assert "truncated: 100000 bytes" in text and len(text) < 70_000


class TestAllowlists:
    def test_each_role_gets_only_its_tools(self, worktree, registry):
        """Writes are the constructor's, checks the validator's; the others only read."""
        assert "write_file" in ROLE_TOOLS[Role.constructor]
        assert "run_checks" in ROLE_TOOLS[Role.validator]
        for role in (Role.clarifier, Role.planner, Role.auditor):
            box = toolbox(worktree, registry, role)
            for name in ("write_file", "delete_file", "run_checks"):
                outcome = box.run(name, {"path": "x.py", "content": "x"}, "c0")
                assert outcome.is_error and f"not allowed for the {role.value}" in outcome.text
        assert toolbox(worktree, registry, Role.validator).run(
            "write_file", {"path": "x.py", "content": "x"}, "c0").is_error
        assert not (worktree / "x.py").exists()

    def test_checks_run_the_configured_command(self, worktree, registry):
        outcome = toolbox(worktree, registry, Role.validator).run("run_checks", {}, "c0")
        assert "exit code: 0" in outcome.text and "42" in outcome.text

    def test_checks_never_see_the_workers_secrets(self, worktree, registry, monkeypatch):
        """Checks run code the model wrote: API keys and database URLs are not in their env."""
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret-for-test")
        monkeypatch.setenv("RELAY_DATABASE_URL", "postgresql://relay:pw@db/relay")
        monkeypatch.setenv("GITHUB_TOKEN", "ghp_secret")
        box = toolbox(worktree, registry, Role.validator)
        box.workspace.check = "env"
        text = box.run("run_checks", {}, "c0").text
        assert "exit code: 0" in text and "PATH=" in text
        for secret in ("sk-ant-secret-for-test", "postgresql://relay:pw", "ghp_secret"):
            assert secret not in text

    def test_a_check_that_hangs_is_stopped_at_its_timeout(self, worktree, registry):
        box = toolbox(worktree, registry, Role.validator)
        box.workspace.check, box.check_timeout_s = "sleep 30", 0.5
        outcome = box.run("run_checks", {}, "c0")
        assert outcome.is_error and "timed out after 0.5s" in outcome.text


class TestIdempotencyKeys:
    def test_same_step_with_another_payload_is_refused(self, worktree, registry):
        """A retry that would act differently under the same step is an error, not a reuse."""
        ledger = Ledger(registry)
        sid = spec_id("keys")
        first, created = ledger.register(spec_id=sid, run_id="r", step="s1", effect="git.write_file",
                                         reversible=True, payload={"path": "a", "content": "1"})
        again, created_again = ledger.register(spec_id=sid, run_id="r2", step="s1",
                                               effect="git.write_file", reversible=True,
                                               payload={"content": "1", "path": "a"})
        assert created and not created_again and again.key == first.key  # canonical payload
        with pytest.raises(EffectConflict, match="different payload"):
            ledger.register(spec_id=sid, run_id="r", step="s1", effect="git.write_file",
                            reversible=True, payload={"path": "a", "content": "2"})
        with pytest.raises(EffectConflict, match="different payload"):
            ledger.register(spec_id=sid, run_id="r", step="other", effect="git.write_file",
                            reversible=True, payload={"x": 1}, key=first.key)

    def test_a_done_effect_is_served_from_the_ledger(self, worktree, registry):
        """Executing a done key returns the recorded result without writing again."""
        box = toolbox(worktree, registry)
        box.run("write_file", {"path": "once.txt", "content": "1"}, "c0")
        (worktree / "once.txt").write_text("changed by someone else")
        again = box.run("write_file", {"path": "once.txt", "content": "1"}, "c0")
        assert "already done" in again.text
        assert (worktree / "once.txt").read_text() == "changed by someone else"


class TestThroughThePipeline:
    async def test_escape_attempts_are_refused_and_the_spec_goes_on(self, relay, model_server, tmp_path):
        """The scripted constructor first tries four escapes; each gets a tool error it sees."""
        sid = await relay.run("Write a greeting module [escape]", spec_id=spec_id("tools"))
        await wait_for_questions(relay, sid)
        await relay.answer(sid, ANSWERS)
        result = await approve_when_asked(relay, sid)
        assert result.outcome == "delivered"
        results = [b for r in model_server.recorded("constructor")
                   for b in r.body["messages"][-1]["content"] if b.get("type") == "tool_result"]
        refusals = [b["content"] for b in results if b.get("is_error")]
        assert len(refusals) == 4
        assert any("'..' is not allowed" in t for t in refusals)
        assert any("absolute paths" in t for t in refusals)
        assert any(".git directory" in t for t in refusals)
        assert not Path("/tmp/relay-escape.txt").exists()

    async def test_a_file_name_that_is_not_utf8_reaches_the_model_escaped(self, relay, model_server,
                                                                          user_repo):
        """A committed `caf\\xe9.txt` (Latin-1): the listing the model gets shows it escaped,
        the SDK can send it, and the spec is delivered (it used to fail on a lone surrogate)."""
        from relay.models import WorkspaceInput
        from tests.conftest import git

        (user_repo / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name\n")
        git(user_repo, "add", "-A")
        git(user_repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "latin1")
        sid = await relay.run("Write a greeting module", spec_id=spec_id("latin1"),
                              workspace=WorkspaceInput(path=str(user_repo)))
        await wait_for_questions(relay, sid)
        await relay.answer(sid, ANSWERS)
        result = await approve_when_asked(relay, sid)
        assert result.outcome == "delivered"
        listed = [b["content"] for r in model_server.recorded("constructor")
                  for b in r.body["messages"][-1]["content"]
                  if isinstance(b, dict) and b.get("type") == "tool_result"]
        assert any("caf\\xe9.txt" in str(t) for t in listed), listed

    async def test_a_role_outside_its_allowlist_is_refused(self, relay, model_server):
        """The scripted auditor tries to write a file: refused in code, the audit goes on."""
        sid = await relay.run("Write a greeting module [overreach]", spec_id=spec_id("tools"))
        await wait_for_questions(relay, sid)
        await relay.answer(sid, ANSWERS)
        result = await approve_when_asked(relay, sid)
        assert result.outcome == "delivered"
        refused = [b["content"] for r in model_server.recorded("auditor")
                   for b in r.body["messages"][-1]["content"]
                   if b.get("type") == "tool_result" and b.get("is_error")]
        assert refused and "not allowed for the auditor" in refused[0]

    async def test_an_endless_tool_loop_is_cut_with_a_clear_reason(self, relay, settings, registry):
        """A constructor that never submits is stopped at the bound; the run is rolled back."""
        limits = settings.limits().model_copy(update={"max_tool_steps": 3})
        sid = await relay.run("Write a greeting module [loop-forever]", spec_id=spec_id("tools"),
                              limits=limits)
        await wait_for_questions(relay, sid)
        await relay.answer(sid, ANSWERS)
        with pytest.raises(SpecFailed, match="constructor tool loop cut at 3 model calls"):
            await relay.result(sid)
        assert all(r.status == "compensated" for r in Ledger(registry).effects(sid))
