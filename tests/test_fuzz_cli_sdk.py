"""Generated inputs thrown at the `relay` CLI and the Python SDK.

The contract under test: no input prints a traceback or aborts the interpreter; every CLI
failure is one `error: ...` line on stderr with exit 1 (2 for a usage error); the SDK raises
RelayError subclasses only, on one line; and no input changes another spec.

hypothesis generates the inputs, derandomized and with fixed example counts, so a CI run is
reproducible and bounded in time. Most CLI calls run in-process through `relay.cli.run_cli`,
the entry point's own code path minus its final `os._exit`, because a thousand interpreter
starts would take too long; a sample runs as real `relay` processes to catch what happens only
at interpreter exit (the PyGILState_Release abort). Everything runs against the session's real
Temporal dev server, worker, scripted model and registry.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import time
import uuid
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase as HPhase, given, settings as hsettings, strategies as st

from relay import logs
from relay.cli import run_cli
from relay.client import RelayClient, RelayError
from relay.models import Limits, Phase, Role, WorkspaceInput
from tests.conftest import RELAY_CMD, cli_env, wait_for_questions
from tests.test_cli import cancel_and_wait

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # e.g. 0.1 for a quick local look; CI runs 1
CLI_EXAMPLES = int(650 * SCALE)  # in-process CLI calls
SDK_EXAMPLES = int(450 * SCALE)  # SDK calls
PROCESS_SAMPLE = max(12, int(30 * SCALE))  # real `relay` processes
CALL_TIMEOUT = 30.0  # seconds: no single bad input may take longer than this

SURROGATE = "\udcff"  # byte 0xff in argv or a file name, as Python receives it from the OS
WEIRD = ["", " ", "\t\n", SURROGATE, "a" + SURROGATE + "b", "x" * 5000, "/" + "x" * 5000,
         "/tmp/" + "y" * 300 + "/z.md", "-", "--", "[bold]", "spec[/x]", "é" * 300, "\x00",
         "nan", "q1=", "=x", "{}", "null", "~", "../..", ".lock", "a.lock", "main"]
ADDRESSES = ["127.0.0.1:1", "not an address", "127.0.0.1:99999", SURROGATE, "", "[::1"]
DATABASE_URLS = ["", "nonsense", "sqlite:////nonexistent-dir/registry.db",
                 "postgresql+psycopg://relay:s3cret@127.0.0.1:1/relay", "sqlite://" + SURROGATE]
SETTING_VALUES = ["nan", "inf", "-inf", "-1", "0", "1e300", "abc", "", " ", "3", "2592001",
                  "1001", "4.5", SURROGATE]
NUMERIC_SETTINGS = ["RELAY_MAX_FIX_ROUNDS", "RELAY_MAX_CLARIFY_ROUNDS", "RELAY_CHECK_TIMEOUT_S",
                    "RELAY_ANSWER_TIMEOUT_S", "RELAY_MODEL_MAX_ATTEMPTS", "RELAY_HEARTBEAT_TIMEOUT_S",
                    "RELAY_MAX_REQUEST_BYTES", "RELAY_TURN_TIMEOUT_S", "RELAY_EFFECT_MAX_ATTEMPTS",
                    "RELAY_MAX_TOKENS", "RELAY_MAX_TOOL_STEPS"]
ROLES = [r.value for r in Role]
# Help links and transport debug text never reach a person
NOISE = ("Traceback", "Fatal Python error", "Status { code", "sqlalche.me", "errors.pydantic.dev",
         "tonic::", "MetadataMap")
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck),
                     phases=[HPhase.explicit, HPhase.generate])


# --- strategies ----------------------------------------------------------------------------------


def texts(max_size: int = 30) -> st.SearchStrategy[str]:
    """Text a person might type, or that the OS might hand over undecodable."""
    return st.one_of(st.text(max_size=max_size), st.sampled_from(WEIRD),
                     st.text(max_size=8).map(lambda t: t + SURROGATE))


def maybe(option: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), values.map(lambda v: [option, v]))


def flag(option: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [option]])


def joined(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda lists: [arg for part in lists for arg in part])


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
        max_leaves=6)


def cli_argvs(other: str, request_files: list[str]) -> st.SearchStrategy[list[str]]:
    """Commands with generated arguments. `other` (a live spec) is a target only for commands
    that cannot change it with these inputs; cancel, watch and result get other ids."""
    plausible = st.from_regex(r"\Aspec-[0-9a-f]{1,10}\Z")
    spec = st.one_of(texts(), st.just(other), st.just(other), plausible)
    stranger = st.one_of(texts(), plausible)
    request = st.one_of(texts(200), st.just("Write a greeting module"), st.sampled_from(request_files))
    workspace = joined(maybe("-w", texts()), maybe("--target", texts()), maybe("--check", texts()),
                       flag("--auto-approve"))
    address = maybe("--address", st.sampled_from(ADDRESSES))
    answers = st.one_of(
        st.lists(texts().map(lambda t: ["--answer", t]), max_size=3).map(
            lambda pairs: [arg for pair in pairs for arg in pair]),
        st.one_of(texts(), json_values().map(json.dumps)).map(lambda t: ["--json", t]))
    extra = st.one_of(st.just([]), st.just([]), st.just([]), st.lists(
        st.sampled_from(["--json", "--bogus", "-w", "--id", "--help", "extra"]), max_size=2))
    commands = st.one_of(
        joined(st.just(["status"]), spec.map(lambda s: [s]), flag("--json"), address),
        joined(st.just(["sessions"]), spec.map(lambda s: [s]), flag("--json")),
        joined(st.just(["effects"]), spec.map(lambda s: [s]), flag("--json")),
        joined(st.just(["history"]), spec.map(lambda s: [s]),
               st.one_of(st.sampled_from(ROLES), texts()).map(lambda r: [r])),
        joined(st.sampled_from([["cancel"], ["watch"], ["result"]]), stranger.map(lambda s: [s]),
               address),
        joined(st.just(["approve"]), spec.map(lambda s: [s]), maybe("--reviewer", texts()),
               maybe("--comment", texts())),
        joined(st.just(["reject"]), spec.map(lambda s: [s]), maybe("--reason", texts()),
               maybe("--reviewer", texts())),
        joined(st.just(["compensate"]), spec.map(lambda s: [s])),
        joined(st.just(["answer"]), spec.map(lambda s: [s]), answers),
        joined(st.just(["iterate"]), spec.map(lambda s: [s]), request.map(lambda r: [r]), workspace),
        joined(st.just(["run"]), request.map(lambda r: [r]), maybe("--id", texts()), workspace),
        st.lists(texts(), min_size=1, max_size=3),  # no such command, stray options
    )
    return joined(commands, extra)


def cli_envs() -> st.SearchStrategy[dict[str, str]]:
    """Mostly the session's settings; sometimes invalid ones."""
    setting = st.one_of(
        st.tuples(st.sampled_from(NUMERIC_SETTINGS), st.sampled_from(SETTING_VALUES)),
        st.tuples(st.just("RELAY_TEMPORAL_ADDRESS"), st.sampled_from(ADDRESSES)),
        st.tuples(st.just("RELAY_DATABASE_URL"), st.sampled_from(DATABASE_URLS)),
        st.tuples(st.just("RELAY_DATA_DIR"), texts().filter(lambda t: "\x00" not in t)),
        st.tuples(st.sampled_from(["RELAY_TASK_QUEUE", "RELAY_NAMESPACE"]),
                  st.sampled_from(["", " ", "nowhere-" + uuid.uuid4().hex[:6], SURROGATE])))
    return st.one_of(st.just({}), st.just({}), st.lists(setting, min_size=1, max_size=2).map(dict))


JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.binary(max_size=8),
                 st.lists(st.integers(), max_size=2), st.just(object()),
                 st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4),
                                 max_size=2))


# over Temporal's payload limit once encoded (each control character is 6 bytes of JSON)
HUGE = ["x" * 2_200_000, "\x01" * 400_000]


def anything_text() -> st.SearchStrategy[Any]:
    return st.one_of(texts(), texts(), JUNK, st.sampled_from(HUGE))


def limits_values() -> st.SearchStrategy[Any]:
    numbers = st.one_of(st.integers(min_value=-2, max_value=2**40), st.floats(), st.text(max_size=4),
                        st.none())
    fields = st.dictionaries(st.sampled_from(sorted(Limits.model_fields)), numbers, max_size=3)
    return st.one_of(st.none(), JUNK, fields, fields.map(lambda f: Limits.model_construct(**f)))


def workspace_values() -> st.SearchStrategy[Any]:
    fields = st.dictionaries(st.sampled_from(["path", "target", "check", "bogus"]),
                             anything_text(), max_size=3)
    return st.one_of(st.none(), JUNK, texts(), fields,
                     fields.map(lambda f: WorkspaceInput.model_construct(**f)))


def answer_values() -> st.SearchStrategy[Any]:
    def harmless(answers: Any) -> bool:  # a complete, valid answer would move the live spec on
        return not (isinstance(answers, dict) and {"q1", "q2"} <= set(answers))
    return st.one_of(JUNK, texts(), st.dictionaries(anything_text(), anything_text(), max_size=3),
                     st.dictionaries(st.sampled_from(["q1", "q2", "zz"]), anything_text(),
                                     max_size=2)).filter(harmless)


def sdk_calls(other: str) -> st.SearchStrategy[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    plausible = st.from_regex(r"\Aspec-[0-9a-f]{1,10}\Z")
    spec = st.one_of(anything_text(), st.just(other), st.just(other), plausible)
    stranger = st.one_of(anything_text(), plausible)
    call = lambda name, *args, **kwargs: st.tuples(  # noqa: E731
        st.just(name), st.tuples(*args), st.fixed_dictionaries({}, optional=kwargs))
    start_options = dict(limits=limits_values(), workspace=workspace_values(), auto_approve=JUNK,
                         hooks=st.one_of(JUNK, st.lists(JUNK | st.dictionaries(
                             st.sampled_from(["effect", "payload", "at"]), JUNK, max_size=3),
                             max_size=2)))
    return st.one_of(
        call("run", anything_text(), spec_id=anything_text(), **start_options),
        call("iterate", spec, anything_text(), **start_options),
        call("answer", spec, answer_values()),
        call("approve", spec, reviewer=anything_text(), comment=anything_text()),
        call("reject", spec, anything_text(), reviewer=anything_text()),
        call("cancel", stranger), call("result", stranger),
        call("status", spec), call("compensate", spec), call("effects", spec),
        call("sessions", spec), call("history", spec, st.one_of(st.sampled_from(ROLES), JUNK)),
        call("orchestration_state", spec), call("registry_problem", spec),
    )


# --- running and judging one input ---------------------------------------------------------------


def judge_cli(argv: list[str], code: int, out: str, err: str) -> None:
    shown = f"argv={argv!r}\nexit {code}\nstdout:\n{out[-1500:]}\nstderr:\n{err[-1500:]}"
    assert code in (0, 1, 2), shown
    assert not any(word in out + err for word in NOISE), shown
    if code != 0:
        lines = [line for line in err.splitlines()
                 if line.strip() and not line.startswith("{")]  # JSON log records aside
        assert len(lines) == 1 and lines[0].startswith("error: "), shown


def judge_sdk_error(call: Any, exc: BaseException) -> None:
    assert isinstance(exc, RelayError), f"{call!r} raised {type(exc).__name__}: {exc!r}"
    message = str(exc)
    assert message and "\n" not in message, f"{call!r}: {message!r}"
    assert not any(word in message for word in NOISE), f"{call!r}: {message!r}"


def in_process(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """`relay ARGV` in this process with `env` as its RELAY_* settings; (code, stdout, stderr)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("RELAY_", "ANTHROPIC_"))}
    out, err, stdin = io.StringIO(), io.StringIO(), sys.stdin
    try:
        for key in saved:
            del os.environ[key]
        os.environ.update(env)
        sys.stdin = io.StringIO("")  # not a terminal: nothing asks questions
        with redirect_stdout(out), redirect_stderr(err):
            code = run_cli(argv)
    finally:
        sys.stdin = stdin
        for key in [k for k in os.environ if k.startswith(("RELAY_", "ANTHROPIC_"))]:
            del os.environ[key]
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def started_id(argv: list[str], code: int, out: str) -> str | None:
    """The id a successful `relay run` printed (to be terminated afterwards)."""
    if code == 0 and argv[:1] == ["run"] and "--help" not in argv and out.strip():
        return out.strip().splitlines()[0]
    return None


# --- the live spec that must not change ----------------------------------------------------------


async def snapshot(relay: RelayClient, registry: Any, sid: str) -> dict[str, Any]:
    """Everything about a spec that a stray input could change: Temporal's view and the registry's."""
    st_ = await relay.status(sid)
    sessions = registry.sessions(sid)
    record = registry.spec(sid).model_dump(exclude={"updated_at"})
    return {"status": st_.model_dump(mode="json"), "record": record,
            "sessions": [s.model_dump(exclude={"updated_at", "lease_until"}) for s in sessions],
            "messages": {s.id: [m.model_dump(mode="json") for m in registry.messages(s.id)]
                         for s in sessions}}


# --- the suite -----------------------------------------------------------------------------------


async def test_generated_inputs_never_escape_as_tracebacks(relay, settings, registry, client,
                                                          tmp_path):
    """≥ 1,000 generated CLI and SDK inputs: one-line errors only, RelayError only, exit codes
    0/1/2, no abort at exit, and the live spec next to them unchanged."""
    began = time.monotonic()
    other = await relay.run("Write a greeting module", spec_id=f"fuzz-live-{uuid.uuid4().hex[:8]}")
    await wait_for_questions(relay, other)
    before = await snapshot(relay, registry, other)

    bad_file = tmp_path / "latin1.md"
    bad_file.write_bytes(b"caf\xe9 \xff\xfe request")  # not UTF-8
    request_files = [str(bad_file), str(tmp_path / "missing.md"), str(tmp_path)]
    # specs the fuzz starts land on a queue no worker polls, so they cost nothing; ended below
    idle_queue = f"fuzz-idle-{uuid.uuid4().hex[:8]}"
    env = cli_env(settings) | {"RELAY_TASK_QUEUE": idle_queue, "RELAY_LOG_LEVEL": "error"}
    started: list[str] = []
    try:
        counts = {
            "cli": await asyncio.to_thread(fuzz_cli, other, request_files, env, started),
            "sdk": await asyncio.to_thread(fuzz_sdk, other, settings, idle_queue, started),
            "processes": await fuzz_processes(other, request_files, env, started),
        }
    finally:
        logs.configure("json", "info")  # the in-process CLI pointed logging at its buffers
        await terminate(client, started)

    assert sum(counts.values()) >= 1_000 * SCALE, counts
    assert await snapshot(relay, registry, other) == before
    assert (await relay.status(other)).phase == Phase.waiting_for_answers
    await cancel_and_wait(relay, other)
    print(f"fuzzed {counts} in {time.monotonic() - began:.0f} s")


def fuzz_cli(other: str, request_files: list[str], env: dict[str, str],
             started: list[str]) -> int:
    calls = 0

    @hsettings(max_examples=CLI_EXAMPLES, **FUZZ_SETTINGS)
    @given(argv=cli_argvs(other, request_files), overrides=cli_envs())
    def one(argv: list[str], overrides: dict[str, str]) -> None:
        nonlocal calls
        calls += 1
        code, out, err = in_process(argv, env | overrides)
        judge_cli(argv, code, out, err)
        if sid := started_id(argv, code, out):
            started.append(sid)

    one()
    return calls


def fuzz_sdk(other: str, settings: Any, idle_queue: str, started: list[str]) -> int:
    """SDK calls on a loop of this thread's own (the test's loop keeps serving the worker)."""
    loop = asyncio.new_event_loop()
    calls = 0
    try:
        good = settings.model_copy(update={"task_queue": idle_queue})
        client = loop.run_until_complete(RelayClient.connect(good))
        # settings changed after loading are not re-validated by pydantic: the SDK must notice
        broken = RelayClient(client.temporal, good.model_copy(update={"max_fix_rounds": 0,
                                                                       "check_timeout_s": float("nan")}))

        @hsettings(max_examples=SDK_EXAMPLES, **FUZZ_SETTINGS)
        @given(call=sdk_calls(other), use_broken=st.booleans())
        def one(call: tuple[str, tuple[Any, ...], dict[str, Any]], use_broken: bool) -> None:
            nonlocal calls
            calls += 1
            name, args, kwargs = call
            target = broken if use_broken else client
            try:
                value = getattr(target, name)(*args, **kwargs)
                if asyncio.iscoroutine(value):
                    value = loop.run_until_complete(asyncio.wait_for(value, CALL_TIMEOUT))
            except Exception as exc:  # noqa: BLE001 - the assertion is on its type
                judge_sdk_error(call, exc)
                return
            if name == "run" and isinstance(value, str):
                started.append(value)

        one()
    finally:
        loop.close()
    return calls


async def fuzz_processes(other: str, request_files: list[str], env: dict[str, str],
                         started: list[str]) -> int:
    """A sample of the same inputs as real `relay` processes, two at a time: exit codes and
    stderr as a shell sees them, including any abort while the interpreter shuts down."""
    sample: list[tuple[list[str], dict[str, str]]] = [
        (["status", ""], {}), (["run", "Write a module", "--target", ""], {}),
        (["status", "a" + SURROGATE], {}), (["run", request_files[0]], {}),
        (["run", "Write a module", "-w", "/" + "x" * 5000], {}),
        (["run", "Write a module"], {"RELAY_CHECK_TIMEOUT_S": "nan"}),
        (["status", other], {"RELAY_MAX_FIX_ROUNDS": "0"}), (["nosuch"], {}),
        (["status", "x", "--address", "127.0.0.1:1"], {}), (["status", other], {}),
    ]

    @hsettings(max_examples=PROCESS_SAMPLE - len(sample), **FUZZ_SETTINGS)
    @given(argv=cli_argvs(other, request_files), overrides=cli_envs())
    def collect(argv: list[str], overrides: dict[str, str]) -> None:
        if not any("\x00" in arg for arg in argv):  # exec cannot pass a NUL byte
            sample.append((argv, overrides))

    await asyncio.to_thread(collect)
    gate = asyncio.Semaphore(2)

    async def one(argv: list[str], overrides: dict[str, str]) -> None:
        async with gate:
            proc = await asyncio.create_subprocess_exec(
                *RELAY_CMD, *argv, env=env | overrides, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), CALL_TIMEOUT + 30)
        text_out = out.decode(errors="replace")
        judge_cli(argv, proc.returncode, text_out, err.decode(errors="replace"))
        if sid := started_id(argv, proc.returncode, text_out):
            started.append(sid)

    await asyncio.gather(*(one(argv, overrides) for argv, overrides in sample))
    return len(sample)


async def terminate(client: Any, spec_ids: list[str]) -> None:
    for sid in spec_ids:
        try:
            await client.get_workflow_handle(sid).terminate("fuzz input")
        except Exception:  # noqa: BLE001 - already ended, or never started
            pass
