"""The `relay` command line: run the embedded server, start specs, answer, watch, inspect.

Every command is a thin shell over RelayClient (or the worker bootstrap);
every failure a person can cause prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.main
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from rich.console import Console
from rich.prompt import Confirm, Prompt
from rich.text import Text
from typer import Abort
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from relay import logs, one_line, view
from relay.client import InvalidAnswer, RelayClient, RelayError, SpecFailed, validation_problem
from relay.models import Phase, Question
from relay.settings import RelaySettings, load_settings

app = typer.Typer(help="relay: a durable five-agent pipeline on Temporal.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

Address = Annotated[Optional[str], typer.Option("--address", help="Temporal HOST:PORT "
                    "(default: RELAY_TEMPORAL_ADDRESS, else the running `relay dev`, else 127.0.0.1:7233)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]
DEV_FILE = "dev.json"
TERMINAL = {Phase.completed, Phase.failed, Phase.cancelled}


def fail(message: object) -> None:
    """Print one line `error: ...` to stderr, whatever the message contains (undecodable bytes
    included: one_line escapes them, so printing cannot fail in turn)."""
    err.print(Text.assemble(("error:", "red"), " ", one_line(message, 2000)), soft_wrap=True)


def say(message: str) -> None:
    """A plain line on stdout (ids and acknowledgements that scripts capture)."""
    out.print(Text(message), soft_wrap=True)


def settings_for(address: str | None = None) -> RelaySettings:
    """Settings from the environment; the address of a running `relay dev` when none is set.
    An invalid RELAY_* value ends the command with `error: invalid setting RELAY_X: ...`."""
    settings = load_settings()
    if address:
        settings.temporal_address = address
    elif "RELAY_TEMPORAL_ADDRESS" not in os.environ:
        try:  # a stale, unreadable or foreign dev.json is no address at all
            info = json.loads((settings.data_dir / DEV_FILE).read_text(encoding="utf-8"))
            os.kill(int(info["pid"]), 0)
            settings.temporal_address = str(info["address"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    logs.configure(settings.log_format, settings.log_level)
    return settings


def run_async(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except RelayError as exc:
        fail(exc)
        raise typer.Exit(1) from None


async def _client(address: str | None) -> RelayClient:
    return await RelayClient.connect(settings_for(address))


Workspace = Annotated[Optional[Path], typer.Option(
    "--workspace", "-w", help="Git repository to work on (default: a fresh one in the data dir)")]
Target = Annotated[str, typer.Option("--target", help="Branch the change is delivered to")]
Check = Annotated[Optional[str], typer.Option(
    "--check", help='Check command the validator runs, e.g. "pytest -q"')]
AutoApprove = Annotated[bool, typer.Option(
    "--auto-approve", help="Deliver without waiting for a human's approval")]


def _workspace(path: Path | None, target: str, check: str | None) -> dict[str, Any]:
    """The workspace as plain fields: the client checks them and says what is wrong."""
    return {"path": str(path) if path else None, "target": target, "check": check}


# --- servers -----------------------------------------------------------------------


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def _embedded(settings: RelaySettings, port: int | None, ui_port: int | None, ui: bool,
                    stop: asyncio.Event, ready: asyncio.Event) -> None:
    """Dev server + worker (+ scripted model) until `stop` is set; everything stopped after."""
    from worker.devserver import DevServer
    from worker.main import run_worker

    server = DevServer(settings.data_dir / "temporal", port=port or 7233,
                       ui_port=ui_port or 8233, ui=ui)
    await server.start()
    dev_file = settings.data_dir / DEV_FILE
    dev_file.write_text(json.dumps({"address": server.address, "ui": server.ui_url, "pid": os.getpid()}))
    settings.temporal_address = server.address
    err.print(f"Temporal dev server at [bold]{server.address}[/bold]"
              + (f", Web UI at [bold]{server.ui_url}[/bold]" if server.ui_url else ""))
    try:
        await run_worker(settings, stop, ready=ready)
    finally:
        dev_file.unlink(missing_ok=True)
        server.stop()


@app.command()
def dev(port: Annotated[Optional[int], typer.Option(help="Temporal port (default 7233 or a free one)")] = None,
        ui_port: Annotated[Optional[int], typer.Option(help="Web UI port (default 8233 or a free one)")] = None,
        headless: Annotated[bool, typer.Option(help="No Web UI")] = False) -> None:
    """Run the embedded Temporal dev server, a worker and (without an API key) the scripted model."""
    settings = settings_for()

    async def serve() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        _stop_on_signals(stop)
        task = asyncio.create_task(_embedded(settings, port, ui_port, not headless, stop, ready))
        await asyncio.wait([task, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            err.print("relay worker running; press Ctrl-C to stop everything.")
        await task

    run_async(serve())


@app.command()
def worker(address: Address = None,
           task_queue: Annotated[Optional[str], typer.Option(help="Task queue (RELAY_TASK_QUEUE)")] = None) -> None:
    """Run a worker against any Temporal server (the production path)."""
    settings = settings_for(address)
    if task_queue:
        settings.task_queue = task_queue

    async def serve() -> None:
        from worker.main import run_worker

        stop = asyncio.Event()
        _stop_on_signals(stop)
        await run_worker(settings, stop)  # unreachable Temporal or registry: a RelayError

    run_async(serve())


@app.command()
def demo(auto_answer: Annotated[bool, typer.Option(
             help="Answer the clarifier's questions and approve delivery automatically")] = False,
         keep_running: Annotated[bool, typer.Option(help="Keep the server and worker up afterwards")] = False,
         headless: Annotated[bool, typer.Option(help="No Web UI")] = False,
         example: Annotated[str, typer.Option(help="greeting | greeting-fix")] = "greeting",
         workspace: Workspace = None, target: Target = "main", check: Check = None) -> None:
    """The main job end to end: embedded server + worker + an example spec."""
    settings = settings_for()
    if "RELAY_LOG_LEVEL" not in os.environ:  # the demo shows the pipeline, not the worker's log
        logs.configure(settings.log_format, "warning")
    try:
        request = view.example_spec(example)
    except ValueError as exc:
        fail(exc)
        raise typer.Exit(1) from None

    async def go() -> int:
        stop, ready = asyncio.Event(), asyncio.Event()
        _stop_on_signals(stop)
        embedded = asyncio.create_task(_embedded(settings, None, None, not headless, stop, ready))
        await asyncio.wait([embedded, asyncio.create_task(ready.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if embedded.done():
            embedded.result()
        try:
            rc = await RelayClient.connect(settings)
            spec_id = await rc.run(request, workspace=_workspace(workspace, target, check))
            say(f"Started spec {spec_id} from the example request:\n{request}\n")
            code = await follow(rc, spec_id, "auto" if auto_answer else "interactive")
            if keep_running:
                err.print("Still running; press Ctrl-C to stop.")
                await stop.wait()
            return code
        finally:
            stop.set()
            await embedded

    raise typer.Exit(run_async(go()))


# --- specs -------------------------------------------------------------------------------


@app.command()
def run(request: Annotated[str, typer.Argument(help="The request text, or a file holding it")],
        spec_id: Annotated[Optional[str], typer.Option("--id", help="Spec id (default: generated)")] = None,
        follow_: Annotated[bool, typer.Option("--follow", help="Follow it and ask questions here")] = False,
        workspace: Workspace = None, target: Target = "main", check: Check = None,
        auto_approve: AutoApprove = False, address: Address = None) -> None:
    """Start a spec."""
    text = _request_text(request)

    async def go() -> int:
        rc = await _client(address)
        sid = await rc.run(text, spec_id=spec_id, workspace=_workspace(workspace, target, check),
                           auto_approve=auto_approve)
        say(sid)
        return await follow(rc, sid, "interactive") if follow_ else 0

    raise typer.Exit(run_async(go()))


@app.command()
def iterate(spec_id: str, change_request: Annotated[str, typer.Argument(help="The change, or a file")],
            follow_: Annotated[bool, typer.Option("--follow")] = False,
            workspace: Workspace = None, target: Target = "main", check: Check = None,
            auto_approve: AutoApprove = False, address: Address = None) -> None:
    """Start the next iteration of a finished spec; every agent resumes its session."""
    text = _request_text(change_request)

    async def go() -> int:
        rc = await _client(address)
        await rc.iterate(spec_id, text, workspace=_workspace(workspace, target, check),
                         auto_approve=auto_approve)
        say(f"{spec_id}: next iteration started")
        return await follow(rc, spec_id, "interactive") if follow_ else 0

    raise typer.Exit(run_async(go()))


@app.command()
def answer(spec_id: str,
           answers: Annotated[Optional[list[str]], typer.Option("--answer", "-a", help="ID=TEXT, repeatable")] = None,
           as_json: Annotated[Optional[str], typer.Option("--json", help='{"q1": "...", ...}')] = None,
           address: Address = None) -> None:
    """Show the clarifier's pending questions and answer them."""

    async def go() -> None:
        rc = await _client(address)
        status = await rc.status(spec_id)
        if status.pending is None:
            raise InvalidAnswer(f"spec {spec_id} has no pending questions (phase: {status.phase.value})")
        view.print_questions(out, status.pending.questions)
        if as_json is not None:
            given = parse_answers_json(as_json)
        elif answers:
            given = parse_answer_pairs(answers)
        elif sys.stdin.isatty():
            given = ask(status.pending.questions)
        else:
            raise InvalidAnswer("no answers given: use --answer ID=TEXT or --json, or run in a terminal")
        ack = await rc.answer(spec_id, given)
        say(f"accepted answers {', '.join(ack.accepted)} (round {ack.round})")

    run_async(go())


@app.command()
def approve(spec_id: str, reviewer: Annotated[Optional[str], typer.Option(help="Who approves")] = None,
            comment: Annotated[Optional[str], typer.Option(help="A note kept with the decision")] = None,
            address: Address = None) -> None:
    """Approve delivery of the validated change (merge into the target branch)."""

    async def go() -> None:
        await (await _client(address)).approve(spec_id, reviewer=reviewer, comment=comment)
        say(f"{spec_id}: approved; delivering")

    run_async(go())


@app.command()
def reject(spec_id: str, reason: Annotated[str, typer.Option(help="Why (kept with the decision)")],
           reviewer: Annotated[Optional[str], typer.Option(help="Who rejects")] = None,
           address: Address = None) -> None:
    """Reject the change; every side effect of the run is compensated."""

    async def go() -> None:
        await (await _client(address)).reject(spec_id, reason, reviewer=reviewer)
        say(f"{spec_id}: rejected; compensating")

    run_async(go())


@app.command()
def compensate(spec_id: str, address: Address = None) -> None:
    """Re-run the compensations still pending (e.g. marked needs_human) for a spec."""

    async def go() -> int:
        report = await (await _client(address)).compensate(spec_id)
        for ref in report.compensated:
            say(f"compensated {ref.effect} ({ref.step})")
        for ref in report.needs_human:
            say(f"still needs a human: {ref.effect} ({ref.step}): {ref.error}")
        if not report.compensated and not report.needs_human:
            say(f"{spec_id}: nothing to compensate")
        return 1 if report.needs_human else 0

    raise typer.Exit(run_async(go()))


@app.command()
def effects(spec_id: str, as_json: AsJson = False) -> None:
    """The spec's effects ledger: every side effect, its key, status and result."""
    rows = _registry_read(lambda rc: rc.effects(spec_id))
    _show_rows(rows, as_json, lambda: view.print_effects(out, rows))


@app.command()
def status(spec_id: str, as_json: AsJson = False, address: Address = None) -> None:
    """Phase, current agent, rounds, pending questions, sessions and token usage."""

    async def go() -> None:
        rc = await _client(address)
        st = await rc.status(spec_id)
        # Temporal holds the status; the registry only the conversations. While the registry
        # is down the status is still true, and it says the registry is down.
        problem = await rc.registry_problem(spec_id)
        if as_json:
            out.print_json(st.model_dump_json())
            if problem:
                err.print(Text(f"warning: registry unreachable: {one_line(problem)}"), soft_wrap=True)
        else:
            view.print_status(out, st, registry_problem=problem)

    run_async(go())


@app.command()
def watch(spec_id: str, address: Address = None) -> None:
    """Follow a spec until it ends (answers are given elsewhere)."""

    async def go() -> int:
        return await follow(await _client(address), spec_id, "none")

    raise typer.Exit(run_async(go()))


@app.command()
def result(spec_id: str, as_json: AsJson = False, address: Address = None) -> None:
    """Wait for the spec's current run and print its result."""

    async def go() -> None:
        res = await (await _client(address)).result(spec_id)
        out.print_json(res.model_dump_json()) if as_json else view.print_result(out, res)

    run_async(go())


@app.command()
def cancel(spec_id: str, address: Address = None) -> None:
    """Cancel a running spec."""

    async def go() -> None:
        await (await _client(address)).cancel(spec_id)
        say(f"{spec_id}: cancellation requested")

    run_async(go())


def _registry_read(read: Any) -> Any:
    """Run a registry-only read (no Temporal needed); a RelayError ends the command."""
    try:
        return read(RelayClient(None, settings_for()))  # type: ignore[arg-type]
    except RelayError as exc:
        fail(exc)
        raise typer.Exit(1) from None


def _show_rows(rows: list[Any], as_json: bool, table: Any) -> None:
    if as_json:
        out.print_json(json.dumps([r.model_dump(mode="json") for r in rows]))
    else:
        table()


@app.command()
def sessions(spec_id: str, as_json: AsJson = False) -> None:
    """The agents' sessions of a spec (the handshake registry)."""
    rows = _registry_read(lambda rc: rc.sessions(spec_id))
    _show_rows(rows, as_json, lambda: view.print_sessions(out, rows))


@app.command()
def history(spec_id: str, role: str, as_json: AsJson = False) -> None:
    """One agent's whole conversation for a spec."""
    session, messages = _registry_read(lambda rc: rc.history(spec_id, role))
    _show_rows(messages, as_json, lambda: view.print_history(out, session, messages))


# --- following and answering ---------------------------------------------------------------


async def follow(rc: RelayClient, spec_id: str, answer_mode: str) -> int:
    """Print phase changes until the run ends; answer questions per `answer_mode`.

    answer_mode: "interactive" (ask on the terminal), "auto" (scripted answers), "none".
    """
    last = None
    answered_round = 0
    asked_approval = False
    while True:
        st = await rc.status(spec_id)
        line = view.progress_line(st)
        if line != last:
            say(line)
            last = line
        if st.phase in TERMINAL:
            break
        if st.pending and st.pending.round > answered_round:
            answered_round = st.pending.round  # each round is handled once
            if answer_mode == "auto" or (answer_mode == "interactive" and sys.stdin.isatty()):
                view.print_questions(out, st.pending.questions)
                given = (auto_answers(st.pending.questions) if answer_mode == "auto"
                         else ask(st.pending.questions))
                try:
                    await rc.answer(spec_id, given)
                except InvalidAnswer as exc:
                    err.print(Text(str(exc), style="yellow"), soft_wrap=True)
            else:
                say(f"waiting for answers: run relay answer {spec_id}")
                if answer_mode == "interactive":
                    return 0
        if st.phase == Phase.waiting_for_approval and not asked_approval:
            asked_approval = True
            interactive = answer_mode == "interactive" and sys.stdin.isatty()
            if answer_mode == "auto" or interactive:
                say(f"waiting for {st.waiting_for}")
                if answer_mode == "auto" or Confirm.ask("Approve delivery?", default=True):
                    await rc.approve(spec_id, reviewer="auto" if answer_mode == "auto" else None)
                else:
                    await rc.reject(spec_id, Prompt.ask("Reason") or "rejected at the terminal")
            else:
                say(f"waiting for approval: run relay approve {spec_id} or relay reject {spec_id} "
                    "--reason ...")
                if answer_mode == "interactive":
                    return 0
        await asyncio.sleep(0.25)
    try:
        view.print_result(out, await rc.result(spec_id))
        return 0
    except SpecFailed as exc:
        fail(exc)
        return 1


def auto_answers(questions: list[Question]) -> dict[str, str]:
    return {q.id: f"(auto-answer) use your best judgement for: {q.text}" for q in questions}


def ask(questions: list[Question]) -> dict[str, str]:
    given = {}
    for q in questions:
        text = ""
        while not text.strip():
            text = Prompt.ask(f"[bold]{q.id}[/bold] {q.text}")
        given[q.id] = text
    return given


def parse_answers_json(raw: str) -> dict[str, str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(f"malformed JSON in --json: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("answers"), dict):
        data = data["answers"]
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InvalidAnswer('--json must be an object of question id to text, e.g. {"q1": "yes"}')
    return data


def parse_answer_pairs(pairs: list[str]) -> dict[str, str]:
    given = {}
    for pair in pairs:
        qid, sep, text = pair.partition("=")
        if not sep or not qid.strip():
            raise InvalidAnswer(f"--answer takes ID=TEXT, got {pair!r}")
        given[qid.strip()] = text
    return given


def _request_text(arg: str) -> str:
    """The argument itself, or the contents of the file it names."""
    path = Path(arg)
    try:
        is_file = len(arg) < 4096 and "\n" not in arg and path.is_file()
    except (OSError, ValueError):  # too long to be a file name: it is the request itself
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            fail(f"{arg} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})")
            raise typer.Exit(1) from None
        except OSError as exc:
            fail(f"cannot read {arg}: {exc.strerror or exc}")
            raise typer.Exit(1) from None
    if not any(c.isspace() for c in arg.strip()) and path.suffix in {".md", ".txt", ".json"}:
        fail(f"file not found: {arg}")
        raise typer.Exit(1)
    return arg


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code; every failure is one `error: ...` line.

    0 success, 1 a failure (RelayError or anything else), 2 a usage error (as click has it).
    Click runs outside its standalone mode so that its usage errors come back here and are
    printed as one line, like every other error."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="relay",
                            standalone_mode=False)
        return code if isinstance(code, int) else 0
    except NoArgsIsHelpError:
        return 2  # the help has been printed
    except ClickException as exc:
        fail(f"{exc.format_message()} (see relay --help)")
        return exc.exit_code
    except Abort:
        fail("aborted")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        fail("interrupted")
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # the floor: whatever escaped, one line and exit 1
        fail(_unexpected(exc))
        return 1


def _unexpected(exc: Exception) -> str:
    if isinstance(exc, RelayError):
        return str(exc)
    if isinstance(exc, ValidationError):
        return f"invalid input: {validation_problem(exc)}"
    if isinstance(exc, SQLAlchemyError):
        return f"the relay registry failed: {getattr(exc, 'orig', None) or exc}"
    if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
        return "output closed"
    return f"{type(exc).__name__}: {exc}"


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass


def main() -> None:
    """Entry point. Exits through os._exit on every path, errors included: a process that used
    a Temporal client can abort at interpreter exit (temporalio/sdk-python#300)."""
    code = 1
    try:
        code = run_cli()
    finally:
        _flush()
        os._exit(code)


if __name__ == "__main__":
    main()
