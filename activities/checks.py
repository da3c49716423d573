"""Running a workspace's check command: in the sandbox, bounded in time and output.

The command runs code the model wrote, so it runs in `activities.sandbox` (bubblewrap): no
network, no view of relay's data, other worktrees, HOME or the worker's environment, only its
worktree writable. Without a working sandbox the check is refused (a CheckRun that says why,
never an exception) unless the operator opted out with RELAY_UNSANDBOXED_CHECKS=1; such a run
is marked `sandboxed=False`.

The validator's `run_checks` tool and delivery's re-check of a merge both run checks here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from activities import sandbox

MAX_CHECK_OUTPUT = 12_000
REFUSED_EXIT = 126  # the shell's "cannot execute": the command never ran


@dataclass(frozen=True)
class CheckRun:
    command: str
    exit_code: int | None  # None: killed at its timeout
    output: str  # the tail, capped
    timeout_s: float
    sandboxed: bool = True  # False: ran unsandboxed (the operator's opt-out) or refused
    refused: str | None = None  # why it did not run at all (no sandbox and no opt-out)

    @property
    def unsandboxed(self) -> bool:
        """It ran, outside the sandbox: what a spec's status must show."""
        return not self.sandboxed and self.refused is None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and self.refused is None

    def report(self) -> str:
        if self.refused:
            return f"$ {self.command}\nnot run: {self.refused}"
        status = (f"timed out after {self.timeout_s:g}s" if self.exit_code is None
                  else f"exit code: {self.exit_code}")
        note = "" if self.sandboxed else " (unsandboxed)"
        return f"$ {self.command}\n{status}{note}\n{self.output}"


def run_check(command: str, cwd: str | Path, timeout_s: float, *,
              data_dir: str | Path | None = None, writable: Sequence[str | Path] = (),
              pass_env: Iterable[str] = ()) -> CheckRun:
    """Run `command` in the worktree `cwd`. `data_dir` is relay's data dir (hidden from the
    command; derived from `cwd` when it is a relay worktree), `writable` are further dirs the
    command may write, `pass_env` names of the worker's environment variables it may see."""
    if sandbox.sandbox_problem() is None:
        done = sandbox.run_sandboxed(command, cwd, timeout_s, hidden=hidden_dirs(cwd, data_dir),
                                     writable=[Path(w) for w in writable], pass_env=pass_env)
    elif sandbox.unsandboxed_allowed():
        done = sandbox.run_unsandboxed(command, cwd, timeout_s, pass_env=pass_env)
    else:
        return CheckRun(command, REFUSED_EXIT, "", timeout_s, sandboxed=False,
                        refused=f"{sandbox.NO_SANDBOX} ({sandbox.sandbox_problem()})")
    return CheckRun(command, done.exit_code, _tail(done.output, done.cut), timeout_s,
                    sandboxed=done.sandboxed)


# directories a registry file may sit in that cannot be hidden whole (the sandbox needs them):
# the file itself (and its journal) is hidden instead
_SYSTEM_DIRS = tuple(Path(p) for p in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32",
                                       "/lib64", "/libx32", "/proc", "/dev", "/sys"))


def hidden_dirs(cwd: str | Path, data_dir: str | Path | None) -> list[Path]:
    """relay's data dirs, wherever they may be: the given one, the one a relay worktree or a
    delivery scratch dir lives in (<data dir>/worktrees/<spec>, <data dir>/deliver/<key>), the
    configured one (RELAY_DATA_DIR) and the default `.relay` of the worker's cwd; and a SQLite
    registry's directory (RELAY_DATABASE_URL), wherever it is (its file and journal only, if
    that directory is / or a system directory the sandbox needs)."""
    found = [Path(data_dir)] if data_dir else []
    parent = Path(cwd).resolve().parent
    if parent.name in ("worktrees", "deliver"):
        found.append(parent.parent)
    if configured := os.environ.get("RELAY_DATA_DIR"):
        found.append(Path(configured))
    found.append(Path.cwd() / ".relay")
    found += sqlite_registry_paths(os.environ.get("RELAY_DATABASE_URL", ""))
    return found


def sqlite_registry_paths(url: str) -> list[Path]:
    """What to hide of a SQLite registry URL: its directory, or its files if that directory
    cannot be hidden; nothing for another database (its server is out of reach: no network)."""
    url = url.strip()
    if not url.lower().startswith("sqlite"):
        return []
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database or ""
    except Exception:  # noqa: BLE001 - an invalid URL: hide what its path part names
        database = url.split("///", 1)[-1] if "///" in url else ""
    database = database.removeprefix("file:").split("?", 1)[0]
    if not database or database == ":memory:":
        return []
    db = Path(database).expanduser()
    db = (db if db.is_absolute() else Path.cwd() / db).resolve()
    directory = db.parent  # (the interpreter, the worktree and the git dir are bound back)
    if len(directory.parts) < 3 or any(directory == s or s in directory.parents
                                       for s in _SYSTEM_DIRS):
        return [db.with_name(db.name + suffix) for suffix in ("", "-journal", "-wal", "-shm")]
    return [directory]


def _tail(raw: bytes, cut_bytes: int = 0) -> str:
    text = raw.decode("utf-8", errors="replace")
    cut = len(text) - MAX_CHECK_OUTPUT if len(text) > MAX_CHECK_OUTPUT else 0
    if cut or cut_bytes:
        what = f"{cut} characters" + (f" and {cut_bytes} bytes" if cut_bytes else "")
        return f"... ({what} cut)\n" + text[-MAX_CHECK_OUTPUT:]
    return text
