"""Workspace tools the agents call through the model's tool use.

The allowlist per role is enforced here, in code: a role is offered only its
tools, and a call to any other tool is refused. Every path is confined to the
worktree: absolute paths, `..`, `.git` (and every name git would refuse),
symlinks and hard-linked files are refused. Files are only ever touched through
`safe_fs` (directory descriptors, never following a symlink), because the checks
run model-written code that may swap a directory for a symlink at any moment.
Every error inside a tool, a refusal or a failed effect alike, is a tool error
the model sees, never an exception that ends the turn; only a registry outage
is raised, so the turn is retried and replays its recorded tool calls.
Writes go through the effects ledger (idempotent, compensable).

Bounded: read_file reads only the head of a file, search_text skips (and names) files over
MAX_SEARCH_BYTES, a file over MAX_SNAPSHOT_BYTES is not overwritten or deleted (its snapshot
would go into the registry), a path under a nested git repository is refused (git would not
commit it), and every text for the model is valid UTF-8 (a file name that is not is shown with
its bytes escaped). The validator's run_checks resets and cleans its worktree to the commit
before and after the check, so what it checks is exactly what is committed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from activities import safe_fs
from activities.checks import run_check
from activities.git_effects import MAX_SNAPSHOT_BYTES, clean_worktree, too_big_to_snapshot
from activities.effects import EffectExecutor
from relay import registry as _registry
from relay import one_line
from relay.models import Role, WorkspaceRef

MAX_READ_BYTES = 64_000
MAX_LIST = 500
MAX_MATCHES = 200
MAX_SEARCH_BYTES = 2 << 20  # bigger files are skipped by search_text (and it says so)

READ_ONLY = ("list_files", "read_file", "search_text")
ROLE_TOOLS: dict[Role, tuple[str, ...]] = {
    Role.clarifier: READ_ONLY,
    Role.planner: READ_ONLY,
    Role.auditor: READ_ONLY,
    Role.constructor: (*READ_ONLY, "write_file", "delete_file"),
    Role.validator: (*READ_ONLY, "run_checks"),
}

_PATH = {"type": "string", "description": "Path relative to the workspace root"}
TOOL_SCHEMAS: dict[str, dict[str, Any]] = {
    "list_files": {"description": "List the files under a directory of the workspace.",
                   "input_schema": {"type": "object", "properties": {"path": _PATH}}},
    "read_file": {"description": "Read a text file of the workspace.",
                  "input_schema": {"type": "object", "properties": {"path": _PATH},
                                   "required": ["path"]}},
    "search_text": {"description": "Find lines containing a text in the workspace's files.",
                    "input_schema": {"type": "object", "properties": {
                        "text": {"type": "string"}, "path": _PATH}, "required": ["text"]}},
    "write_file": {"description": "Create or replace a file of the workspace with this content.",
                   "input_schema": {"type": "object", "properties": {
                       "path": _PATH, "content": {"type": "string"}}, "required": ["path", "content"]}},
    "delete_file": {"description": "Delete a file of the workspace.",
                    "input_schema": {"type": "object", "properties": {"path": _PATH},
                                     "required": ["path"]}},
    "run_checks": {"description": "Run the workspace's configured check command (e.g. the tests).",
                   "input_schema": {"type": "object", "properties": {}}},
}


# Not the tool's failure but the registry's: raised, so the turn is retried once it is back
# (telling the model "the database is down" would only make it try something else).
_OUTAGES: tuple[type[BaseException], ...] = (
    SQLAlchemyError, *([_registry.RegistryUnavailable] if hasattr(_registry, "RegistryUnavailable")
                       else []))


def tool_definitions(role: Role) -> list[dict[str, Any]]:
    return [{"name": name, **TOOL_SCHEMAS[name]} for name in ROLE_TOOLS[role]]


class ToolRefused(Exception):
    """A tool call that is not allowed; the message goes back to the model."""


@dataclass
class ToolOutcome:
    text: str
    is_error: bool = False
    effect_key: str | None = None
    changed_path: str | None = None
    unsandboxed: bool = False  # run_checks ran the workspace's code without a sandbox (opt-out)


@dataclass
class ToolBox:
    """The tools of one agent turn, bound to its workspace and its ledger step prefix."""

    role: Role
    workspace: WorkspaceRef
    executor: EffectExecutor
    spec_id: str
    run_id: str
    step_prefix: str
    check_timeout_s: float = 300
    calls: int = field(default=0)

    def run(self, name: str, args: Any, call_id: str) -> ToolOutcome:
        self.calls += 1
        try:
            if name not in ROLE_TOOLS[self.role]:
                raise ToolRefused(f"tool {name!r} is not allowed for the {self.role.value}; "
                                  f"allowed: {', '.join(ROLE_TOOLS[self.role])}")
            if not isinstance(args, dict):
                raise ToolRefused("tool input must be a JSON object")
            outcome = getattr(self, f"_{name}")(args, call_id)
            outcome.text = clean_text(outcome.text)  # never a lone surrogate to the model
            return outcome
        except (ToolRefused, safe_fs.UnsafePath) as refusal:
            return ToolOutcome(f"refused: {clean_text(_line(refusal))}", is_error=True)
        except _OUTAGES:
            raise
        except Exception as exc:  # GitError, EffectFailed, EffectConflict, OSError, ...: the
            # model sees it and may try another way; a failed effect is recorded failed in the
            # ledger by the executor already (and compensated with the rest if the spec fails)
            return ToolOutcome(f"error: {clean_text(_line(exc))}", is_error=True)

    # --- confinement ------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self.workspace.worktree

    def confine(self, raw: Any, *, allow_root: bool = False,
                follow_leaf: bool = True) -> tuple[Path, str]:
        """The path inside the worktree for `raw`, and its relative form (lexical: no symlink
        is ever followed on the way, so the relative form is where the tools act).

        Checked here with friendly reasons, before anything is touched: names git refuses, and
        symlinks that lead out or into .git. This is only a first look; the checks may change
        the tree at any time, and safe_fs enforces confinement where files are opened."""
        if not isinstance(raw, str) or (not raw.strip() and not allow_root):
            raise ToolRefused("a path is required")
        text = raw.strip() or "."
        if "\x00" in text:
            raise ToolRefused("paths cannot contain NUL bytes")
        if text.startswith(("/", "\\", "~")) or (len(text) > 1 and text[1] == ":"):
            raise ToolRefused(f"absolute paths are not allowed: {raw!r}")
        while text.startswith("./"):  # "./src/app.py" is common and unambiguous
            text = text[2:].lstrip("/") or "."
        if allow_root:  # a directory may be written "src/"
            text = text.rstrip("/") or "."
        root = Path(self.root).resolve()
        if text == ".":
            if not allow_root:
                raise ToolRefused("the workspace root is a directory, not a file")
            return root, "."
        try:
            components = safe_fs.parts(text)
        except safe_fs.UnsafePath as exc:
            raise ToolRefused(str(exc)) from None
        candidate = root.joinpath(*components)
        try:  # a delete acts on a symlink itself: only the directories above it are resolved
            resolved = (candidate.resolve() if follow_leaf
                        else candidate.parent.resolve() / candidate.name)
        except (RuntimeError, OSError, ValueError) as exc:  # symlink loops and the like
            raise ToolRefused(f"{raw!r} cannot be resolved: {exc}") from None
        if resolved != root and root not in resolved.parents:
            raise ToolRefused(f"{raw!r} leads outside the workspace (symlink)")
        if resolved == root and not allow_root:
            raise ToolRefused("the workspace root is a directory, not a file")
        if resolved != root and safe_fs.is_dotgit(resolved.relative_to(root).parts[0]):
            raise ToolRefused(f"the .git directory is off limits: {raw!r}")
        return candidate, "/".join(components)

    # --- read-only ---------------------------------------------------------------------

    def _walk(self, relative: str) -> Iterator[tuple[str, int, str, os.stat_result]]:
        """(relative path, its directory's descriptor, its name, its lstat) of every file under
        the directory `relative`, without .git (a worktree's .git is a file) or caches, and
        without symlinks that lead out, into .git or to a directory."""
        if relative != "." and (kind := safe_fs.kind(self.root, relative)) != "directory":
            raise ToolRefused(f"{relative} does not exist" if kind is None
                              else f"{relative} is not a directory")
        root = Path(self.root).resolve()
        components = [] if relative == "." else relative.split("/")
        prefix = "" if relative == "." else relative + "/"
        for below, dir_fd, name, st in safe_fs.files(self.root, components, _enter):
            path = prefix + below
            if safe_fs.is_dotgit(name):
                continue
            if stat.S_ISLNK(st.st_mode) and not _leads_inside(root, root / path):
                continue
            yield path, dir_fd, name, st

    def _list_files(self, args: dict, _call_id: str) -> ToolOutcome:
        _, relative = self.confine(args.get("path", "."), allow_root=True)
        files = [shown_name(path) for path, *_ in self._walk(relative)]
        shown = files[:MAX_LIST]
        more = f"\n... and {len(files) - MAX_LIST} more" if len(files) > MAX_LIST else ""
        return ToolOutcome("\n".join(shown) + more if shown else "(no files)")

    def _read_file(self, args: dict, _call_id: str) -> ToolOutcome:
        _, relative = self.confine(args.get("path"))
        try:
            data, size = safe_fs.read_head(self.root, relative, MAX_READ_BYTES)
        except FileNotFoundError:
            raise ToolRefused(f"{relative} does not exist") from None
        text = data.decode("utf-8", errors="replace")
        if size > MAX_READ_BYTES:
            text += f"\n... truncated: {size} bytes, showing the first {MAX_READ_BYTES}"
        return ToolOutcome(text)

    def _search_text(self, args: dict, _call_id: str) -> ToolOutcome:
        needle = args.get("text")
        if not isinstance(needle, str) or not needle:
            raise ToolRefused("text to search for is required")
        _, relative = self.confine(args.get("path", "."), allow_root=True)
        matches: list[str] = []
        skipped: list[str] = []
        with closing(self._contents(relative, skipped)) as contents:
            for path, data in contents:
                try:
                    lines = data.decode("utf-8").splitlines()
                except UnicodeDecodeError:
                    continue
                matches += [f"{shown_name(path)}:{n}: {line}" for n, line in enumerate(lines, 1)
                            if needle in line]
                if len(matches) >= MAX_MATCHES:
                    break
        text = "\n".join(matches[:MAX_MATCHES]) or "(no matches)"
        if skipped:
            text += (f"\n(not searched: {len(skipped)} file(s) over {MAX_SEARCH_BYTES >> 20} MB: "
                     f"{', '.join(shown_name(p) for p in skipped[:10])}"
                     f"{', ...' if len(skipped) > 10 else ''})")
        return ToolOutcome(text)

    def _contents(self, relative: str, skipped: list[str]) -> Iterator[tuple[str, bytes]]:
        """The files to search: the one named, or the regular files under a directory (a
        symlink or a hard-linked file may show a file outside the worktree: skipped). Files
        over MAX_SEARCH_BYTES are not read: their paths go to `skipped`."""
        kind = "directory" if relative == "." else safe_fs.kind(self.root, relative)
        if kind is None:
            raise ToolRefused(f"{relative} does not exist")
        if kind != "directory":
            data, size = safe_fs.read_head(self.root, relative, MAX_SEARCH_BYTES + 1)
            if size > MAX_SEARCH_BYTES or len(data) > MAX_SEARCH_BYTES:
                skipped.append(relative)
                return
            yield relative, data
            return
        for path, dir_fd, name, st in self._walk(relative):
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                if st.st_size > MAX_SEARCH_BYTES:
                    skipped.append(path)
                    continue
                try:
                    data = safe_fs.read_at(dir_fd, name, MAX_SEARCH_BYTES)
                except safe_fs.TooLarge:  # grown since it was listed
                    skipped.append(path)
                    continue
                if data is not None:
                    yield path, data

    # --- effects -------------------------------------------------------------------------

    def _effect(self, effect: str, relative: str, call_id: str, extra: dict) -> ToolOutcome:
        row, replayed = self.executor.execute(
            spec_id=self.spec_id, run_id=self.run_id, step=f"{self.step_prefix}/{call_id}",
            effect=effect, payload={"worktree": self.workspace.worktree, "path": relative, **extra})
        verb = "deleted" if effect == "git.delete_file" else "wrote"
        return ToolOutcome(f"{verb} {relative}" + (" (already done)" if replayed else ""),
                           effect_key=row.key, changed_path=relative)

    def _replay(self, call_id: str) -> bool:
        """A call the ledger has seen already (a retried turn): its effect decides, not the
        state of the tree now."""
        return self.executor.ledger.for_step(self.spec_id, f"{self.step_prefix}/{call_id}") is not None

    def _write_file(self, args: dict, call_id: str) -> ToolOutcome:
        _, relative = self.confine(args.get("path"))
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolRefused("content must be a string")
        if not self._replay(call_id):  # refused with the tool's words before any effect exists
            safe_fs.refuse_nested_repos(self.root, relative)
            st = safe_fs.lstat(self.root, relative)
            if st is not None:
                safe_fs.refuse_leaf(st, relative)
                _refuse_big(st, relative)
        return self._effect("git.write_file", relative, call_id, {"content": content})

    def _delete_file(self, args: dict, call_id: str) -> ToolOutcome:
        _, relative = self.confine(args.get("path"), follow_leaf=False)
        if not self._replay(call_id):  # a replayed delete finds the file gone: that is fine
            st = safe_fs.lstat(self.root, relative)
            if st is None:
                raise ToolRefused(f"{relative} does not exist")
            safe_fs.refuse_leaf(st, relative, symlink_ok=True)  # the link itself, never its target
            safe_fs.refuse_nested_repos(self.root, relative)
            _refuse_big(st, relative)
        return self._effect("git.delete_file", relative, call_id, {})

    def _run_checks(self, _args: dict, _call_id: str) -> ToolOutcome:
        command = self.workspace.check
        if not isinstance(command, str) or not command.strip():
            return ToolOutcome("no check command is configured for this workspace")
        # The validator checks what is committed, exactly: everything the constructor wrote
        # was committed before this turn, so a previous check's leftovers (a nested
        # repository, a changed tracked file) are removed before the check and after it.
        clean = _is_git_worktree(self.workspace.worktree)
        if clean:
            clean_worktree(self.workspace.worktree)
        try:
            run = run_check(command, self.workspace.worktree, self.check_timeout_s)
        finally:
            if clean:
                clean_worktree(self.workspace.worktree)
        # getattr: older CheckRuns know nothing of sandboxes
        refused = getattr(run, "refused", None)
        text = run.report()
        if isinstance(refused, str) and refused not in text:
            text = f"not run: {refused}\n{text}"
        return ToolOutcome(text, is_error=run.exit_code is None or bool(refused),
                           unsandboxed=not refused and not getattr(run, "sandboxed", True))


def clean_text(text: str) -> str:
    """`text` as valid UTF-8 for the model's API and the registry: bytes that were not UTF-8
    (surrogate-escaped, as in a file name) shown as \\xNN, any other lone surrogate escaped."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def shown_name(path: str) -> str:
    """A file name as the model sees it: a name that is not UTF-8 with its bytes escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _refuse_big(st: os.stat_result, relative: str) -> None:
    if stat.S_ISREG(st.st_mode) and st.st_size > MAX_SNAPSHOT_BYTES:
        raise ToolRefused(too_big_to_snapshot(relative, st.st_size))


def _is_git_worktree(path: str) -> bool:
    """A linked worktree (its `.git` is a file), as relay makes for every spec."""
    return os.path.isfile(os.path.join(path, ".git")) and not os.path.islink(os.path.join(path, ".git"))


def _line(exc: BaseException) -> str:
    """An error on one line, as the model sees it."""
    return one_line(exc) or type(exc).__name__


def _enter(directory: str) -> bool:
    return not safe_fs.is_dotgit(directory) and directory != "__pycache__"


def _leads_inside(root: Path, link: Path) -> bool:
    """Whether a symlink's target stays in the worktree and out of .git (for listing only:
    reads never follow it)."""
    try:
        target = link.resolve()
    except (RuntimeError, OSError):
        return False
    return (root in target.parents and not target.is_dir()
            and not safe_fs.is_dotgit(target.relative_to(root).parts[0]))
