"""Workspace tools the agents call through the model's tool use.

The allowlist per role is enforced here, in code: a role is offered only its
tools, and a call to any other tool is refused. Every path is confined to the
worktree: absolute paths, `..`, symlinks that lead out and `.git` are refused.
A refusal is a tool error the model sees, never an exception that ends the turn.
Writes go through the effects ledger (idempotent, compensable).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from activities.checks import run_check
from activities.effects import EffectExecutor
from relay.models import Role, WorkspaceRef

MAX_READ_BYTES = 64_000
MAX_LIST = 500
MAX_MATCHES = 200

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
            return getattr(self, f"_{name}")(args, call_id)
        except ToolRefused as refusal:
            return ToolOutcome(f"refused: {refusal}", is_error=True)
        except (OSError, UnicodeDecodeError) as exc:
            return ToolOutcome(f"error: {exc}", is_error=True)

    # --- confinement ------------------------------------------------------------------

    def confine(self, raw: Any, *, allow_root: bool = False) -> tuple[Path, str]:
        """The absolute path inside the worktree for `raw`, and its relative form."""
        if not isinstance(raw, str) or (not raw.strip() and not allow_root):
            raise ToolRefused("a path is required")
        text = raw.strip() or "."
        if text.startswith(("/", "\\", "~")) or (len(text) > 1 and text[1] == ":"):
            raise ToolRefused(f"absolute paths are not allowed: {raw!r}")
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts:
            raise ToolRefused(f"'..' is not allowed in paths: {raw!r}")
        if any(part.lower() == ".git" for part in parts):  # also .GIT on case-insensitive disks
            raise ToolRefused(f"the .git directory is off limits: {raw!r}")
        if "\x00" in text:
            raise ToolRefused("paths cannot contain NUL bytes")
        root = Path(self.workspace.worktree).resolve()
        candidate = root.joinpath(*parts)
        try:
            resolved = candidate.resolve()
        except (RuntimeError, OSError, ValueError) as exc:  # symlink loops and the like
            raise ToolRefused(f"{raw!r} cannot be resolved: {exc}") from None
        if resolved != root and root not in resolved.parents:
            raise ToolRefused(f"{raw!r} leads outside the workspace (symlink)")
        if resolved == root and not allow_root:
            raise ToolRefused("the workspace root is a directory, not a file")
        relative = resolved.relative_to(root).as_posix() if resolved != root else "."
        if relative.split("/")[0].lower() == ".git":
            raise ToolRefused(f"the .git directory is off limits: {raw!r}")
        return candidate, relative

    # --- read-only ---------------------------------------------------------------------

    def _files(self, base: Path) -> list[str]:
        root = Path(self.workspace.worktree).resolve()
        found = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in (".git", "__pycache__"))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                if path.is_symlink():  # listed only if it stays inside and out of .git
                    try:
                        target = path.resolve()
                    except (RuntimeError, OSError):
                        continue
                    if root not in target.parents or target.relative_to(root).parts[0].lower() == ".git":
                        continue
                found.append(path.relative_to(root).as_posix())
        return found

    def _list_files(self, args: dict, _call_id: str) -> ToolOutcome:
        base, relative = self.confine(args.get("path", "."), allow_root=True)
        if not base.is_dir():
            raise ToolRefused(f"{relative} is not a directory")
        files = self._files(base)
        shown = files[:MAX_LIST]
        more = f"\n... and {len(files) - MAX_LIST} more" if len(files) > MAX_LIST else ""
        return ToolOutcome("\n".join(shown) + more if shown else "(no files)")

    def _read_file(self, args: dict, _call_id: str) -> ToolOutcome:
        path, relative = self.confine(args.get("path"))
        if not path.is_file():
            raise ToolRefused(f"{relative} is not a file")
        data = path.read_bytes()
        text = data[:MAX_READ_BYTES].decode("utf-8", errors="replace")
        if len(data) > MAX_READ_BYTES:
            text += f"\n... truncated: {len(data)} bytes, showing the first {MAX_READ_BYTES}"
        return ToolOutcome(text)

    def _search_text(self, args: dict, _call_id: str) -> ToolOutcome:
        needle = args.get("text")
        if not isinstance(needle, str) or not needle:
            raise ToolRefused("text to search for is required")
        base, _ = self.confine(args.get("path", "."), allow_root=True)
        root = Path(self.workspace.worktree).resolve()
        matches = []
        for relative in self._files(base) if base.is_dir() else [base.relative_to(root).as_posix()]:
            try:
                lines = (root / relative).read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            matches += [f"{relative}:{n}: {line}" for n, line in enumerate(lines, 1) if needle in line]
            if len(matches) >= MAX_MATCHES:
                break
        return ToolOutcome("\n".join(matches[:MAX_MATCHES]) or "(no matches)")

    # --- effects -------------------------------------------------------------------------

    def _effect(self, effect: str, relative: str, call_id: str, extra: dict) -> ToolOutcome:
        row, replayed = self.executor.execute(
            spec_id=self.spec_id, run_id=self.run_id, step=f"{self.step_prefix}/{call_id}",
            effect=effect, payload={"worktree": self.workspace.worktree, "path": relative, **extra})
        verb = "deleted" if effect == "git.delete_file" else "wrote"
        return ToolOutcome(f"{verb} {relative}" + (" (already done)" if replayed else ""),
                           effect_key=row.key, changed_path=relative)

    def _write_file(self, args: dict, call_id: str) -> ToolOutcome:
        _, relative = self.confine(args.get("path"))
        content = args.get("content")
        if not isinstance(content, str):
            raise ToolRefused("content must be a string")
        return self._effect("git.write_file", relative, call_id, {"content": content})

    def _delete_file(self, args: dict, call_id: str) -> ToolOutcome:
        path, relative = self.confine(args.get("path"))
        if path.is_symlink():  # delete the link itself, never what it points to
            relative = path.relative_to(Path(self.workspace.worktree).resolve()).as_posix()
        step = f"{self.step_prefix}/{call_id}"
        if not path.is_file() and not path.is_symlink() and self.executor.ledger.for_step(
                self.spec_id, step) is None:  # a replayed delete finds the file gone: that is fine
            raise ToolRefused(f"{relative} is not a file")
        return self._effect("git.delete_file", relative, call_id, {})

    def _run_checks(self, _args: dict, _call_id: str) -> ToolOutcome:
        command = self.workspace.check
        if not command:
            return ToolOutcome("no check command is configured for this workspace")
        run = run_check(command, self.workspace.worktree, self.check_timeout_s)
        return ToolOutcome(run.report(), is_error=run.exit_code is None)
