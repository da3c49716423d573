"""A hostile workspace: model-written code tries everything the attack report found, with the
sandbox on. Each attack is asserted blocked twice: on what the check output says (what the
model would receive) and on the filesystem. Plus: no sandbox means no checks (unless the
operator opts out), relay's git never runs a planted hook nor sees the worker's secrets, and
delivery merges exactly the validated commit.

Everything runs real processes: bubblewrap, git, a listening socket, a worker subprocess whose
environment holds the secret (so /proc/<ancestor>/environ really has it to steal).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from activities.checks import run_check
from activities.effects import EffectExecutor
from activities.git_effects import DeliveryRefused, GitError, git_effects, run_git
from activities.sandbox import NO_SANDBOX, sandbox_problem
from relay.ledger import Ledger
from relay.models import Role, WorkspaceInput
from tests.conftest import ANSWERS, approve_when_asked, git, make_repo, spec_id, wait_for_questions
from tests.test_tools import toolbox

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-ant-canary-5f2b9c0e1d"

pytestmark = pytest.mark.skipif(sandbox_problem() is not None,
                                reason=f"no working sandbox here: {sandbox_problem()}")

# One line per attack: "ATTACK <name>: BLOCKED|LEAKED <detail>". Run as a check command.
ATTACK = r'''
import glob, json, os, socket, subprocess, sys, time
cfg = json.loads(sys.argv[1])
wpid = int(cfg["worker_pid"])

def say(name, leaked, detail=""):
    detail = " ".join(str(detail).split())[:600]
    print(f"ATTACK {name}: {'LEAKED' if leaked else 'BLOCKED'} {detail}", flush=True)

# the worker's environment (its API key), through every /proc/<pid>/environ in sight and the
# worker's pid; what it finds goes into the output, as it would reach the model
seen = []
for path in sorted(set(glob.glob("/proc/[0-9]*/environ") + [f"/proc/{wpid}/environ"])):
    try:
        seen.append(open(path, "rb").read().decode(errors="replace").replace("\0", " "))
    except OSError:
        pass
seen.append(" ".join(f"{k}={v}" for k, v in os.environ.items()))
stolen = sorted({word for env in seen for word in env.split() if "ANTHROPIC" in word or "DSN" in word})
say("proc-environ", bool(stolen), " ".join(stolen) or f"{len(seen)} environments, no secret")
say("worker-pid-visible", os.path.exists(f"/proc/{wpid}/environ") and wpid != os.getpid())

for name, path in cfg["reads"].items():
    try:
        say(name, True, open(path, errors="replace").read()[:300])
    except OSError as exc:
        say(name, False, exc)

try:
    socket.create_connection(("127.0.0.1", cfg["port"]), timeout=2).close()
    say("network", True, f"connected to 127.0.0.1:{cfg['port']}")
except OSError as exc:
    say("network", False, exc)

for name, path in cfg["writes"].items():
    try:
        with open(path, "a") as f:
            f.write("#!/bin/sh\ntouch " + cfg["hook_marker"] + "\n")
        os.chmod(path, 0o755)
        say(name, True, f"wrote {path}")
    except OSError as exc:
        say(name, False, exc)

def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True)

done = git("config", "core.hooksPath", cfg["worktree"])
say("git-config-hooks", done.returncode == 0, done.stderr)
done = git("-c", "user.name=x", "-c", "user.email=x@x", "commit", "--allow-empty", "-m", "planted")
say("git-commit", done.returncode == 0, done.stderr)
status = git("status", "--porcelain")
print(f"git status works: {status.returncode == 0}", flush=True)

# a survivor: detached into its own session, it would write its marker after the check ends
started, survived = cfg["survivor_started"], cfg["survivor_marker"]
subprocess.Popen(["setsid", "sh", "-c", f"touch {started}; sleep 1; touch {survived}"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
deadline = time.monotonic() + 10
while not os.path.exists(started) and time.monotonic() < deadline:
    time.sleep(0.01)
print("survivor started", os.path.exists(started), flush=True)
'''

# a worker: it holds the secret in its environment, and the check learns its pid
DRIVER = ("import json, os, sys\nfrom activities.checks import run_check\n"
          "run = run_check(sys.argv[1].replace('WORKER_PID', str(os.getpid())), sys.argv[2], 60)\n"
          "print(json.dumps({'report': run.report(), 'sandboxed': run.sandboxed, "
          "'exit_code': run.exit_code, 'refused': run.refused}))\n")


def check_in_worker(command: str, cwd: Path, **env: str) -> dict:
    """run_check in a worker subprocess whose environment holds the secret."""
    full = {**os.environ, "ANTHROPIC_API_KEY": SECRET, "DATABASE_DSN": f"postgres://{SECRET}@db",
            **env}
    proc = subprocess.run([sys.executable, "-c", DRIVER, command, str(cwd)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def attack_command(cfg: dict) -> str:
    return f"python attack.py {shlex.quote(json.dumps(cfg))}"


def wait_absent(path: Path, seconds: float) -> bool:
    """True if `path` did not appear within `seconds` (polled, so a late one is seen at once)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists():
            return False
        time.sleep(0.02)
    return not path.exists()


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch dir outside /tmp (which the sandbox hides anyway), so hiding HOME and the data
    dir is what blocks each read, not the tmpfs over /tmp."""
    home = Path(os.path.expanduser("~"))
    parent = home if os.access(home, os.W_OK) else Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=".relay-sandbox-test-", dir=parent))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def world(base: Path, registry) -> dict:
    """A user's repository, relay's data dir with a registry file and two specs' worktrees, a
    HOME with a private key."""
    project = make_repo(base / "project")
    data = base / "data"
    (data / "registry.db").parent.mkdir(parents=True)
    (data / "registry.db").write_text("REGISTRY-CANARY every spec's conversations")
    home = base / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("HOME-CANARY private key")
    executor = EffectExecutor(Ledger(registry), git_effects, data)
    trees = {}
    for name in ("a", "b"):
        sid = spec_id(f"sbx{name}")
        worktree = data / "worktrees" / sid
        executor.execute(spec_id=sid, run_id="r", step="prepare", effect="git.prepare_workspace",
                         payload={"repo": str(project), "target": "main", "branch": f"relay/{sid}",
                                  "worktree": str(worktree)})
        trees[name] = worktree
    (trees["b"] / "their_work.py").write_text("WORKTREE-B-CANARY\n")
    return {"project": project, "data": data, "home": home, "a": trees["a"], "b": trees["b"],
            "common": project / ".git", "executor": executor}


def tree_state(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*")) if not p.is_symlink()}


class TestHostileWorkspace:
    def test_every_attack_is_blocked(self, world):
        project, data, common, a, b = (world[k] for k in ("project", "data", "common", "a", "b"))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        (a / "attack.py").write_text(ATTACK)
        marker = world["home"].parent / "hook-ran"
        cfg = {
            "worker_pid": "WORKER_PID", "port": listener.getsockname()[1],
            "reads": {"registry": str(data / "registry.db"),
                      "other-worktree": str(b / "their_work.py"),
                      "home": str(world["home"] / ".ssh" / "id_ed25519")},
            "writes": {"git-hook": str(common / "hooks" / "post-merge"),
                       "git-config": str(common / "config"),
                       "git-dotgit-file": str(a / ".git"),
                       "other-worktree-write": str(b / "pwned.py"),
                       "checkout-write": str(project / "pwned.py"),
                       "data-dir-write": str(data / "pwned.txt")},
            "hook_marker": str(marker), "worktree": str(a),
            "survivor_started": str(a / "survivor-started"),
            "survivor_marker": str(a / "survivor-survived"),
        }
        before = {"common": tree_state(common), "b": tree_state(b), "project": tree_state(project),
                  "refs": git(project, "for-each-ref"), "data": sorted(os.listdir(data))}
        run = check_in_worker(attack_command(cfg), a, HOME=str(world["home"]))
        report = run["report"]

        assert run["sandboxed"] and run["exit_code"] == 0, report
        # what the model receives: every attack blocked, no secret, registry row, other
        # spec's work or private key in it
        attacks = dict(line.split(": ", 1) for line in report.splitlines() if line.startswith("ATTACK"))
        assert len(attacks) == 14, report
        # (writing into the data dir "works" inside: into the sandbox's tmpfs, see below)
        assert all(v.startswith("BLOCKED") for k, v in attacks.items()
                   if k != "ATTACK data-dir-write"), report
        for canary in (SECRET, "REGISTRY-CANARY", "WORKTREE-B-CANARY", "HOME-CANARY"):
            assert canary not in report
        assert "git status works: True" in report and "survivor started True" in report

        # and on the filesystem / the network
        with pytest.raises(BlockingIOError):
            listener.accept()
        listener.close()
        assert tree_state(common) == before["common"]  # no hook, no config, no ref, no object
        assert git(project, "for-each-ref") == before["refs"]
        assert tree_state(b) == before["b"] and tree_state(project) == before["project"]
        assert sorted(os.listdir(data)) == before["data"]  # its write went to a tmpfs
        assert (a / "survivor-started").exists()
        assert wait_absent(a / "survivor-survived", 3), "a setsid'd process outlived the check"
        assert not marker.exists()

    def test_the_attacks_are_real(self, world):
        """The control: the same attack without a sandbox (the operator's opt-out) does steal
        the worker's secret through /proc and reads HOME and the registry."""
        a, data = world["a"], world["data"]
        (a / "attack.py").write_text(ATTACK)
        cfg = {"worker_pid": "WORKER_PID", "port": 9,
               "reads": {"registry": str(data / "registry.db"),
                         "home": str(world["home"] / ".ssh" / "id_ed25519")},
               "writes": {}, "hook_marker": "/nonexistent/x", "worktree": str(a),
               "survivor_started": str(a / "s1"), "survivor_marker": str(a / "s2")}
        run = check_in_worker(attack_command(cfg), a, HOME=str(world["home"]),
                              RELAY_BWRAP=str(world["home"] / "no-bwrap"),
                              RELAY_UNSANDBOXED_CHECKS="1")
        report = run["report"]
        assert "(unsandboxed)" in report and SECRET in report
        for attack in ("proc-environ", "worker-pid-visible", "registry", "home"):
            assert f"ATTACK {attack}: LEAKED" in report, report

    def test_a_timeout_kills_the_whole_sandbox(self, world):
        a = world["a"]
        started = time.monotonic()
        run = run_check(f"setsid sh -c 'sleep 1; touch {a}/late' & sleep 60", a, 1)
        assert run.exit_code is None and "timed out after 1s" in run.report()
        assert time.monotonic() - started < 10
        assert wait_absent(a / "late", 3)

    def test_output_is_capped_to_its_tail(self, world):
        run = run_check("yes relay | head -c 5000000; echo THE-END", world["a"], 30)
        assert run.passed and run.output.rstrip().endswith("THE-END")
        assert len(run.output) < 13_000 and "cut)" in run.output.splitlines()[0]


class TestWithoutASandbox:
    def test_checks_are_refused_with_the_reason(self, tmp_path):
        run = check_in_worker("touch ran", tmp_path, RELAY_BWRAP=str(tmp_path / "missing-bwrap"))
        assert run["refused"] and NO_SANDBOX in run["report"] and run["exit_code"] == 126
        assert "not run:" in run["report"] and not (tmp_path / "ran").exists()

    def test_a_bwrap_that_cannot_build_the_sandbox_is_no_sandbox(self, tmp_path):
        broken = tmp_path / "bwrap"
        broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\n"
                          "exit 1\n")
        broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
        run = check_in_worker("touch ran", tmp_path, RELAY_BWRAP=str(broken))
        assert run["refused"] and "No permissions to creating new namespace" in run["report"]
        assert NO_SANDBOX in run["report"] and not (tmp_path / "ran").exists()

    def test_the_opt_out_runs_them_marked_unsandboxed(self, tmp_path):
        run = check_in_worker("env; touch ran", tmp_path, RELAY_BWRAP=str(tmp_path / "missing"),
                              RELAY_UNSANDBOXED_CHECKS="1")
        assert run["exit_code"] == 0 and not run["sandboxed"] and not run["refused"]
        assert "(unsandboxed)" in run["report"] and (tmp_path / "ran").exists()
        assert SECRET not in run["report"]  # the environment is still an allowlist

    def test_a_validator_sees_the_refusal_as_its_tool_result(self, tmp_path, registry, monkeypatch):
        monkeypatch.setenv("RELAY_BWRAP", str(tmp_path / "missing-bwrap"))
        monkeypatch.delenv("RELAY_UNSANDBOXED_CHECKS", raising=False)
        root = tmp_path / "wt"
        root.mkdir()
        outcome = toolbox(root, registry, Role.validator).run("run_checks", {}, "c0")
        assert NO_SANDBOX in outcome.text and "not run:" in outcome.text


HOOKS = ("pre-commit", "prepare-commit-msg", "commit-msg", "post-commit", "post-checkout",
         "pre-merge-commit", "post-merge", "reference-transaction", "post-index-change",
         "post-rewrite")


class TestRelaysGit:
    def test_planted_hooks_and_fsmonitor_never_run(self, world, tmp_path):
        """Hooks in the user's checkout (where an unsandboxed check could have planted them)
        and an fsmonitor command: relay's whole effect chain runs, none of them does."""
        project, executor, a = world["project"], world["executor"], world["a"]
        sid, base = a.name, git(project, "rev-parse", "main")
        payload = {"repo": str(project), "target": "main", "branch": f"relay/{sid}", "worktree": str(a)}
        executor.execute(spec_id=sid, run_id="r", step="w", effect="git.write_file",
                         payload={"worktree": str(a), "path": "new.py", "content": "x = 1\n"})
        # the user's main moves (before the hooks exist): delivery merges aside and re-checks
        (project / "other.md").write_text("theirs\n")
        git(project, "add", "other.md")
        git(project, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "theirs")

        marker = tmp_path / "planted-ran"
        script = f"#!/bin/sh\necho \"$0\" >> {marker}\nenv >> {marker}\n"
        for name in HOOKS:
            hook = project / ".git" / "hooks" / name
            hook.write_text(script)
            hook.chmod(0o755)
        git(project, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "--allow-empty",
            "-m", "the hooks are live")
        assert marker.exists(), "control: plain git runs the planted hooks"
        marker.unlink()
        fsmonitor = tmp_path / "fsmonitor.sh"
        fsmonitor.write_text(script)
        fsmonitor.chmod(0o755)
        git(project, "config", "core.fsmonitor", str(fsmonitor))

        row, _ = executor.execute(spec_id=sid, run_id="r", step="c", effect="git.commit",
                                  payload={**payload, "paths": ["new.py"], "message": "m"})
        done, _ = executor.execute(spec_id=sid, run_id="r", step="d", effect="git.deliver",
                                   payload={**payload, "base": base, "commit": row.result["commit"],
                                            "check": "test -f new.py && test -f other.md"})
        assert done.result["recheck"]["exit_code"] == 0
        assert "new.py" in git(project, "ls-tree", "--name-only", "main")
        executor.execute(spec_id=sid, run_id="r", step="x", effect="git.cleanup", payload=payload)
        assert not marker.exists(), marker.read_text()[:500]

    def test_git_gets_no_secret_and_no_user_config(self, world, tmp_path, monkeypatch):
        monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
        monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
        dump = tmp_path / "git-env"
        done = run_git("-c", f"alias.envdump=!env > {dump}", "envdump", cwd=world["project"])
        assert done.returncode == 0, done.stderr
        seen = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
        assert SECRET not in dump.read_text() and "ANTHROPIC_API_KEY" not in seen
        assert seen["HOME"] == "/nonexistent" and seen["GIT_CONFIG_GLOBAL"] == "/dev/null"
        assert seen["GIT_CONFIG_NOSYSTEM"] == "1" and "elsewhere" not in dump.read_text()


class TestDeliveryMergesTheValidatedCommit:
    def _validated(self, world) -> tuple[dict, str, str]:
        project, executor, a = world["project"], world["executor"], world["a"]
        sid = a.name
        payload = {"repo": str(project), "target": "main", "branch": f"relay/{sid}", "worktree": str(a)}
        executor.execute(spec_id=sid, run_id="r", step="w", effect="git.write_file",
                         payload={"worktree": str(a), "path": "feature.py", "content": "ok = 1\n"})
        row, _ = executor.execute(spec_id=sid, run_id="r", step="c", effect="git.commit",
                                  payload={**payload, "paths": ["feature.py"], "message": "feature"})
        return payload, sid, row.result["commit"]

    def test_a_commit_added_after_validation_is_refused_not_merged(self, world):
        project, executor, a = world["project"], world["executor"], world["a"]
        payload, sid, validated = self._validated(world)
        before = git(project, "rev-parse", "main")
        # another process commits to the spec's branch after the validator checked it
        (a / "backdoor.py").write_text("import os\n")
        git(a, "add", "backdoor.py")
        git(a, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "unvalidated")
        with pytest.raises(DeliveryRefused, match="moved since validation") as refused:
            executor.execute(spec_id=sid, run_id="r", step="d", effect="git.deliver",
                             payload={**payload, "base": before, "commit": validated})
        assert "nothing was merged" in str(refused.value)
        assert git(project, "rev-parse", "main") == before
        assert "backdoor.py" not in git(project, "ls-tree", "--name-only", "main")
        assert not (project / "backdoor.py").exists()

    def test_the_validated_commit_is_what_lands(self, world):
        project, executor = world["project"], world["executor"]
        payload, sid, validated = self._validated(world)
        base = git(project, "rev-parse", "main")
        row, _ = executor.execute(spec_id=sid, run_id="r", step="d", effect="git.deliver",
                                  payload={**payload, "base": base, "commit": validated})
        assert row.result["merged"] == validated
        assert git(project, "rev-parse", "main^2") == validated
        assert (project / "feature.py").is_file()


async def test_a_hostile_check_in_a_running_spec(relay, user_repo, model_server, monkeypatch,
                                                 tmp_path, data_dir):
    """End to end: the workspace's check runs the attack inside a real spec; what the validator
    (the model) receives shows every attack blocked and none of the worker's secrets."""
    monkeypatch.setenv("DATABASE_DSN", f"postgres://{SECRET}@db")  # no deny-list word in its name
    (user_repo / "attack.py").write_text(ATTACK)
    git(user_repo, "add", "attack.py")
    git(user_repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "attack")
    marker = tmp_path / "hook-ran"
    cfg = {"worker_pid": os.getpid(), "port": 9,
           "reads": {"registry": str(data_dir / "registry.db")},
           # (the checkout, under /tmp here, is hidden: writes to it land in the sandbox's
           # tmpfs, asserted on the filesystem below; outside /tmp the read-only root refuses)
           "writes": {"git-hook": str(user_repo / ".git" / "hooks" / "post-merge"),
                      "git-config": str(user_repo / ".git" / "config")},
           "hook_marker": str(marker), "worktree": "/", "survivor_started": "started",
           "survivor_marker": "survived"}
    check = f"python -m unittest && {attack_command(cfg)}"
    sid = await relay.run("Write a greeting module", spec_id=spec_id("hostile"),
                          workspace=WorkspaceInput(path=str(user_repo), check=check))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    result = await approve_when_asked(relay, sid, timeout=90)
    received = str([r.body["messages"][-1] for r in model_server.recorded("validator")])
    assert "ATTACK proc-environ: BLOCKED" in received and SECRET not in received
    assert "ATTACK worker-pid-visible: BLOCKED" in received
    assert "ATTACK git-hook: BLOCKED" in received and "ATTACK git-config: BLOCKED" in received
    assert "ATTACK registry: BLOCKED" in received and "ATTACK git-commit: BLOCKED" in received
    assert "ATTACK network: BLOCKED" in received and "LEAKED" not in received
    assert result.outcome == "delivered"  # delivery ran git in the checkout: no hook fired
    assert not marker.exists() and not (user_repo / "pwned.py").exists()
    assert not (user_repo / ".git" / "hooks" / "post-merge").exists()


async def test_a_spec_whose_checks_ran_unsandboxed_says_so(relay, user_repo, monkeypatch):
    """The operator's opt-out is never silent: the spec's status and result carry it."""
    monkeypatch.setenv("RELAY_BWRAP", "/nonexistent/bwrap")  # no working sandbox here
    monkeypatch.setenv("RELAY_UNSANDBOXED_CHECKS", "1")
    sid = await relay.run("Write a greeting module", spec_id=spec_id("optout"),
                          workspace=WorkspaceInput(path=str(user_repo), check="python -m unittest"))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    result = await approve_when_asked(relay, sid, timeout=90)
    assert result.outcome == "delivered"
    assert "checks_ran_unsandboxed" in result.flags
    assert "checks_ran_unsandboxed" in (await relay.status(sid)).flags


async def test_a_spec_with_a_sandbox_is_not_flagged(relay, user_repo):
    sid = await relay.run("Write a greeting module", spec_id=spec_id("boxed"),
                          workspace=WorkspaceInput(path=str(user_repo), check="python -m unittest"))
    await wait_for_questions(relay, sid)
    await relay.answer(sid, ANSWERS)
    result = await approve_when_asked(relay, sid, timeout=90)
    assert result.outcome == "delivered" and "checks_ran_unsandboxed" not in result.flags


# --- no privilege inside (red-team finding 1) ----------------------------------------------


class TestNoPrivilegeInside:
    """Run by root, bubblewrap used to leave every capability in the sandbox: a check could
    unmount the tmpfs over HOME and the data dir, remount / read-write and plant a filter
    driver that relay's own git then ran as root."""

    def test_no_capability_and_no_mount_escape(self, world):
        a, data, common, home = world["a"], world["data"], world["common"], Path.home()
        config_before = (common / "config").read_bytes()
        escape = world["home"].parent / "escaped"
        run = run_check(
            "grep CapEff /proc/self/status; id -u; "
            f"umount -l {common} && echo UNMOUNTED-GIT; umount -l {home} && echo UNMOUNTED-HOME; "
            "umount -l /tmp && echo UNMOUNTED-TMP; "
            "mount -o remount,bind,rw / && echo REMOUNTED; "
            f"cat {data}/registry.db; echo pwned > {escape} && echo WROTE; "
            f"echo '[filter \"x\"]' >> {common}/config && echo PLANTED; true",
            a, 30, data_dir=data)
        assert run.passed, run.report()
        assert "CapEff:\t0000000000000000" in run.output and "65534" in run.output
        for marker in ("UNMOUNTED", "REMOUNTED", "PLANTED", "REGISTRY-CANARY"):
            assert marker not in run.output, run.report()
        assert not escape.exists() and (common / "config").read_bytes() == config_before

    def test_a_planted_filter_driver_never_runs(self, world):
        """The whole chain, end to end: the check plants a filter driver in the user's repo
        config and a .gitattributes naming it; relay's commit (outside the sandbox) must
        never run it."""
        project, executor, a, common = (world[k] for k in ("project", "executor", "a", "common"))
        marker = world["home"].parent / "filter-ran"
        driver = world["home"].parent / "driver.sh"
        home = Path.home()
        run = run_check(
            f"umount -l {common}; umount -l {home}; umount -l /tmp; mount -o remount,bind,rw /; "
            f"printf '#!/bin/sh\\ncat\\nid > {marker}\\n' > {driver}; chmod +x {driver}; "
            f"printf '[filter \"x\"]\\n\\tclean = {driver}\\n' >> {common}/config; "
            "printf '* filter=x\\n' > .gitattributes; echo changed >> README.md; true",
            a, 30, data_dir=world["data"])
        assert run.passed, run.report()
        sid = a.name
        payload = {"repo": str(project), "target": "main", "branch": f"relay/{sid}",
                   "worktree": str(a)}
        try:
            executor.execute(spec_id=sid, run_id="r", step="c", effect="git.commit",
                             payload={**payload, "paths": [".gitattributes", "README.md"],
                                      "message": "m"})
        except Exception:  # noqa: BLE001 - refusing is fine too; running the driver is not
            pass
        assert not marker.exists(), marker.read_text()
        assert "filter" not in (common / "config").read_text()

    def test_relays_git_refuses_a_repository_with_a_driver(self, world, tmp_path):
        """Defence in depth: a driver in the repository's config (an unsandboxed check could
        plant one) makes relay's git refuse, before the driver could run."""
        project, executor, a = world["project"], world["executor"], world["a"]
        marker = tmp_path / "driver-ran"
        git(project, "config", "filter.x.clean", f"sh -c 'cat; touch {marker}'")
        (a / ".gitattributes").write_text("* filter=x\n")
        (a / "README.md").write_text("changed\n")
        sid = a.name
        with pytest.raises(GitError, match=r"filter\.x\.clean"):
            executor.execute(spec_id=sid, run_id="r", step="c", effect="git.commit",
                             payload={"repo": str(project), "target": "main",
                                      "branch": f"relay/{sid}", "worktree": str(a),
                                      "paths": [".gitattributes", "README.md"], "message": "m"})
        assert not marker.exists()

    @pytest.mark.skipif(os.geteuid() != 0, reason="capabilities are left inside only for root")
    def test_a_sandbox_that_leaves_capabilities_is_no_sandbox(self, tmp_path):
        """The probe reads CapEff inside: a 'bwrap' that runs the command with root's
        capabilities is refused, and nothing runs."""
        fake = tmp_path / "bwrap"
        fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
        fake.chmod(0o755)
        run = check_in_worker("touch ran", tmp_path, RELAY_BWRAP=str(fake))
        assert run["refused"] and "capabilities left inside" in run["report"], run["report"]
        assert not (tmp_path / "ran").exists()


# --- limits (finding 7), a registry anywhere (finding 4), the git view (finding 5) ----------


class TestLimits:
    def test_file_size_memory_and_tmpfs_are_bounded(self, world, monkeypatch):
        monkeypatch.setenv("RELAY_CHECK_MAX_FILE_SIZE", "1M")
        monkeypatch.setenv("RELAY_CHECK_MAX_MEMORY", "512M")
        monkeypatch.setenv("RELAY_CHECK_TMPFS_SIZE", "4M")
        script = ("import os\n"
                  "try:\n    open('big', 'wb').write(b'x' * 2_000_000); print('FSIZE-NOT-LIMITED')\n"
                  "except OSError as e: print('fsize', e)\n"
                  "try:\n    b = bytearray(1 << 30); print('AS-NOT-LIMITED')\n"
                  "except MemoryError: print('as limited')\n"
                  "try:\n"
                  "    with open('/tmp/fill', 'wb') as f:\n"
                  "        for _ in range(8): f.write(b'x' * 900_000)\n"
                  "    print('TMPFS-NOT-LIMITED')\n"
                  "except OSError as e: print('tmpfs', e)\n"
                  "st = os.statvfs('/dev/shm'); print('shm', st.f_blocks * st.f_frsize)\n"
                  "print([l for l in open('/proc/self/limits') if 'processes' in l][0])\n")
        (world["a"] / "limits.py").write_text(script)
        run = run_check("python limits.py", world["a"], 60, data_dir=world["data"])
        assert run.passed, run.report()
        assert "NOT-LIMITED" not in run.output, run.report()
        shm = int(run.output.split("shm ")[1].split()[0])
        assert shm <= 64 << 20
        assert "Max processes             512                  512" in run.output, run.output

    def test_an_invalid_limit_is_an_error_not_a_default(self, world, monkeypatch):
        monkeypatch.setenv("RELAY_CHECK_MAX_PROCESSES", "lots")
        with pytest.raises(ValueError, match="RELAY_CHECK_MAX_PROCESSES"):
            run_check("true", world["a"], 30, data_dir=world["data"])


class TestHiddenFromChecks:
    def test_a_sqlite_registry_outside_the_data_dir_is_hidden(self, world, monkeypatch):
        srv = Path(tempfile.mkdtemp(prefix=".relay-registry-test-", dir=ROOT))  # not HOME, /tmp
        try:
            (srv / "registry.db").write_text("EXTERNAL-REGISTRY-CANARY")
            monkeypatch.setenv("RELAY_DATABASE_URL", f"sqlite:///{srv}/registry.db")
            run = run_check(f"cat {srv}/registry.db; ls {srv}; true", world["a"], 30,
                            data_dir=world["data"])
            assert run.passed and "EXTERNAL-REGISTRY-CANARY" not in run.output, run.report()
        finally:
            shutil.rmtree(srv, ignore_errors=True)

    def test_a_registry_in_a_system_dir_hides_only_its_files(self):
        from activities.checks import sqlite_registry_paths

        assert sqlite_registry_paths("sqlite:////srv/relay/registry.db") == [Path("/srv/relay")]
        hidden = sqlite_registry_paths("sqlite:////var/registry.db")
        assert Path("/var/registry.db") in hidden and Path("/var") not in hidden
        assert sqlite_registry_paths("postgresql://u:p@db/relay") == []

    def test_other_specs_branches_and_repo_credentials_are_not_shown(self, world):
        project, a, b = world["project"], world["a"], world["b"]
        git(project, "remote", "add", "origin", "https://user:ghp_TOKEN-CANARY@example.com/x/y")
        git(project, "config", "credential.helper", "store --file /root/.creds")
        git(b, "add", "their_work.py")
        git(b, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "theirs")
        run = run_check("git for-each-ref --format='%(refname)'; git config --list; "
                        f"git show relay/{b.name}:their_work.py; git worktree list; "
                        "git status --porcelain >/dev/null && echo STATUS-OK; "
                        "git log --oneline -1 >/dev/null && echo LOG-OK; true",
                        a, 30, data_dir=world["data"])
        assert run.passed, run.report()
        for leak in ("TOKEN-CANARY", ".creds", "WORKTREE-B-CANARY", f"heads/relay/{b.name}",
                     f"worktrees/{b.name}"):
            assert leak not in run.output, run.report()
        assert f"refs/heads/relay/{a.name}" in run.output and "refs/heads/main" in run.output
        assert "STATUS-OK" in run.output and "LOG-OK" in run.output
        # relay's own view is untouched
        assert "TOKEN-CANARY" in git(project, "config", "--get", "remote.origin.url")

    def test_packed_refs_are_filtered_too(self, world):
        project, a, b = world["project"], world["a"], world["b"]
        git(project, "pack-refs", "--all")
        run = run_check("git for-each-ref --format='%(refname)'", a, 30, data_dir=world["data"])
        assert run.passed and f"relay/{b.name}" not in run.output, run.report()
        assert f"refs/heads/relay/{a.name}" in run.output
