"""Tools that cannot be tricked: hard links, a directory swapped for a symlink mid-write, names
git refuses, errors raised inside a tool, a worktree's .git file, a check run without a sandbox.

Everything runs on the real filesystem, a real ledger and real git; the attacker in the race
is a separate process, as a check's background process would be.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from activities import checks, safe_fs
from activities.effects import EffectExecutor
from activities.git_effects import GitError, git_effects
from activities.tools import ToolBox
from relay.effects import EffectFailed, EffectRegistry
from relay.ledger import Ledger
from relay.models import Role, WorkspaceRef
from tests.conftest import git, make_repo, spec_id
from tests.test_tools import toolbox

SECRET = "TOP SECRET: a file outside the worktree\n"


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """A worktree holding `hl.txt`, a hard link a check planted to a file outside it."""
    root, outside = tmp_path / "wt", tmp_path / "outside.txt"
    root.mkdir()
    outside.write_text(SECRET)
    os.link(outside, root / "hl.txt")
    return root, outside


def tree(root: Path) -> list[str]:
    """Every entry under root, hidden ones included, without following symlinks."""
    return sorted(str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root)
                  for n in [*dirs, *files])


class TestHardLinks:
    def test_a_hard_link_is_never_read_written_or_deleted(self, planted, registry):
        root, outside = planted
        box = toolbox(root, registry)
        read = box.run("read_file", {"path": "hl.txt"}, "c0")
        assert read.is_error and "hard links" in read.text and "TOP SECRET" not in read.text
        wrote = box.run("write_file", {"path": "hl.txt", "content": "pwned"}, "c1")
        assert wrote.is_error and "hard links" in wrote.text
        deleted = box.run("delete_file", {"path": "hl.txt"}, "c2")
        assert deleted.is_error and "hard links" in deleted.text
        found = box.run("search_text", {"text": "TOP SECRET"}, "c3")
        assert found.text == "(no matches)"
        assert outside.read_text() == SECRET and (root / "hl.txt").exists()
        assert Ledger(registry).effects(box.spec_id) == []  # refused before any effect

    def test_the_effects_refuse_it_too(self, planted, registry, tmp_path):
        """The tool's look comes first, but the effect is where the write happens: a link planted
        between the two is refused there (by the snapshot, and by the act itself)."""
        root, outside = planted
        executor = EffectExecutor(Ledger(registry), git_effects, tmp_path)
        payload = {"worktree": str(root), "path": "hl.txt", "content": "pwned"}
        with pytest.raises(GitError, match="hard links"):
            executor.execute(spec_id=spec_id("hl"), run_id="r", step="w", effect="git.write_file",
                             payload=payload)
        with pytest.raises(GitError, match="hard links"):
            git_effects.get("git.write_file").act(None, payload)
        with pytest.raises(GitError, match="hard links"):
            git_effects.get("git.delete_file").act(None, {"worktree": str(root), "path": "hl.txt"})
        assert outside.read_text() == SECRET and (root / "hl.txt").exists()

    def test_compensation_never_writes_through_a_link_planted_after_the_write(self, tmp_path,
                                                                              registry):
        """A check links the file the constructor changed to a name outside; the rollback puts
        the old content back in the worktree and leaves the outside name alone."""
        root = tmp_path / "wt"
        root.mkdir()
        (root / "mod.py").write_text("old\n")
        box = toolbox(root, registry)
        wrote = box.run("write_file", {"path": "mod.py", "content": "new\n"}, "c0")
        assert not wrote.is_error
        os.link(root / "mod.py", tmp_path / "stolen.py")
        box.executor.compensate(wrote.effect_key)
        assert (root / "mod.py").read_text() == "old\n"
        assert (tmp_path / "stolen.py").read_text() == "new\n"
        assert os.stat(root / "mod.py").st_nlink == 1


# The attacker: swaps the worktree's directory `d` and a symlink to a directory outside,
# atomically (renameat2 RENAME_EXCHANGE), as fast as it can, in its own process.
FLIPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
if libc.renameat2(-100, a, -100, b, 2) != 0 or libc.renameat2(-100, a, -100, b, 2) != 0:
    print("no renameat2", flush=True)
    raise SystemExit(0)
print("flipping", flush=True)
while True:
    libc.renameat2(-100, a, -100, b, 2)
"""


@pytest.fixture
def swapping(tmp_path: Path):
    """A worktree whose `d` is swapped with a symlink to `outside/` all the time."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the attacker uses Linux's renameat2")
    root, outside = tmp_path / "wt", tmp_path / "outside"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f.txt").write_text("inside\n")
    outside.mkdir()
    (outside / "f.txt").write_text(SECRET)
    os.symlink(outside, root / "d-swap")
    before = (os.stat(outside / "f.txt").st_mtime_ns, sorted(os.listdir(outside)))
    proc = subprocess.Popen([sys.executable, "-c", FLIPPER, root / "d", root / "d-swap"],
                            stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "flipping":
            pytest.skip("renameat2 is not available here")
        yield root, outside
    finally:
        proc.kill()
        proc.wait()
    assert (outside / "f.txt").read_text() == SECRET
    assert (os.stat(outside / "f.txt").st_mtime_ns, sorted(os.listdir(outside))) == before


class TestSymlinkSwap:
    def test_the_write_effect_never_lands_outside(self, swapping):
        """The landed code wrote outside in 8-21 of 20,000 writes against a slower attacker;
        against this one it escapes within a few hundred."""
        root, _ = swapping
        act = git_effects.get("git.write_file").act
        wrote = refused = 0
        deadline = time.monotonic() + 4
        for i in range(20_000):
            if time.monotonic() > deadline:
                break
            try:
                act(None, {"worktree": str(root), "path": "d/f.txt", "content": f"w{i}\n"})
                wrote += 1
            except GitError as exc:
                assert "symlink" in str(exc), exc
                refused += 1
        assert wrote + refused >= 2_000 and refused  # the race was really run
        # (the fixture asserts that nothing outside changed)

    def test_the_tools_never_read_or_write_outside(self, swapping, registry):
        root, _ = swapping
        box = toolbox(root, registry)
        deadline = time.monotonic() + 4
        reads = writes = 0
        for i in range(2_000):
            if time.monotonic() > deadline:
                break
            read = box.run("read_file", {"path": "d/f.txt"}, f"r{i}")
            assert "TOP SECRET" not in read.text
            reads += 1
            if i % 4 == 0:  # a write registers a ledger row: fewer of them
                wrote = box.run("write_file", {"path": "d/f.txt", "content": f"w{i}\n"}, f"w{i}")
                assert wrote.is_error or wrote.text == "wrote d/f.txt", wrote.text
                writes += 1
            listing = box.run("search_text", {"text": "TOP SECRET"}, f"s{i}")
            assert listing.text == "(no matches)"
        assert reads >= 200 and writes >= 50

    def test_a_symlinked_directory_inside_is_not_followed_either(self, tmp_path, registry):
        """Even a symlink that stays inside is refused: following one safely is not worth it."""
        root = tmp_path / "wt"
        (root / "src").mkdir(parents=True)
        (root / "src" / "a.py").write_text("a = 1\n")
        os.symlink(root / "src", root / "alias")
        box = toolbox(root, registry)
        for name, args in (("read_file", {"path": "alias/a.py"}),
                           ("write_file", {"path": "alias/b.py", "content": "b"})):
            outcome = box.run(name, args, "c0")
            assert outcome.is_error and "alias is a symlink" in outcome.text, outcome.text
        assert sorted(os.listdir(root / "src")) == ["a.py"]


class TestDeletingSymlinks:
    def test_a_symlink_out_is_deleted_itself_and_its_target_kept(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        (tmp_path / "target.txt").write_text(SECRET)
        os.symlink(tmp_path / "target.txt", root / "out")
        box = toolbox(root, registry)
        assert box.run("read_file", {"path": "out"}, "c0").is_error
        deleted = box.run("delete_file", {"path": "out"}, "c1")
        assert not deleted.is_error and deleted.changed_path == "out"
        assert not os.path.lexists(root / "out") and (tmp_path / "target.txt").read_text() == SECRET
        box.executor.compensate(deleted.effect_key)  # the rollback puts the link back
        assert os.readlink(root / "out") == str(tmp_path / "target.txt")


# Names git refuses (verify_path, is_ntfs_dotgit, is_hfs_dotgit) and names that are ambiguous.
GIT_REFUSES = [".git /config", ".git./config", ".GIT. /x", "git~1/config", "GIT~1 ./x",
               "a/.git ", ".git::$INDEX_ALLOCATION/config", ".git:x/y"]
REFUSED = [*GIT_REFUSES, ".g\u200cit/config", "\ufeff.GIT/config", "a//b.py", "a/./b.py",
           "b.py/", "a\\b.py", "tab\there.py", "bell\x07.py", "c1\x85.py", "a/..", "sub/../x"]
ACCEPTED = [".gitignore", ".github/workflows/ci.yml", "git~2/x", "a.git/x", ".gitx/y",
            "./lead.py", "notes:v1.txt", "caf\u00e9.py"]


class TestGitNames:
    def test_git_really_refuses_these(self, tmp_path):
        """Why they are refused: `git add` rejects each, which would fail the spec's commit."""
        repo = make_repo(tmp_path / "repo")
        for name in GIT_REFUSES:
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            (repo / name).write_text("x")
            added = subprocess.run(["git", "--literal-pathspecs", "add", "-f", "--", name],
                                   cwd=repo, capture_output=True, text=True)
            assert added.returncode != 0 and "invalid path" in added.stderr, name

    @pytest.mark.parametrize("name", REFUSED)
    def test_refused_before_any_write(self, tmp_path, registry, name):
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry)
        before = tree(root)
        outcome = box.run("write_file", {"path": name, "content": "x"}, "c0")
        assert outcome.is_error and outcome.text.startswith("refused:"), outcome.text
        assert tree(root) == before
        assert Ledger(registry).effects(box.spec_id) == []
        with pytest.raises(GitError):  # and the effect refuses them itself
            git_effects.get("git.write_file").act(None, {"worktree": str(root), "path": name,
                                                         "content": "x"})
        assert tree(root) == before

    def test_accepted_names_are_written_and_committed(self, tmp_path, registry):
        """What the tools accept, git accepts: the spec's commit goes through."""
        repo = make_repo(tmp_path / "repo")
        box = toolbox(repo, registry)
        changed = []
        for i, name in enumerate(ACCEPTED):
            outcome = box.run("write_file", {"path": name, "content": f"{i}\n"}, f"c{i}")
            assert not outcome.is_error, (name, outcome.text)
            changed.append(outcome.changed_path)
        assert "lead.py" in changed
        row, _ = box.executor.execute(
            spec_id=box.spec_id, run_id="r", step="commit", effect="git.commit",
            payload={"repo": str(repo), "worktree": str(repo), "branch": "main",
                     "paths": changed, "message": "m"})
        assert row.status == "done" and row.result["commit"]
        committed = git(repo, "show", "--name-only", "--format=", "-z", "HEAD")
        assert sorted(committed.strip("\0").split("\0")) == sorted(changed)

    def test_dotgit_matching_follows_git(self):
        for name in (".git", ".GIT", ".git ", ".git.", ".git. .", "git~1", "GIT~1.",
                     ".git:stream", ".g\u200dit", "\u206a.git"):
            assert safe_fs.is_dotgit(name), name
        for name in (".gitignore", ".git-x", "git", "git~2", "x.git", ". git"):
            assert not safe_fs.is_dotgit(name), name


def failing_effects(exc: BaseException) -> EffectRegistry:
    """An adopter-style registry whose write effect fails with `exc`."""
    effects = EffectRegistry()

    @effects.effect("git.write_file", reversible=True)
    def write(ctx, p):
        raise exc

    write.compensation(lambda ctx, p, undo, result: None)
    return effects


class TestErrorsAreToolErrors:
    @pytest.mark.parametrize("exc", [GitError("git add failed in /wt: fatal: invalid path"),
                                     EffectFailed("the disk is full"),
                                     ValueError("bad\nvalue"), KeyError("k")])
    def test_an_effect_failure_is_a_tool_error_and_recorded_failed(self, tmp_path, registry, exc):
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry)
        box.executor = EffectExecutor(Ledger(registry), failing_effects(exc), tmp_path)
        outcome = box.run("write_file", {"path": "a.py", "content": "x"}, "c0")
        assert outcome.is_error and outcome.text.startswith("error: ") and "\n" not in outcome.text
        [row] = Ledger(registry).effects(box.spec_id)
        assert row.status == "failed" and row.error

    def test_a_conflicting_replay_is_a_tool_error(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry)
        assert not box.run("write_file", {"path": "a.py", "content": "1"}, "c0").is_error
        again = box.run("write_file", {"path": "a.py", "content": "2"}, "c0")
        assert again.is_error and "different payload" in again.text
        assert (root / "a.py").read_text() == "1"

    @pytest.mark.parametrize("exc", [asyncio.CancelledError(),
                                     OperationalError("UPDATE effects", {}, Exception("down"))])
    def test_cancellation_and_registry_outages_are_not_swallowed(self, tmp_path, registry, exc):
        """A cancelled turn must end, and a registry outage retries the turn (its tool calls
        replay from the ledger) rather than telling the model the database is down."""
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry)
        box.executor = EffectExecutor(Ledger(registry), failing_effects(exc), tmp_path)
        with pytest.raises(type(exc)):
            box.run("write_file", {"path": "a.py", "content": "x"}, "c0")


class TestWorktreeGitFile:
    def test_list_files_hides_a_worktrees_git_file(self, tmp_path, registry):
        repo = make_repo(tmp_path / "repo", {"README.md": "# x\n", "app.py": "print(1)\n"})
        worktree = tmp_path / "worktree"
        git(repo, "worktree", "add", "-q", "-b", "relay/x", str(worktree))
        assert (worktree / ".git").is_file()
        box = toolbox(worktree, registry)
        assert box.run("list_files", {}, "c0").text.splitlines() == ["README.md", "app.py"]
        assert box.run("search_text", {"text": "gitdir"}, "c1").text == "(no matches)"
        for name in ("read_file", "write_file", "delete_file"):
            outcome = box.run(name, {"path": ".git", "content": "x"}, "c2")
            assert outcome.is_error and ".git directory is off limits" in outcome.text
        assert (worktree / ".git").read_text().startswith("gitdir:")


def _sandboxed_check_run() -> bool:
    return "sandboxed" in getattr(checks.CheckRun, "__dataclass_fields__", {})


@pytest.mark.skipif(not _sandboxed_check_run(), reason="checks know nothing of sandboxes yet")
class TestChecksSandbox:
    def test_an_unsandboxed_run_is_flagged(self, tmp_path, registry, monkeypatch):
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry, Role.validator)
        monkeypatch.setenv("RELAY_BWRAP", str(tmp_path / "no-bwrap"))
        monkeypatch.setenv("RELAY_UNSANDBOXED_CHECKS", "1")
        outcome = box.run("run_checks", {}, "c0")
        assert outcome.unsandboxed and not outcome.is_error and "42" in outcome.text

    def test_a_check_refused_for_lack_of_a_sandbox_is_a_tool_error(self, tmp_path, registry,
                                                                   monkeypatch):
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry, Role.validator)
        monkeypatch.setenv("RELAY_BWRAP", str(tmp_path / "no-bwrap"))
        monkeypatch.delenv("RELAY_UNSANDBOXED_CHECKS", raising=False)
        outcome = box.run("run_checks", {}, "c0")
        assert outcome.is_error and not outcome.unsandboxed and "sandbox" in outcome.text


# --- red-team findings 2, 3, 6, 8, 9 ---------------------------------------------------------


def _worktree(tmp_path: Path, files: dict[str, str] | None = None) -> tuple[Path, Path]:
    """A user's repository and a linked worktree of it on relay/x (as relay makes them)."""
    repo = make_repo(tmp_path / "repo", files or {"README.md": "# x\n", "app.py": "print(1)\n"})
    worktree = tmp_path / "data" / "worktrees" / "x"
    git(repo, "worktree", "add", "-q", "-b", "relay/x", str(worktree))
    return repo, worktree


def _commit(box: ToolBox, repo: Path, worktree: Path, paths: list[str], step: str = "c"):
    row, _ = box.executor.execute(
        spec_id=box.spec_id, run_id="r", step=step, effect="git.commit",
        payload={"repo": str(repo), "worktree": str(worktree), "branch": "relay/x",
                 "paths": paths, "message": "m"})
    return row.result


class TestNamesThatAreNotUtf8:
    def test_listing_and_search_show_them_escaped(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        (root / os.fsdecode(b"caf\xe9.txt")).write_text("needle\n")
        box = toolbox(root, registry)
        for name, args in (("list_files", {}), ("search_text", {"text": "needle"})):
            outcome = box.run(name, args, "c0")
            outcome.text.encode("utf-8")  # no lone surrogate: the model's API would refuse it
            assert "caf\\xe9.txt" in outcome.text, outcome.text

    def test_tool_text_never_carries_a_surrogate(self, tmp_path, registry):
        from activities.tools import clean_text

        assert clean_text("caf\udce9") == "caf\\xe9" and clean_text("ok ✓") == "ok ✓"
        assert clean_text("\ud83d").encode("utf-8")


class TestBigFiles:
    def test_search_skips_and_read_reads_only_the_head(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        (root / "small.py").write_text("needle = 1\n")
        with open(root / "big.dat", "wb") as f:  # sparse: costs the disk nothing
            f.truncate(1500 << 20)
        box = toolbox(root, registry)
        started = time.monotonic()
        outcome = box.run("search_text", {"text": "needle"}, "c0")
        assert "small.py:1: needle = 1" in outcome.text
        assert "not searched: 1 file(s) over 2 MB: big.dat" in outcome.text
        outcome = box.run("search_text", {"text": "needle", "path": "big.dat"}, "c1")
        assert "not searched" in outcome.text and "big.dat" in outcome.text
        outcome = box.run("read_file", {"path": "big.dat"}, "c2")
        assert "truncated: 1572864000 bytes" in outcome.text
        assert time.monotonic() - started < 5

    def test_a_huge_file_is_not_snapshotted_into_the_registry(self, tmp_path, registry):
        root = tmp_path / "wt"
        root.mkdir()
        with open(root / "app.py", "wb") as f:
            f.truncate(200 << 20)
        box = toolbox(root, registry)
        for name in ("write_file", "delete_file"):
            outcome = box.run(name, {"path": "app.py", "content": "print(1)\n"}, f"c-{name}")
            assert outcome.is_error and "does not copy files over 10 MB" in outcome.text
        assert (root / "app.py").stat().st_size == 200 << 20
        # the effect itself refuses too (the file may grow after the tool looked)
        with pytest.raises(GitError, match="over 10 MB"):
            box.executor.execute(spec_id=box.spec_id, run_id="r", step="w", effect="git.write_file",
                                 payload={"worktree": str(root), "path": "app.py", "content": "x"})


class TestWhatIsValidatedIsWhatIsCommitted:
    def test_no_write_into_a_nested_repository(self, tmp_path, registry):
        _, worktree = _worktree(tmp_path)
        (worktree / "pkg").mkdir()
        git(worktree / "pkg", "init", "-q")
        box = toolbox(worktree, registry)
        outcome = box.run("write_file", {"path": "pkg/mod.py", "content": "x = 1\n"}, "c0")
        assert outcome.is_error and "nested git repository" in outcome.text
        assert not (worktree / "pkg" / "mod.py").exists()

    def test_a_path_git_skips_fails_the_commit(self, tmp_path, registry):
        repo, worktree = _worktree(tmp_path)
        (worktree / "pkg").mkdir()
        (worktree / "pkg" / "mod.py").write_text("x = 1\n")
        git(worktree / "pkg", "init", "-q")  # made by a check after the write
        box = toolbox(worktree, registry)
        with pytest.raises(GitError, match="did not stage pkg/mod.py"):
            _commit(box, repo, worktree, ["pkg/mod.py"])

    def test_checks_run_on_exactly_the_commit(self, tmp_path, registry):
        repo, worktree = _worktree(tmp_path)
        (worktree / "leftover.txt").write_text("from an earlier check\n")
        (worktree / "app.py").write_text("changed by an earlier check\n")
        (worktree / "pkg").mkdir()
        git(worktree / "pkg", "init", "-q")
        box = toolbox(worktree, registry, Role.validator)
        box.workspace = box.workspace.model_copy(update={
            "check": "test ! -e leftover.txt && test ! -e pkg && grep -q 'print(1)' app.py "
                     "&& touch made-by-this-check"})
        outcome = box.run("run_checks", {}, "c0")
        assert "exit code: 0" in outcome.text, outcome.text
        assert not (worktree / "made-by-this-check").exists()  # cleaned after it too
        assert git(worktree, "status", "--porcelain", "--ignored") == ""

    def test_a_blank_check_is_no_check(self, tmp_path, registry):
        from relay.models import WorkspaceInput

        assert WorkspaceInput(check="   ").check is None
        assert WorkspaceInput(check=" make test ").check == "make test"
        root = tmp_path / "wt"
        root.mkdir()
        box = toolbox(root, registry, Role.validator)
        box.workspace = box.workspace.model_copy(update={"check": "   "})
        assert box.run("run_checks", {}, "c0").text == ("no check command is configured for "
                                                        "this workspace")


class TestLongPaths:
    @pytest.mark.parametrize("path, reason", [
        ("/".join(["a" * 200] * 25) + "/x.py", "at most 1024"),
        ("a" * 256 + ".py", "at most 255"),
        ("d/" + "é" * 128, "at most 255"),  # 256 bytes in UTF-8
    ])
    def test_too_long_is_a_tool_refusal(self, tmp_path, registry, path, reason):
        root = tmp_path / "wt"
        root.mkdir()
        outcome = toolbox(root, registry).run("write_file", {"path": path, "content": "x"}, "c0")
        assert outcome.is_error and reason in outcome.text, outcome.text
        assert os.listdir(root) == []

    def test_the_commit_turns_a_bad_path_into_a_git_error(self, tmp_path, registry):
        repo, worktree = _worktree(tmp_path)
        box = toolbox(worktree, registry)
        with pytest.raises(GitError, match="cannot be committed"):
            _commit(box, repo, worktree, ["/".join(["a" * 200] * 25) + "/x.py"])
