"""Running model-written code (a workspace's check command) inside a bubblewrap sandbox.

The command sees a read-only system and nothing of relay: no network (its own network
namespace), a fresh pid namespace (so /proc shows no worker ancestor and nothing outlives the
run), tmpfs over /tmp, /var/tmp, /run, the worker's HOME and relay's data dirs (the registry and
every other worktree live there), then only its own worktree bound back writable and the
repository's git common dir bound back read-only (so `git status` and `git diff` work, but
nothing can be committed, moved or planted, hooks included). Its environment is built from an
allowlist, never from the worker's environment minus a deny-list.

Settings, read from the worker's environment:
  RELAY_BWRAP=/path/to/bwrap      the bubblewrap binary (default: `bwrap` on PATH)
  RELAY_UNSANDBOXED_CHECKS=1      run checks WITHOUT a sandbox when none works here (own
                                  session, allowlisted environment, a throwaway HOME; nothing
                                  more). Every such run is marked unsandboxed. Without this
                                  opt-out, relay refuses to run checks when no sandbox works.

Whether a sandbox works is probed once per process (and bwrap binary) by running `true` in
exactly the sandbox a check gets, so a kernel or container that forbids one of its namespaces or
mounts is found before any model-written code would run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

BWRAP_ENV = "RELAY_BWRAP"
UNSANDBOXED_ENV = "RELAY_UNSANDBOXED_CHECKS"
NO_SANDBOX = ("checks run model-written code and need a sandbox: install bubblewrap "
              "(apt-get install bubblewrap) or set RELAY_UNSANDBOXED_CHECKS=1 to run them "
              "unsandboxed")

SANDBOX_HOME = "/tmp/home"  # inside the sandbox's own /tmp: empty, writable, gone afterwards
# hidden in every sandbox: shared scratch space and runtime sockets (a database's or docker's
# unix socket is reachable through a read-only mount, and the network namespace does not cover it)
ALWAYS_HIDDEN = ("/tmp", "/var/tmp", "/run", "/var/run", "/dev/shm")
KEEP_OUTPUT = 64_000  # bytes of output kept while reading (the tail); the caller cuts further

_probed: dict[str, str | None] = {}
_probe_lock = threading.Lock()


@dataclass(frozen=True)
class Finished:
    exit_code: int | None  # None: killed at its timeout
    output: bytes  # the tail, at most KEEP_OUTPUT bytes
    cut: int  # bytes of output dropped before the tail
    sandboxed: bool


def unsandboxed_allowed() -> bool:
    return os.environ.get(UNSANDBOXED_ENV, "").strip().lower() in ("1", "true", "yes")


def bwrap_binary() -> str | None:
    configured = os.environ.get(BWRAP_ENV, "").strip()
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    return shutil.which("bwrap")


def sandbox_problem() -> str | None:
    """None when a working sandbox exists here, else why not (one line)."""
    binary = bwrap_binary()
    if binary is None:
        where = os.environ.get(BWRAP_ENV, "").strip() or "bwrap on PATH"
        return f"no bubblewrap binary ({where})"
    with _probe_lock:
        if binary not in _probed:
            _probed[binary] = _probe(binary)
        return _probed[binary]


def _probe(binary: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="relay-sandbox-probe-") as scratch:
        argv = [binary, *sandbox_args(Path(scratch), hidden=(), env={"PATH": os.defpath}), "true"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{binary} does not run: {exc}"
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:300] or f"exit {proc.returncode}"
        return f"{binary} cannot build the sandbox here: {detail}"
    return None


def environment(pass_env: Iterable[str], home: str, tmp: str | None) -> dict[str, str]:
    """The allowlist: what a check gets, and nothing of the worker's secrets."""
    env = {
        # the worker's interpreter first, so `python` is the one relay runs with
        "PATH": os.pathsep.join(dict.fromkeys([
            str(Path(sys.executable).parent),
            *(os.environ.get("PATH") or os.defpath).split(os.pathsep)])),
        "LANG": os.environ.get("LANG") or "C.UTF-8",
        "LC_ALL": os.environ.get("LC_ALL") or os.environ.get("LANG") or "C.UTF-8",
        "HOME": home,
        "PYTHONDONTWRITEBYTECODE": "1",
        "GIT_OPTIONAL_LOCKS": "0",  # `git status` must not try to write the read-only index
    }
    if tmp:
        env["TMPDIR"] = tmp
    for name in pass_env:  # named explicitly by the workspace's settings
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def git_common_dir(workdir: Path) -> Path | None:
    from activities.git_effects import run_git  # late: git_effects runs checks itself

    proc = run_git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=workdir)
    found = proc.stdout.strip() if proc.returncode == 0 else ""
    return Path(found).resolve() if found else None


def _under(path: Path, dirs: Iterable[Path]) -> bool:
    return any(path == d or d in path.parents for d in dirs)


def sandbox_args(workdir: Path, *, hidden: Iterable[str | Path], env: dict[str, str],
                 writable: Sequence[Path] = ()) -> list[str]:
    """bwrap's options for running in `workdir` (writable, as are `writable`)."""
    workdir = workdir.resolve()
    if workdir == Path("/"):  # binding it writable would make the whole system writable
        raise ValueError("a check cannot run in /")
    args = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--hostname", "relay-sandbox", "--die-with-parent", "--new-session", "--clearenv",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    candidates = {Path(p).resolve() for p in (*ALWAYS_HIDDEN, os.environ.get("HOME") or "", *hidden)
                  if str(p) and Path(p).is_dir()}
    candidates.discard(Path("/"))
    # shallowest first, and one under another is already hidden (a later, shallower tmpfs
    # would bury a deeper one)
    hide = sorted((d for d in candidates if not _under(d, candidates - {d})),
                  key=lambda d: len(d.parts))
    for d in hide:
        args += ["--tmpfs", str(d)]
    args += ["--dir", SANDBOX_HOME]
    # the interpreter and its standard library stay reachable if they live in a hidden dir
    # (a venv or a uv-managed Python under HOME, say)
    keep = {Path(p).resolve()
            for p in (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent)}
    for d in sorted(keep, key=lambda d: len(d.parts)):
        if _under(d, hide) and not _under(d, keep - {d}):
            args += ["--ro-bind", str(d), str(d)]
    for d in (workdir, *(Path(w).resolve() for w in writable)):
        args += ["--bind", str(d), str(d)]
    # the worktree's `.git` file cannot be repointed at a git dir the check made up (with
    # hooks or filters relay's own git would then run), and the common dir stays read-only
    dotgit = workdir / ".git"
    if dotgit.is_file():
        args += ["--ro-bind", str(dotgit), str(dotgit)]
    common = git_common_dir(workdir)
    if common is not None:
        args += ["--ro-bind", str(common), str(common)]
        if dotgit.is_file():  # the worktree's own admin dir, <common>/worktrees/<name>
            admin = (workdir / dotgit.read_text().removeprefix("gitdir:").strip()).resolve()
            if admin.is_dir() and not _under(admin, [common]):
                args += ["--ro-bind", str(admin), str(admin)]
    for name, value in env.items():
        args += ["--setenv", name, value]
    return [*args, "--chdir", str(workdir), "--"]


def run_sandboxed(command: str, workdir: str | Path, timeout_s: float, *,
                  hidden: Iterable[str | Path] = (), writable: Sequence[Path] = (),
                  pass_env: Iterable[str] = ()) -> Finished:
    """Run `command` with /bin/sh in the sandbox. The caller has made sure one works."""
    binary = bwrap_binary()
    assert binary is not None, "sandbox_problem() first"
    env = environment(pass_env, home=SANDBOX_HOME, tmp="/tmp")
    argv = [binary, *sandbox_args(Path(workdir), hidden=hidden, env=env, writable=writable),
            "/bin/sh", "-c", command]
    # bwrap in a session of its own: a timeout kills bwrap, --die-with-parent then kills the
    # sandbox's init, and with it the whole pid namespace (a setsid'd child included)
    return _run(argv, cwd=workdir, env={"PATH": os.environ.get("PATH") or os.defpath},
                timeout_s=timeout_s, sandboxed=True)


def run_unsandboxed(command: str, workdir: str | Path, timeout_s: float, *,
                    pass_env: Iterable[str] = ()) -> Finished:
    """The operator's opt-out: own session, allowlisted environment, a throwaway HOME."""
    with tempfile.TemporaryDirectory(prefix="relay-check-home-") as home:
        return _run(["/bin/sh", "-c", command], cwd=workdir,
                    env=environment(pass_env, home=home, tmp=None), timeout_s=timeout_s,
                    sandboxed=False)


def _run(argv: list[str], *, cwd: str | Path, env: dict[str, str], timeout_s: float,
         sandboxed: bool) -> Finished:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    reader = _TailReader(proc.stdout)
    try:
        exit_code: int | None = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()
        exit_code = None
    else:
        _kill_group(proc.pid)  # whatever the command left behind in its group
    # Sandboxed, the pipe closes with the pid namespace. Unsandboxed, a setsid'd survivor may
    # hold it open: the output stops there rather than the check hanging on it.
    reader.join(timeout=5)
    output, cut = reader.tail()
    return Finished(exit_code, output, cut, sandboxed)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _TailReader(threading.Thread):
    """Drains a pipe, keeping only its last KEEP_OUTPUT bytes (bounded memory)."""

    def __init__(self, pipe) -> None:
        super().__init__(daemon=True)
        self._pipe = pipe
        self._buf = bytearray()
        self._cut = 0
        self._lock = threading.Lock()
        self.start()

    def run(self) -> None:
        fd = self._pipe.fileno()
        try:
            while chunk := os.read(fd, 65536):
                with self._lock:
                    self._buf += chunk
                    if len(self._buf) > 2 * KEEP_OUTPUT:
                        drop = len(self._buf) - KEEP_OUTPUT
                        self._cut += drop
                        del self._buf[:drop]
        except OSError:
            pass
        finally:
            self._pipe.close()

    def tail(self) -> tuple[bytes, int]:
        with self._lock:
            drop = max(0, len(self._buf) - KEEP_OUTPUT)
            return bytes(self._buf[drop:]), self._cut + drop
