"""Running model-written code (a workspace's check command) inside a bubblewrap sandbox.

The command sees a read-only system and nothing of relay: no network (its own network
namespace), a fresh pid namespace (so /proc shows no worker ancestor and nothing outlives the
run), tmpfs over /tmp, /var/tmp, /run, the worker's HOME and relay's data dirs (the registry and
every other worktree live there), then only its own worktree bound back writable and the
repository's git common dir bound back read-only (so `git status` and `git diff` work, but
nothing can be committed, moved or planted, hooks included). Its environment is built from an
allowlist, never from the worker's environment minus a deny-list.

No privilege inside: the command runs in a user namespace of its own as uid/gid 65534 with
every capability dropped (`--unshare-user --uid 65534 --gid 65534 --cap-drop ALL`, and
`--disable-userns` where bwrap has it). Run by root, bubblewrap would otherwise keep all
capabilities in the sandbox, and a check could unmount the tmpfs that hide relay's data or
remount / read-write. The probe refuses a sandbox whose CapEff is not 0 inside. (The mapped uid
is the worker's uid outside, so files the worker's uid owns outside the hidden dirs stay
readable by their owner bits; run the worker as a dedicated user to keep other files private.)

The git common dir is shown filtered: its `config` is replaced by a copy holding only `core`
(minus command-running keys) and `extensions` (no remote, URL, credential, filter or include),
FETCH_HEAD is hidden, and other specs' `relay/*` branches, their reflogs and their worktrees'
admin dirs are hidden (loose refs, packed-refs and logs). Residual: objects stay readable by
id (`git cat-file --batch-all-objects` enumerates them), so other specs' committed content is
not secret from a determined check, only out of its way.

Settings, read from the worker's environment:
  RELAY_BWRAP=/path/to/bwrap      the bubblewrap binary (default: `bwrap` on PATH)
  RELAY_UNSANDBOXED_CHECKS=1      run checks WITHOUT a sandbox when none works here (own
                                  session, allowlisted environment, a throwaway HOME; nothing
                                  more). Every such run is marked unsandboxed. Without this
                                  opt-out, relay refuses to run checks when no sandbox works.
  RELAY_CHECK_MAX_PROCESSES=512   RLIMIT_NPROC of the check (0: no limit). The kernel counts it
                                  per real uid outside the namespace and exempts root: a worker
                                  run as root gets no process limit from it (the pid namespace,
                                  the timeout and --die-with-parent still end every process).
  RELAY_CHECK_MAX_MEMORY=4G       RLIMIT_AS, the address space of each process (0: no limit)
  RELAY_CHECK_MAX_FILE_SIZE=1G    RLIMIT_FSIZE, the largest file a check may write (0: none)
  RELAY_CHECK_TMPFS_SIZE=1G       size of the sandbox's /tmp (the other hidden dirs' tmpfs get
                                  at most 64M each); needs bwrap's --size (0.7+)
  Sizes are bytes, or a number with K, M or G. Limits apply to sandboxed and opted-out runs
  alike; an invalid value is an error of the check, never a silent default. Residual: no
  overall memory (cgroup) limit; tmpfs pages count against the machine's memory.

Whether a sandbox works is probed once per process (and bwrap binary) by running a capability
check in exactly the sandbox a check gets, so a kernel or container that forbids one of its
namespaces or mounts, or a bwrap that leaves capabilities, is found before any model-written
code would run.
"""

from __future__ import annotations

import atexit
import os
import re
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

SANDBOX_UID = 65534  # "nobody" inside the sandbox's own user namespace
LIMIT_ENV = {  # setting -> (RLIMIT, default)
    "RELAY_CHECK_MAX_PROCESSES": ("RLIMIT_NPROC", 512),
    "RELAY_CHECK_MAX_MEMORY": ("RLIMIT_AS", 4 << 30),
    "RELAY_CHECK_MAX_FILE_SIZE": ("RLIMIT_FSIZE", 1 << 30),
}
TMPFS_ENV, TMPFS_DEFAULT, SMALL_TMPFS = "RELAY_CHECK_TMPFS_SIZE", 1 << 30, 64 << 20
# Run in the sandbox (or unsandboxed) by the worker's interpreter: sets the limits, which the
# check cannot raise again (no CAP_SYS_RESOURCE), then becomes /bin/sh -c <command>.
LIMITER = ("import os, resource, sys\n"
           "for name, value in zip(('RLIMIT_NPROC', 'RLIMIT_AS', 'RLIMIT_FSIZE'), sys.argv[1:4]):\n"
           "    if int(value):\n"
           "        resource.setrlimit(getattr(resource, name), (int(value), int(value)))\n"
           "os.execv('/bin/sh', ['/bin/sh', '-c', sys.argv[4]])\n")
# The probe: no effective capability inside, or no sandbox.
CAP_PROBE = ('while read -r key value; do if [ "$key" = CapEff: ]; then '
             '[ "$value" = 0000000000000000 ] && exit 0; echo "capabilities left inside: '
             'CapEff $value"; exit 3; fi; done < /proc/self/status; echo "no CapEff"; exit 4')

_probed: dict[str, str | None] = {}
_probe_lock = threading.Lock()
_features: dict[str, str] = {}


def _size(text: str, name: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{name}={text!r} is not a size (bytes, or a number with K, M or G)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30}[match[2].lower()]


def limits() -> tuple[int, int, int]:
    """(processes, address space, file size) for a check; 0 is no limit."""
    return tuple(_size(os.environ[name], name) if os.environ.get(name, "").strip() else default
                 for name, (_, default) in LIMIT_ENV.items())  # type: ignore[return-value]


def tmpfs_size() -> int:
    raw = os.environ.get(TMPFS_ENV, "").strip()
    return _size(raw, TMPFS_ENV) if raw else TMPFS_DEFAULT


def limited(command: str) -> list[str]:
    """argv running `command` with the limits set (the interpreter is reachable in the sandbox)."""
    return [sys.executable, "-I", "-S", "-c", LIMITER, *map(str, limits()), command]


def _supports(option: str) -> bool:
    """Whether the configured bwrap knows `option` (from its --help, read once)."""
    binary = bwrap_binary()
    if binary is None:
        return False
    if binary not in _features:
        try:
            found = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10,
                                   stdin=subprocess.DEVNULL)
            _features[binary] = found.stdout + found.stderr
        except (OSError, subprocess.TimeoutExpired):
            _features[binary] = ""
    return re.search(rf"^\s*{re.escape(option)}\b", _features[binary], re.MULTILINE) is not None


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
        argv = [binary, *sandbox_args(Path(scratch), hidden=(), env={"PATH": os.defpath},
                                      scratch=Path(scratch) / ".view"),
                "/bin/sh", "-c", CAP_PROBE]
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


# what of the git config a check's git sees: the repository's format, nothing that names a
# remote, a URL, a credential, a command, a filter or another file
_CONFIG_KEPT = re.compile(
    r"(core\.(repositoryformatversion|filemode|bare|logallrefupdates|ignorecase|"
    r"precomposeunicode|symlinks|autocrlf|eol|safecrlf|quotepath|checkstat|trustctime|"
    r"compression|bigfilethreshold|sharedrepository|splitindex|untrackedcache)"
    r"|extensions\.[a-z0-9-]+)", re.IGNORECASE)


def sandbox_args(workdir: Path, *, hidden: Iterable[str | Path], env: dict[str, str],
                 writable: Sequence[Path] = (), scratch: Path | None = None) -> list[str]:
    """bwrap's options for running in `workdir` (writable, as are `writable`). `scratch` is a
    private dir of the worker's that outlives the run (filtered git files are written there)."""
    workdir = workdir.resolve()
    if workdir == Path("/"):  # binding it writable would make the whole system writable
        raise ValueError("a check cannot run in /")
    if scratch is None:
        scratch = Path(tempfile.mkdtemp(prefix="relay-sandbox-view-"))
        atexit.register(shutil.rmtree, scratch, True)
    # no privilege inside: root running bwrap would otherwise leave every capability to the
    # check (umount the tmpfs over relay's data, remount / read-write)
    args = ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--cap-drop", "ALL"]
    if _supports("--disable-userns"):
        args.append("--disable-userns")
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--hostname", "relay-sandbox", "--die-with-parent", "--new-session", "--clearenv",
             "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev"]
    candidates = {Path(p).resolve() for p in (*ALWAYS_HIDDEN, os.environ.get("HOME") or "", *hidden)
                  if str(p)}
    candidates.discard(Path("/"))
    files = sorted(p for p in candidates if p.is_file())
    candidates = {p for p in candidates if p.is_dir()}
    # shallowest first, and one under another is already hidden (a later, shallower tmpfs
    # would bury a deeper one)
    hide = sorted((d for d in candidates if not _under(d, candidates - {d})),
                  key=lambda d: len(d.parts))
    sized = _supports("--size")
    big = tmpfs_size()
    for d in hide:
        if sized and big:
            args += ["--size", str(big if d == Path("/tmp") else min(big, SMALL_TMPFS))]
        args += ["--tmpfs", str(d)]
    for f in files:  # a registry file in a directory that cannot be hidden whole
        if not _under(f, hide):
            args += ["--ro-bind", "/dev/null", str(f)]
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
        admin = common
        if dotgit.is_file():  # the worktree's own admin dir, <common>/worktrees/<name>
            admin = (workdir / dotgit.read_text().removeprefix("gitdir:").strip()).resolve()
        args += ["--ro-bind", str(common), str(common)]
        args += _git_view(common, admin if admin.is_dir() else common, scratch)
    for name, value in env.items():
        args += ["--setenv", name, value]
    return [*args, "--chdir", str(workdir), "--"]


def _git_view(common: Path, admin: Path, scratch: Path) -> list[str]:
    """Mounts over the read-only common dir: a filtered config, no FETCH_HEAD, and of the
    `relay/*` branches only this worktree's own (loose, packed and its reflog); other
    worktrees' admin dirs hidden."""
    args: list[str] = []
    scratch.mkdir(parents=True, exist_ok=True)
    if admin != common and _under(admin, [common / "worktrees"]):
        args += ["--tmpfs", str(common / "worktrees"), "--ro-bind", str(admin), str(admin)]
    elif admin != common:
        args += ["--ro-bind", str(admin), str(admin)]
    config = common / "config"
    if config.is_file():
        kept = scratch / "config"
        kept.write_text(_filtered_config(config))
        args += ["--ro-bind", str(kept), str(config)]
    for name in ("FETCH_HEAD", "config.worktree"):
        for where in {common, admin}:
            if (where / name).is_file():
                args += ["--ro-bind", "/dev/null", str(where / name)]
    if (common / "reftable").exists():  # not filtered: the refs are in one binary table
        return args
    head = (admin / "HEAD").read_text(errors="replace").strip() if (admin / "HEAD").is_file() else ""
    own = head.removeprefix("ref: ") if head.startswith("ref: refs/heads/relay/") else None
    for where in (common, common / "logs"):  # the loose refs, then their reflogs
        root = where / "refs" / "heads" / "relay"
        if root.is_dir() and not root.is_symlink():
            args += ["--tmpfs", str(root)]
            mine = where / own if own else None
            if mine is not None and mine.is_file() and _under(mine, [root]):
                args += ["--ro-bind", str(mine), str(mine)]
    packed = common / "packed-refs"
    if packed.is_file():
        view = scratch / "packed-refs"
        view.write_text(_filtered_packed_refs(packed.read_text(errors="replace"), own))
        args += ["--ro-bind", str(view), str(packed)]
    return args


def _filtered_config(config: Path) -> str:
    from activities.git_effects import run_git  # late: git_effects runs checks itself

    listed = run_git("config", "-f", str(config), "-z", "--list", cwd=config.parent)
    sections: dict[str, list[str]] = {}
    for entry in listed.stdout.split("\0") if listed.returncode == 0 else []:
        key, _, value = entry.partition("\n")
        if not key or not _CONFIG_KEPT.fullmatch(key):
            continue
        section, name = key.split(".", 1)
        quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        sections.setdefault(section.lower(), []).append(f'\t{name} = "{quoted}"')
    return "".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items())


def _filtered_packed_refs(text: str, own: str | None) -> str:
    kept, skipping = [], False
    for line in text.splitlines():
        if line.startswith("^"):  # the peeled id of the ref above
            if not skipping:
                kept.append(line)
            continue
        ref = line.split(" ", 1)[1] if " " in line and not line.startswith("#") else ""
        skipping = ref.startswith("refs/heads/relay/") and ref != own
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


def run_sandboxed(command: str, workdir: str | Path, timeout_s: float, *,
                  hidden: Iterable[str | Path] = (), writable: Sequence[Path] = (),
                  pass_env: Iterable[str] = ()) -> Finished:
    """Run `command` with /bin/sh in the sandbox. The caller has made sure one works."""
    binary = bwrap_binary()
    assert binary is not None, "sandbox_problem() first"
    env = environment(pass_env, home=SANDBOX_HOME, tmp="/tmp")
    with tempfile.TemporaryDirectory(prefix="relay-sandbox-view-") as scratch:
        argv = [binary, *sandbox_args(Path(workdir), hidden=hidden, env=env, writable=writable,
                                      scratch=Path(scratch)), *limited(command)]
        # bwrap in a session of its own: a timeout kills bwrap, --die-with-parent then kills
        # the sandbox's init, and with it the whole pid namespace (a setsid'd child included)
        return _run(argv, cwd=workdir, env={"PATH": os.environ.get("PATH") or os.defpath},
                    timeout_s=timeout_s, sandboxed=True)


def run_unsandboxed(command: str, workdir: str | Path, timeout_s: float, *,
                    pass_env: Iterable[str] = ()) -> Finished:
    """The operator's opt-out: own session, allowlisted environment, a throwaway HOME."""
    with tempfile.TemporaryDirectory(prefix="relay-check-home-") as home:
        return _run(limited(command), cwd=workdir,
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
