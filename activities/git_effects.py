"""The bundled git effects: branch + worktree, file writes, commits, delivery, cleanup.

Each act is an "ensure" (safe to run again), each compensation tolerates
nothing to undo. The user's checkout is only touched by `git.deliver`; every
other write happens in a separate worktree on branch `relay/<spec id>`.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from activities import safe_fs
from activities.checks import run_check
from relay.effects import EffectContext, EffectFailed, EffectRegistry, Payload

git_effects = EffectRegistry()

IDENTITY = ["-c", "user.name=relay", "-c", "user.email=relay@localhost", "-c", "commit.gpgsign=false"]
# No hook, no fsmonitor and no other configured command ever runs: a workspace (or the user's
# checkout) may carry one that model-written code planted, and relay's git runs with relay's
# rights. Keys with a fixed name are overridden here (the command line wins over every config
# file); drivers are named freely (filter.<name>.clean, merge.<name>.driver, ...), so a
# repository whose config defines one is refused instead (see `_configured_commands`).
NO_HOOKS = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false",
            "-c", "core.sshCommand=false", "-c", "core.gitProxy=", "-c", "core.askPass=",
            "-c", "core.pager=cat", "-c", "core.editor=false", "-c", "sequence.editor=false",
            "-c", "credential.helper=", "-c", "gpg.program=false", "-c", "gpg.ssh.program=false",
            "-c", "gpg.x509.program=false", "-c", "merge.verifySignatures=false",
            "-c", "diff.external=", "-c", "core.alternateRefsCommand=",
            "-c", "core.attributesFile=/dev/null", "-c", "protocol.ext.allow=never",
            "-c", "gc.auto=0", "-c", "maintenance.auto=false"]
# Drivers a .gitattributes line runs by name; defined only in config.
DRIVER_KEYS = r"^(filter\..+\.(clean|smudge|process)|merge\..+\.driver|diff\..+\.(textconv|command))$"
# Bigger files are not snapshotted into the ledger (base64 in the registry): writing over or
# deleting one is refused (a tracked file can still be restored with git).
MAX_SNAPSHOT_BYTES = 10 << 20


class GitError(EffectFailed):
    """A git command failed; its message is git's own, on one line. Retrying will not help."""

    retryable = False


@contextmanager
def inside(worktree: str, relative: str) -> Iterator[None]:
    """Touching the worktree's file `relative`, which goes through safe_fs: one component at a
    time, never following a symlink, refusing hard links and names git rejects (the checks run
    model-written code, which may have planted any of those since the tool checked). A refusal
    is a GitError: retrying does not make the path safe."""
    try:
        yield
    except safe_fs.UnsafePath as exc:
        raise GitError(f"{relative}: {exc}; it leads outside the worktree {worktree} or may, "
                       "so relay is not touching it") from None


def owned_worktree(ctx: EffectContext, worktree: str) -> Path:
    """A worktree relay may delete: directly under <data dir>/worktrees, nowhere else."""
    path = Path(worktree).resolve()
    if path.parent != (ctx.data_dir / "worktrees").resolve():
        raise GitError(f"refusing to remove {worktree}: not a relay worktree under {ctx.data_dir}")
    return path


def git_environment() -> dict[str, str]:
    """All a git call of relay's gets: no secret of the worker's, no user or system config
    (which could name a credential helper, a pager, an editor or hooks), no GIT_DIR leaking in."""
    return {"PATH": os.environ.get("PATH") or os.defpath, "HOME": "/nonexistent", "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1"}


def _configured_commands(cwd: str | Path) -> list[str]:
    """The driver commands the repository's config defines (through includes too), which a
    .gitattributes line would make relay's git run: relay refuses to work in such a repository.
    (git-lfs installed with --local is one; relay does not run filters.)"""
    found = subprocess.run(["git", "config", "--null", "--name-only", "--get-regexp", DRIVER_KEYS],
                           cwd=cwd, capture_output=True, text=True, env=git_environment(),
                           stdin=subprocess.DEVNULL, timeout=120)
    return [key for key in found.stdout.split("\0") if key] if found.returncode == 0 else []


def run_git(*args: str, cwd: str | Path) -> subprocess.CompletedProcess[str]:
    """The one way relay runs git: minimal environment, hooks and configured commands off,
    relay's identity. A repository whose config defines a filter, merge or diff driver is
    refused (GitError): a check or a hostile checkout may have planted it."""
    if drivers := _configured_commands(cwd):
        raise GitError(f"the git config of {cwd} defines {', '.join(sorted(drivers)[:5])}: "
                       "commands git would run on relay's behalf (a filter, merge or diff "
                       "driver); relay does not run them; remove them from the repository's "
                       "config (git config --unset ...) and try again")
    return subprocess.run(["git", *NO_HOOKS, *IDENTITY, *args], cwd=cwd, capture_output=True,
                          text=True, env=git_environment(), stdin=subprocess.DEVNULL, timeout=120)


def git(*args: str, cwd: str | Path, check: bool = True) -> str:
    proc = run_git(*args, cwd=cwd)
    if check and proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:400]
        raise GitError(f"git {' '.join(args[:3])} failed in {cwd}: {detail}")
    return proc.stdout.strip()


def ref_exists(repo: str, ref: str) -> bool:
    return run_git("rev-parse", "--verify", "--quiet", ref, cwd=repo).returncode == 0


def is_worktree(repo: str, path: str) -> bool:
    listed = git("worktree", "list", "--porcelain", cwd=repo)
    wanted = str(Path(path).resolve())
    return any(line == f"worktree {wanted}" for line in listed.splitlines())


def check_repository(repo: str, target: str) -> None:
    if not Path(repo).is_dir():
        raise GitError(f"workspace {repo} does not exist")
    if run_git("rev-parse", "--git-dir", cwd=repo).returncode:
        raise GitError(f"workspace {repo} is not a git repository")
    if not ref_exists(repo, f"refs/heads/{target}"):
        raise GitError(f"workspace {repo} has no branch {target!r}")


# --- branch and worktree ----------------------------------------------------------


@git_effects.effect("git.prepare_workspace", reversible=True)
def prepare_workspace(ctx: EffectContext, p: Payload) -> Payload:
    repo, target, branch, worktree = p["repo"], p["target"], p["branch"], p["worktree"]
    owned_worktree(ctx, worktree)
    if p.get("create") and not (Path(repo) / ".git").exists():
        Path(repo).mkdir(parents=True, exist_ok=True)
        git("init", "-q", "-b", target, cwd=repo)
        (Path(repo) / "README.md").write_text(f"# {ctx.spec_id}\n\nWorkspace created by relay.\n")
        git("add", "README.md", cwd=repo)
        git("commit", "-q", "-m", "Initial commit (relay workspace)", cwd=repo)
    check_repository(repo, target)
    # The branch always starts from the target: a retry of this step has made no commits yet,
    # and a branch left by an earlier run that was not rolled back must not leak into this one.
    if is_worktree(repo, worktree):
        git("checkout", "-q", "-B", branch, target, cwd=worktree)
        git("reset", "-q", "--hard", target, cwd=worktree)
        git("clean", "-q", "-fdx", cwd=worktree)
    else:
        if Path(worktree).exists():
            shutil.rmtree(worktree)
        git("worktree", "prune", cwd=repo)
        git("branch", "-f", branch, target, cwd=repo)
        Path(worktree).parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "-q", worktree, branch, cwd=repo)
    # the commit the branch was cut from: what the agents build on and the validator checks
    return {"base": git("rev-parse", f"refs/heads/{branch}", cwd=repo), "worktree": worktree}


@prepare_workspace.compensation
def remove_workspace(ctx: EffectContext, p: Payload, undo: Payload | None, result: Payload | None) -> None:
    repo, branch, worktree = p["repo"], p["branch"], p["worktree"]
    owned_worktree(ctx, worktree)
    if not Path(repo).exists():
        return
    if is_worktree(repo, worktree):
        git("worktree", "remove", "--force", worktree, cwd=repo)
    if Path(worktree).exists():
        shutil.rmtree(worktree)
    git("worktree", "prune", cwd=repo)
    if ref_exists(repo, f"refs/heads/{branch}"):
        git("branch", "-D", branch, cwd=repo)


# --- files in the worktree ----------------------------------------------------------


def _read(worktree: str, relative: str) -> Payload:
    """What a compensation needs to put the file back: its bytes, or that it was not there.
    A file over MAX_SNAPSHOT_BYTES is refused (only its head is ever read)."""
    if safe_fs.kind(worktree, relative) is None:
        return {"existed": False}
    # refuses a symlink, a hard link, a directory
    data, size = safe_fs.read_head(worktree, relative, MAX_SNAPSHOT_BYTES + 1)
    if size > MAX_SNAPSHOT_BYTES or len(data) > MAX_SNAPSHOT_BYTES:
        raise GitError(too_big_to_snapshot(relative, max(size, len(data))))
    return {"existed": True, "content_b64": base64.b64encode(data).decode()}


def too_big_to_snapshot(relative: str, size: int) -> str:
    return (f"{relative} is {size} bytes; relay keeps a copy of a file before changing it (to "
            f"undo the change) and does not copy files over {MAX_SNAPSHOT_BYTES >> 20} MB, so "
            "it is not changed")


def _restore(worktree: str, relative: str, undo: Payload | None) -> None:
    if undo is None:
        return
    if undo.get("existed"):
        # a hard link planted since is replaced, never written through (its other name keeps
        # its own content)
        safe_fs.replace_bytes(worktree, relative, base64.b64decode(undo["content_b64"]))
    elif safe_fs.kind(worktree, relative) == "file":
        safe_fs.unlink(worktree, relative, hard_links=True)


@git_effects.effect("git.write_file", reversible=True)
def write_file(ctx: EffectContext, p: Payload) -> Payload:
    if not Path(p["worktree"]).is_dir():
        raise GitError(f"the worktree {p['worktree']} is gone")
    data = p["content"].encode("utf-8")
    with inside(p["worktree"], p["path"]):
        safe_fs.write_bytes(p["worktree"], p["path"], data)
    return {"bytes": len(data)}


@write_file.snapshot
def _before_write(ctx: EffectContext, p: Payload) -> Payload:
    with inside(p["worktree"], p["path"]):
        return _read(p["worktree"], p["path"])


@write_file.compensation
def _undo_write(ctx: EffectContext, p: Payload, undo: Payload | None, result: Payload | None) -> None:
    if Path(p["worktree"]).is_dir():
        with inside(p["worktree"], p["path"]):
            _restore(p["worktree"], p["path"], undo)


@git_effects.effect("git.delete_file", reversible=True)
def delete_file(ctx: EffectContext, p: Payload) -> Payload:
    with inside(p["worktree"], p["path"]):  # a symlink is removed itself, never its target
        return {"deleted": safe_fs.unlink(p["worktree"], p["path"], nested_repos=False)}


@delete_file.snapshot
def _before_delete(ctx: EffectContext, p: Payload) -> Payload:
    worktree, relative = p["worktree"], p["path"]
    with inside(worktree, relative):
        if safe_fs.kind(worktree, relative) == "symlink":
            return {"existed": True, "symlink": safe_fs.readlink(worktree, relative)}
        return _read(worktree, relative)


@delete_file.compensation
def _undo_delete(ctx: EffectContext, p: Payload, undo: Payload | None, result: Payload | None) -> None:
    worktree, relative = p["worktree"], p["path"]
    if not Path(worktree).is_dir():
        return
    with inside(worktree, relative):
        if undo and "symlink" in undo:
            if safe_fs.kind(worktree, relative) != "symlink":
                safe_fs.symlink(worktree, relative, undo["symlink"])
            return
        _restore(worktree, relative, undo)


# --- commits ----------------------------------------------------------------------------


def _commit_with_trailer(repo_or_worktree: str, branch: str, key: str) -> str | None:
    if not ref_exists(repo_or_worktree, f"refs/heads/{branch}"):
        return None
    found = git("log", "--format=%H", f"--grep=Relay-Effect: {key}", branch, cwd=repo_or_worktree)
    return found.splitlines()[0] if found else None


@git_effects.effect("git.commit", reversible=True)
def commit(ctx: EffectContext, p: Payload) -> Payload:
    worktree, branch = p["worktree"], p["branch"]
    if existing := _commit_with_trailer(worktree, branch, ctx.key):
        return {"commit": existing, "parent": git("rev-parse", f"{existing}^", cwd=worktree)}
    parent = git("rev-parse", "HEAD", cwd=worktree)
    paths = [path for path in p["paths"] if _stageable(worktree, path)]
    if paths:  # literal: a file named ':(exclude)x' is a file, not a pathspec
        git("--literal-pathspecs", "add", "-A", "-f", "--", *paths, cwd=worktree)
        _verify_staged(worktree, paths)
    if run_git("diff", "--cached", "--quiet", cwd=worktree).returncode == 0:
        return {"commit": None, "parent": parent}
    git("commit", "-q", "--no-verify", "-m", f"{p['message']}\n\nRelay-Effect: {ctx.key}",
        cwd=worktree)
    return {"commit": git("rev-parse", "HEAD", cwd=worktree), "parent": parent}


def _present(worktree: str, path: str) -> bool:
    try:
        os.lstat(Path(worktree) / path)
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:  # a name too long, a NUL, a loop: never a raw OSError
        raise GitError(f"{str(path)[:200]!r} cannot be committed: {exc}") from None


def _stageable(worktree: str, path: str) -> bool:
    """A path to stage: present now, or tracked (so its deletion is staged)."""
    if _present(worktree, path):
        return True
    return run_git("--literal-pathspecs", "ls-files", "--error-unmatch", "--", path,
                   cwd=worktree).returncode == 0


def _verify_staged(worktree: str, paths: list[str]) -> None:
    """Every path written is in the index now, every path deleted is not: otherwise git
    silently skipped it (a nested repository a check made, say) and the commit would not be
    what the agents wrote."""
    listed = run_git("--literal-pathspecs", "ls-files", "-z", "--cached", "--", *paths,
                     cwd=worktree)
    if listed.returncode:
        raise GitError(f"git ls-files failed in {worktree}: {' '.join(listed.stderr.split())[:400]}")
    indexed = set(listed.stdout.split("\0"))
    wrong = [path for path in paths if (path in indexed) != _present(worktree, path)]
    if wrong:
        run_git("--literal-pathspecs", "reset", "-q", "--", *paths, cwd=worktree)  # unstaged again
        raise GitError(f"git did not stage {', '.join(w[:200] for w in wrong[:5])} (a nested "
                       "git repository or an ignored parent in the way?); the commit would not "
                       "hold what was written, so nothing was committed")


def clean_worktree(worktree: str) -> None:
    """Put the worktree back at its HEAD, exactly: what a check then runs on is what is
    committed (a previous check's leftovers, nested repositories included, are removed).
    Only while everything the agents wrote is committed (the validator's turn)."""
    git("reset", "-q", "--hard", "HEAD", cwd=worktree)
    git("clean", "-q", "-ffdx", cwd=worktree)


@commit.compensation
def _undo_commit(ctx: EffectContext, p: Payload, undo: Payload | None, result: Payload | None) -> None:
    worktree, branch, repo = p["worktree"], p["branch"], p["repo"]
    where = worktree if Path(worktree).is_dir() else repo
    if not Path(where).is_dir():
        return
    sha = (result or {}).get("commit") or _commit_with_trailer(where, branch, ctx.key)
    if not sha or not ref_exists(where, f"refs/heads/{branch}"):
        return
    head = git("rev-parse", f"refs/heads/{branch}", cwd=where)
    is_ancestor = run_git("merge-base", "--is-ancestor", sha, head, cwd=where).returncode == 0
    if not is_ancestor:
        return
    parent = git("rev-parse", f"{sha}^", cwd=where)
    if where == worktree:
        git("reset", "-q", "--hard", parent, cwd=worktree)
    else:
        git("update-ref", f"refs/heads/{branch}", parent, cwd=repo)


# --- delivery: the irreversible step -------------------------------------------------------


@git_effects.effect("git.deliver", reversible=False)
def deliver(ctx: EffectContext, p: Payload) -> Payload:
    """Merge the branch into the target. If the target moved since the branch was cut from
    `base`, what the validator checked is not what would land: the merge is built aside and
    the check command re-run on it first, and a failing merge is not delivered.

    With `commit` (the commit the validator checked), exactly that commit is merged, and a
    branch that moved since (another process committed to it) is refused: what lands is
    always what was validated. Without it (runs started before it existed), the branch head."""
    repo, branch, target = p["repo"], p["branch"], p["target"]
    head = git("rev-parse", f"refs/heads/{branch}", cwd=repo)
    if validated := p.get("commit"):
        validated = git("rev-parse", "--verify", "--quiet", f"{validated}^{{commit}}", cwd=repo,
                        check=False) if re.fullmatch(r"[0-9a-f]{7,64}", str(validated)) else ""
        if validated and _delivered(repo, validated, target):  # a retry after it landed
            return {"target": target, "commit": git("rev-parse", target, cwd=repo),
                    "merged": validated}
        if head != validated:
            raise DeliveryRefused(
                f"{branch} moved since validation ({str(p['commit'])[:10]} was validated, the "
                f"branch is at {head[:10]}; another process committed to it); nothing was "
                f"merged; run 'relay iterate {ctx.spec_id}' to validate it again")
    if _delivered(repo, head, target):
        return {"target": target, "commit": git("rev-parse", target, cwd=repo), "merged": head}
    message = f"relay: deliver {ctx.spec_id}"
    checked_out = git("symbolic-ref", "--quiet", "--short", "HEAD", cwd=repo, check=False)
    if checked_out == target:  # the user's checkout moves with the merge: it must be clean
        merge_head = Path(repo) / git("rev-parse", "--git-path", "MERGE_HEAD", cwd=repo)
        if merge_head.exists():
            raise GitError(f"a merge is in progress in {repo}; finish or abort it first")
        if git("status", "--porcelain", "--untracked-files=no", cwd=repo):
            raise GitError(f"the checkout {repo} has uncommitted changes on {target}; commit or "
                           "stash them first")
    old = git("rev-parse", f"refs/heads/{target}", cwd=repo)
    moved = bool(p.get("base")) and old != p["base"]
    result: Payload = {"target": target, "merged": head}
    if moved:
        result["target_moved"] = True
    if checked_out == target and not moved:  # what was validated lands as it is
        try:
            git("merge", "--no-ff", "--no-verify", "-q", "-m", message, head, cwd=repo)
        except GitError:
            git("merge", "--abort", cwd=repo, check=False)  # ours: none was in progress before
            raise
        return {**result, "commit": git("rev-parse", target, cwd=repo)}

    merged, recheck = _merge_aside(ctx, p, head, old, moved, message)
    if recheck is not None:
        result["recheck"] = recheck
    try:  # move the target only if nobody moved it meanwhile
        if checked_out == target:
            git("merge", "--ff-only", "-q", merged, cwd=repo)
        else:
            git("update-ref", f"refs/heads/{target}", merged, old, cwd=repo)
    except GitError:
        if _delivered(repo, head, target):  # a concurrent attempt landed it
            pass
        elif git("rev-parse", f"refs/heads/{target}", cwd=repo) != old:
            raise EffectFailed(f"{target} moved again while the merge was being built; "
                               "building it again") from None
        else:
            raise  # git's own reason, e.g. untracked files the merge would overwrite
    return {**result, "commit": git("rev-parse", target, cwd=repo)}


def _delivered(repo: str, head: str, target: str) -> bool:
    return run_git("merge-base", "--is-ancestor", head, target, cwd=repo).returncode == 0


def _merge_aside(ctx: EffectContext, p: Payload, head: str, old: str, moved: bool,
                 message: str) -> tuple[str, Payload | None]:
    """The merge of `head` (the branch's validated commit) into `old`, made in a scratch
    worktree (re-checked there, in the sandbox, if the target moved); returns its commit and
    the re-check's record."""
    repo, target = p["repo"], p["target"]
    scratch = str(ctx.data_dir / "deliver" / ctx.key)
    if is_worktree(repo, scratch):
        git("worktree", "remove", "--force", scratch, cwd=repo)
    if Path(scratch).exists():
        shutil.rmtree(scratch)
    git("worktree", "prune", cwd=repo)
    git("worktree", "add", "-q", "--detach", scratch, old, cwd=repo)
    try:
        try:
            git("merge", "--no-ff", "--no-verify", "-q", "-m", message, head, cwd=scratch)
        except GitError as err:
            if not moved:
                raise
            raise GitError(f"{target} moved since the change was built and no longer merges "
                           f"cleanly ({err}); run 'relay iterate {ctx.spec_id}' to rebuild it "
                           "on the new target") from None
        if not (moved and p.get("check")):
            return git("rev-parse", "HEAD", cwd=scratch), None
        run = run_check(p["check"], scratch, float(p.get("check_timeout_s") or 300),
                        data_dir=ctx.data_dir)
        if run.refused:  # no sandbox here: nothing ran, nothing was merged
            raise DeliveryRefused(f"{target} moved since validation and the merged result must "
                                  f"be checked again, but {run.refused}; nothing was merged")
        if not run.passed:
            raise DeliveryRefused(
                f"{target} moved since validation ({p['base'][:10]} -> {old[:10]}) and the "
                f"merged result fails its check: {run.report().splitlines()[1]}; "
                f"{_last_line(run.output)}; nothing was merged; run 'relay iterate "
                f"{ctx.spec_id}' to rebuild it on the new target")
        record: Payload = {"base": p["base"], "target_was": old, "command": run.command,
                           "exit_code": run.exit_code}
        if run.unsandboxed:
            record["unsandboxed"] = True
        return git("rev-parse", "HEAD", cwd=scratch), record
    finally:
        git("worktree", "remove", "--force", scratch, cwd=repo, check=False)


class DeliveryRefused(EffectFailed):
    """The merged result did not pass the checks; delivering it would land untested code."""

    retryable = False


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


@git_effects.effect("git.cleanup", reversible=False)
def cleanup(ctx: EffectContext, p: Payload) -> Payload:
    """After delivery: the worktree and the merged branch are no longer needed."""
    remove_workspace(ctx, p, None, None)
    return {"removed": p["worktree"]}
