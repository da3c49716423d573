"""The `relay` command line: run the embedded server, start specs, answer, watch, inspect.

Every command is a thin shell over RelayClient (or the worker bootstrap);
every failure a person can cause prints one line `error: ...` and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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
from rich.markup import escape
from rich.text import Text
from typer import Abort
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from relay import logs, one_line, view
from relay.client import (DEFAULT_ADDRESS, InvalidAnswer, RelayClient, RelayError, SpecFailed,
                          validation_problem)
from relay.models import Phase, Question
from relay.settings import RelaySettings, load_settings

app = typer.Typer(help="relay: a durable five-agent pipeline on Temporal.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
# soft_wrap: a line is never cut at the console's width (80 when piped), so `relay status X |
# grep ...` finds whole phrases; tables still fit the width
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Address = Annotated[Optional[str], typer.Option("--address", help="Temporal HOST:PORT "
                    "(default: RELAY_TEMPORAL_ADDRESS, else TEMPORAL_ADDRESS or the temporal.toml "
                    "profile, else the running `relay dev`, else 127.0.0.1:7233)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]
TERMINAL = {Phase.completed, Phase.failed, Phase.cancelled}


def fail(message: object) -> None:
    """Print one line `error: ...` to stderr, whatever the message contains (undecodable bytes
    included: one_line escapes them, so printing cannot fail in turn)."""
    err.print(Text.assemble(("error:", "red"), " ", one_line(message, 2000)), soft_wrap=True)


def say(message: str) -> None:
    """A plain line on stdout (ids and acknowledgements that scripts capture)."""
    out.print(Text(message), soft_wrap=True)


def settings_for() -> RelaySettings:
    """Settings from the environment. Where Temporal is (--address, RELAY_*, TEMPORAL_*, the
    running `relay dev`) is decided when connecting, by relay.client.temporal_target, the same
    for the CLI and the SDK. An invalid RELAY_* value ends the command with
    `error: invalid setting RELAY_X: ...`."""
    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    return settings


def run_async(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except RelayError as exc:
        fail(exc)
        raise typer.Exit(1) from None


async def _client(address: str | None) -> RelayClient:
    return await RelayClient.connect(settings_for(), address=address)


Workspace = Annotated[Optional[Path], typer.Option(
    "--workspace", "-w", help="Git repository to work on (default: a fresh one in the data dir)")]
Target = Annotated[str, typer.Option("--target", help="Branch the change is delivered to")]
Check = Annotated[Optional[str], typer.Option(
    "--check", help='Check command the validator runs, e.g. "pytest -q"')]
AutoApprove = Annotated[bool, typer.Option(
    "--auto-approve", help="Deliver without waiting for a human's approval")]
BudgetUsd = Annotated[Optional[float], typer.Option(
    "--budget-usd", help="The spec's budget in USD, all agents and iterations "
    "(default RELAY_BUDGET_USD; unset: no limit)")]
BudgetTokens = Annotated[Optional[int], typer.Option(
    "--budget-tokens", help="The spec's budget in tokens (default RELAY_BUDGET_TOKENS)")]


def _workspace(path: Path | None, target: str, check: str | None) -> dict[str, Any]:
    """The workspace as plain fields: the client checks them and says what is wrong."""
    return {"path": str(path) if path else None, "target": target, "check": check}


# --- servers -----------------------------------------------------------------------
#
# `relay dev` and `relay demo` supervise a dev server and a worker process (worker/dev.py says
# why the worker is a process of its own). Every way out stops both: Ctrl-C, SIGTERM and a
# closed terminal (SIGHUP) through the handlers below, a SIGKILL through the children's
# parent-death signal. What the specs did stays in the data directory.

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "terminal closed"}


class Interrupted(Exception):
    """The user (or the system) asked relay to stop: a signal, or the end of input at a prompt."""

    def __init__(self, why: str, code: int) -> None:
        super().__init__(why)
        self.why, self.code = why, code


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP turned into an event the running command races against.

    Handled by the event loop, so they arrive while a prompt waits (the prompt is asynchronous)
    and while children are being stopped (a second Ctrl-C does not cut the cleanup short)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signum: int | None = None
        loop = asyncio.get_running_loop()
        for sig in SIGNAL_NAMES:
            loop.add_signal_handler(sig, self._set, sig)

    def _set(self, sig: int) -> None:
        if self.signum is None:
            self.signum = sig
        self.event.set()

    def interrupted(self) -> Interrupted:
        sig = self.signum or signal.SIGTERM
        return Interrupted(SIGNAL_NAMES.get(sig, f"signal {sig}"), 128 + sig)

    async def race(self, main: Any, *guards: Any) -> Any:
        """The result of `main`, unless a signal comes first (Interrupted) or a guard (a
        coroutine that only ever raises, e.g. the worker's death watch) fails first."""
        task = asyncio.ensure_future(main)
        others = [asyncio.ensure_future(g) for g in guards]
        stopped = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait([task, stopped, *others], return_when=asyncio.FIRST_COMPLETED)
            if self.event.is_set():  # checked first: a closed terminal also fails the output
                raise self.interrupted()
            for other in others:
                if other.done():
                    other.result()
            return task.result()
        finally:
            for t in (task, stopped, *others):
                t.cancel()
            await asyncio.gather(task, stopped, *others, return_exceptions=True)


def _quietly(show: Any) -> None:
    """Print what should be said on the way out; a terminal that is gone is no error."""
    try:
        show()
        _flush()
    except (OSError, ValueError):
        pass


def _announce(stack: Any, ui_hint: bool = True) -> None:
    err.print(f"Temporal dev server at [bold]{stack.address}[/bold]"
              + (f", Web UI at [bold]{stack.ui_url}[/bold]" if stack.ui_url and ui_hint else ""))


@app.command()
def dev(port: Annotated[Optional[int], typer.Option(
            min=1, max=65535, help="Temporal port (default 7233 or a free one)")] = None,
        ui_port: Annotated[Optional[int], typer.Option(
            min=1, max=65535, help="Web UI port (default 8233 or a free one)")] = None,
        headless: Annotated[bool, typer.Option(help="No Web UI")] = False) -> None:
    """Run the embedded Temporal dev server, a worker and (without an API key) the scripted model."""
    settings = settings_for()

    async def serve() -> int:
        from worker.dev import DevStack

        stop = StopSignals()
        stack = DevStack(settings, port=port, ui_port=ui_port, ui=not headless)
        try:
            await stop.race(stack.start())
            _announce(stack)
            err.print("relay worker running; press Ctrl-C to stop everything.")
            await stop.race(stack.watch())
        except Interrupted:
            pass
        finally:
            await stack.stop()
        _quietly(lambda: err.print(f"\nStopped the dev server and the worker. Specs are kept in "
                                   f"{settings.data_dir}; run relay dev again to resume them."))
        return 0

    raise typer.Exit(run_async(serve()))


@app.command()
def worker(address: Address = None,
           task_queue: Annotated[Optional[str], typer.Option(help="Task queue (RELAY_TASK_QUEUE)")] = None) -> None:
    """Run a worker against any Temporal server (the production path)."""
    settings = settings_for()
    if task_queue:
        settings.task_queue = task_queue

    async def serve() -> None:
        from relay.client import connect_settings
        from worker.main import run_worker

        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        client = await connect_settings(settings, address)  # relay's order of precedence
        await run_worker(settings, stop, client=client)  # unreachable registry: a RelayError

    run_async(serve())


@app.command()
def demo(auto_answer: Annotated[bool, typer.Option(
             help="Answer the clarifier's questions and approve delivery automatically")] = False,
         keep_running: Annotated[bool, typer.Option(help="Keep the server and worker up afterwards")] = False,
         headless: Annotated[bool, typer.Option(help="No Web UI")] = False,
         example: Annotated[str, typer.Option(help="greeting | greeting-fix")] = "greeting",
         workspace: Workspace = None, target: Target = "main", check: Check = None) -> None:
    """The main job end to end: embedded server + worker + an example spec.

    Without a terminal to ask on, it needs --auto-answer (it answers and approves by itself) or
    --keep-running (the server stays up and it prints the commands that answer)."""
    settings = settings_for()
    terminal = sys.stdin.isatty()
    if not terminal and not auto_answer and not keep_running:
        # Refused before anything starts: nothing is left half-done, and the way on is named.
        fail("relay demo asks its questions on a terminal, and stdin is not one. Run "
             "`relay demo --auto-answer` to let it answer and approve by itself, or "
             "`relay demo --keep-running` to keep the server up and answer with `relay answer`.")
        raise typer.Exit(2)
    try:
        request = view.example_spec(example)
    except ValueError as exc:
        fail(exc)
        raise typer.Exit(1) from None

    async def go() -> int:
        from worker.dev import DevStack

        stop = StopSignals()
        stack = DevStack(settings, ui=not headless, worker_log=settings.data_dir / "worker.log")
        state = FollowState()
        try:
            await stop.race(stack.start())
            _announce(stack)
            err.print(f"relay worker running (its log: {stack.worker_log})")
            rc = RelayClient(stack.client, settings)  # type: ignore[arg-type]
            state.spec_id = await rc.run(request, workspace=_workspace(workspace, target, check))
            say(f"Started spec {state.spec_id} from the example request:\n{request}\n")
            mode = "auto" if auto_answer else ("interactive" if terminal else "print")
            # the commands it prints need --address only where a bare `relay` would miss it
            there = None if stack.address == DEFAULT_ADDRESS else stack.address
            code = await stop.race(follow(rc, state.spec_id, mode, address=there, state=state),
                                   stack.watch())
            if keep_running:
                err.print(f"Still running at {stack.address}; press Ctrl-C to stop.")
                with contextlib.suppress(Interrupted):  # the expected way to end it
                    await stop.race(stack.watch())
            elif not headless:  # the links printed above point at a server about to stop
                err.print("The dev server and its Web UI stop now; run `relay demo "
                          "--keep-running` to browse the Web UI afterwards, or `relay dev` to "
                          f"see this spec again (relay status {state.spec_id}).")
            return code
        except Interrupted as exc:
            state.interrupted = exc
            return exc.code
        finally:
            await stack.stop()
            if state.interrupted is not None or (state.spec_id and state.phase not in TERMINAL):
                _quietly(lambda: _resume_hint(settings, state))

    raise typer.Exit(run_async(go()))


def _resume_hint(settings: RelaySettings, state: FollowState) -> None:
    """After an interrupted demo: what stopped, what is kept, and the commands that go on."""
    why = f" ({state.interrupted.why})" if state.interrupted else ""
    err.print()  # after a prompt, or the terminal's echoed ^C
    err.print(Text(f"Stopped{why}: the dev server and the worker are down.",
                   style="bold"), soft_wrap=True)
    if not state.spec_id:
        return
    sid = state.spec_id
    phase = state.phase.value if state.phase else "started"
    data_dir = "" if "RELAY_DATA_DIR" not in os.environ else f"RELAY_DATA_DIR={settings.data_dir} "
    if state.phase in TERMINAL:
        err.print(Text(f"Spec {sid} ended ({phase}); its record is kept in {settings.data_dir}: "
                       f"{data_dir}relay dev, then relay result {sid}"), soft_wrap=True)
        return
    if state.phase == Phase.waiting_for_answers:
        then = f"relay answer {sid}"
    elif state.phase == Phase.waiting_for_approval:
        then = f"relay approve {sid}   (or: relay reject {sid} --reason ...)"
    else:
        then = f"relay watch {sid}"
    err.print(Text(f"Spec {sid} is kept in {settings.data_dir} ({phase}). To resume it, run "
                   f"`{data_dir}relay dev` in one terminal, then in another:\n"
                   f"  {data_dir}relay status {sid}\n"
                   f"  {data_dir}{then}"), soft_wrap=True)


# --- specs -------------------------------------------------------------------------------


@app.command()
def run(request: Annotated[str, typer.Argument(help="The request text, or a file holding it")],
        spec_id: Annotated[Optional[str], typer.Option("--id", help="Spec id (default: generated)")] = None,
        follow_: Annotated[bool, typer.Option("--follow", help="Follow it and ask questions here")] = False,
        workspace: Workspace = None, target: Target = "main", check: Check = None,
        auto_approve: AutoApprove = False, budget_usd: BudgetUsd = None,
        budget_tokens: BudgetTokens = None, address: Address = None) -> None:
    """Start a spec."""
    text = _request_text(request)

    async def go() -> int:
        rc = await _client(address)
        sid = await rc.run(text, spec_id=spec_id, workspace=_workspace(workspace, target, check),
                           auto_approve=auto_approve, budget_usd=budget_usd,
                           budget_tokens=budget_tokens)
        say(sid)
        return await follow(rc, sid, "interactive") if follow_ else 0

    raise typer.Exit(run_async(go()))


@app.command()
def iterate(spec_id: str, change_request: Annotated[str, typer.Argument(help="The change, or a file")],
            follow_: Annotated[bool, typer.Option("--follow")] = False,
            workspace: Workspace = None, target: Target = "main", check: Check = None,
            auto_approve: AutoApprove = False, budget_usd: BudgetUsd = None,
            budget_tokens: BudgetTokens = None, address: Address = None) -> None:
    """Start the next iteration of a finished spec; every agent resumes its session."""
    text = _request_text(change_request)

    async def go() -> int:
        rc = await _client(address)
        await rc.iterate(spec_id, text, workspace=_workspace(workspace, target, check),
                         auto_approve=auto_approve, budget_usd=budget_usd,
                         budget_tokens=budget_tokens)
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
            given = await ask(status.pending.questions)
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
        rc = await _client(address)
        with contextlib.suppress(RelayError):  # what is approved; the update says if it can be
            st = await rc.status(spec_id)
            if st.phase == Phase.waiting_for_approval:
                _approval_view(st)
        await rc.approve(spec_id, reviewer=reviewer, comment=comment)
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
            view.print_status(out, st, registry_problem=problem, web_ui=rc.web_ui_url(spec_id))
            if st.phase == Phase.waiting_for_approval:
                say(f"approve: relay approve {spec_id} · reject: relay reject {spec_id} "
                    "--reason ... · the diff: relay diff " + spec_id)

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
        rc = await _client(address)
        res = await rc.result(spec_id)
        if as_json:
            out.print_json(res.model_dump_json())
        else:
            view.print_result(out, res, web_ui=rc.web_ui_url(spec_id))

    run_async(go())


@app.command()
def diff(spec_id: str, as_json: AsJson = False, address: Address = None) -> None:
    """The validated change: diff stat and diff, paged on a terminal (plain when piped).

    A worker computed it when the validator approved (workers and this command may be on
    different machines); it is kept with the run, so it stays readable after delivery."""

    async def go() -> int:
        d = await (await _client(address)).diff(spec_id)
        if as_json:
            out.print_json(d.model_dump_json())
            return 0
        if d.note and not d.diff:
            fail(f"spec {spec_id}: {d.note}")
            return 1
        page(lambda console: view.print_diff(console, d))
        return 0

    raise typer.Exit(run_async(go()))


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
    rows, cost = _registry_read(lambda rc: (rc.sessions(spec_id), rc.cost(spec_id)))
    if as_json:  # each session with its cost (one session per role)
        out.print_json(json.dumps([{**r.model_dump(mode="json"), "cost": cost.by_role[r.role]
                                    .model_dump(mode="json") if r.role in cost.by_role else None}
                                   for r in rows]))
    else:
        view.print_sessions(out, rows, cost)


@app.command()
def budget(spec_id: str,
           add: Annotated[Optional[float], typer.Option(
               "--add", help="USD to add to the spec's budget, e.g. 2.00")] = None,
           tokens: Annotated[Optional[int], typer.Option(
               "--tokens", help="Tokens to add to the spec's budget")] = None,
           address: Address = None) -> None:
    """Raise a running spec's budget; one waiting_for_budget goes on where it stopped."""

    async def go() -> None:
        if add is None and tokens is None:
            raise InvalidAnswer("give --add USD and/or --tokens N")
        new = await (await _client(address)).budget(spec_id, add_usd=add, add_tokens=tokens)
        parts = ([f"${new.usd:,.4f}"] if new.usd is not None else []) + (
            [f"{new.tokens:,} tokens"] if new.tokens is not None else [])
        say(f"{spec_id}: budget now {' and '.join(parts) or 'unlimited'}")

    run_async(go())


@app.command()
def history(spec_id: str, role: str, as_json: AsJson = False) -> None:
    """One agent's whole conversation for a spec."""
    session, messages = _registry_read(lambda rc: rc.history(spec_id, role))
    _show_rows(messages, as_json, lambda: view.print_history(out, session, messages))


# --- following and answering ---------------------------------------------------------------


@dataclasses.dataclass
class FollowState:
    """What a follower has seen so far (for the words said when it is stopped)."""

    spec_id: str | None = None
    phase: Phase | None = None
    interrupted: Interrupted | None = None
    budget_wait: tuple[Any, ...] | None = None  # the budget pause last hinted at


def _commands_suffix(address: str | None) -> str:
    return f" --address {address}" if address else ""


async def follow(rc: RelayClient, spec_id: str, answer_mode: str, *, address: str | None = None,
                 state: FollowState | None = None) -> int:
    """Print every step of the run as it happens until the run ends; answer questions per
    `answer_mode`. A live line on a terminal, plain lines otherwise (view.ProgressPrinter).

    answer_mode: "interactive" (ask on the terminal; without one, say how and return),
    "auto" (scripted answers), "print" (say which command answers, and keep following),
    "none". `address`: added to the commands it prints, for a server others cannot find alone.
    """
    state = state or FollowState(spec_id)
    interactive = answer_mode == "interactive" and sys.stdin.isatty()
    await rc.status(spec_id)  # an unknown spec is one error line, before any "following"
    web_ui = rc.web_ui_url(spec_id)
    say(f"{spec_id}: following its progress" + (f" · Web UI: {web_ui}" if web_ui else ""))
    printer = view.ProgressPrinter(out, web_ui)
    try:
        return await _follow(rc, spec_id, answer_mode, _commands_suffix(address), state, printer,
                             interactive, asyncio.get_running_loop().time(), web_ui)
    finally:
        printer.close()


async def _follow(rc: RelayClient, spec_id: str, answer_mode: str, there: str,
                  state: FollowState, printer: Any, interactive: bool, began: float,
                  web_ui: str | None) -> int:
    last = None
    answered_round = 0
    asked_approval = hinted = False
    while True:
        # only the events not seen yet: every one is printed once, in order (none is skipped
        # between two polls, as phases were when only the current phase was read)
        st = await rc.status(spec_id, after=printer.seq)
        state.phase = st.phase
        if st.progress_seq == 0 and st.iteration:  # a run from a worker without progress events
            line = view.progress_line(st)
            if line != last:
                out.print(line, soft_wrap=True)  # progress_line is markup, escaped where it must be
                last = line
        printer.show(st)
        if (st.phase == Phase.starting and not st.progress_seq and not hinted
                and asyncio.get_running_loop().time() - began > 10):
            hinted = True
            say(f"{spec_id} has not started yet: is a relay worker running on task queue "
                f"{rc.settings.task_queue!r} of this server? (relay dev, or relay worker)")
        if st.phase in TERMINAL:
            break
        if st.pending and st.pending.round > answered_round:
            printer.pause()
            answered_round = st.pending.round  # each round is handled once
            if answer_mode == "auto" or interactive:
                view.print_questions(out, st.pending.questions)
                if answer_mode == "auto":
                    await _answer(rc, spec_id, auto_answers(st.pending.questions))
                else:
                    say(f"(or answer from another terminal: relay answer {spec_id}{there})")
                    round_no = st.pending.round
                    given = await _ask_while(rc, spec_id, ask(st.pending.questions),
                                             lambda s: s.pending is not None and s.pending.round == round_no)
                    if given is None:
                        say("answered elsewhere (another terminal, the Web UI or the SDK)")
                    else:
                        await _answer(rc, spec_id, given)
            else:
                if answer_mode in ("print", "none"):
                    view.print_questions(out, st.pending.questions)
                say(f"waiting for answers: run relay answer {spec_id}{there}")
                if answer_mode == "interactive":
                    return 0
        wait = st.budget_wait if st.phase == Phase.waiting_for_budget else None
        if wait is not None and (wait.role, wait.turn, wait.step) != state.budget_wait:
            state.budget_wait = (wait.role, wait.turn, wait.step)
            say(f"waiting for budget: {wait.reason}. Raise it: relay budget {spec_id}{there} "
                + view.budget_option(st.budget))
        if st.phase == Phase.waiting_for_approval and not asked_approval:
            asked_approval = True
            printer.pause()
            _approval_view(st)
            if answer_mode == "auto":
                say("approving (--auto-answer)")
                await rc.approve(spec_id, reviewer="auto")
            elif interactive:
                say(f"(or from another terminal: relay approve {spec_id}{there})")
                decided = await _ask_while(rc, spec_id, _decide(rc, spec_id),
                                           lambda s: s.phase == Phase.waiting_for_approval)
                if decided is None:
                    say("decided elsewhere (another terminal, the Web UI or the SDK)")
                else:
                    await _deliver(rc, spec_id, decided)
            else:
                say(f"waiting for approval: run relay approve {spec_id}{there} or "
                    f"relay reject {spec_id}{there} --reason ...")
                if answer_mode == "interactive":
                    return 0
        await asyncio.sleep(0.25)
    printer.close()
    try:
        view.print_result(out, await rc.result(spec_id), web_ui=web_ui)
        return 0
    except SpecFailed as exc:
        fail(exc)
        if web_ui:
            say(f"Web UI: {web_ui}")
        return 1


def _approval_view(st: Any) -> None:
    """What the reviewer decides on: the merge, the verdict, the checks, the diff stat, where."""
    ws = st.workspace
    out.print(Text(f"Waiting for approval: merge {ws.branch} into {ws.target} of {ws.repo}"
                   if ws else "Waiting for approval", style="bold"), soft_wrap=True)
    if st.review is not None:
        view.print_review(out, st.review, st.spec_id)


async def _show_diff(rc: RelayClient, spec_id: str) -> None:
    d = await rc.diff(spec_id)
    if d.note and not d.diff:
        say(d.note)
        return
    page(lambda console: view.print_diff(console, d))


def page(show: Any) -> None:
    """`show(console)` through a pager on a terminal ($PAGER, else less), plainly otherwise."""
    import shutil
    import subprocess

    pager = os.environ.get("PAGER") or ("less" if shutil.which("less") else None)
    if not (out.is_terminal and sys.stdin.isatty()) or not pager:
        show(out)
        return
    buffer = Console(file=__import__("io").StringIO(), force_terminal=True, highlight=False,
                     width=out.width, color_system=out.color_system)
    show(buffer)
    env = {**os.environ, "LESS": os.environ.get("LESS", "-R -F -X")}
    _flush()
    try:
        subprocess.run(pager, shell=True, input=buffer.file.getvalue(), text=True, env=env,
                       check=False)
    except OSError:
        show(out)


async def _answer(rc: RelayClient, spec_id: str, given: dict[str, str]) -> None:
    try:
        await rc.answer(spec_id, given)
    except InvalidAnswer as exc:  # e.g. answered from elsewhere a moment before
        err.print(Text(str(exc), style="yellow"), soft_wrap=True)


async def _decide(rc: RelayClient, spec_id: str) -> tuple[bool, str | None]:
    while True:
        reply = (await read_line("Approve delivery? [bold][Y/n/d][/bold] (d: read the diff) ")
                 ).strip().lower()
        if reply in {"d", "diff"}:
            await _show_diff(rc, spec_id)
            continue
        if reply in {"", "y", "yes"}:
            return True, None
        if reply in {"n", "no"}:
            break
        out.print("[yellow]Please answer y, n or d.[/yellow]")
    return False, (await read_line("Reason: ")).strip() or "rejected at the terminal"


async def _deliver(rc: RelayClient, spec_id: str, decided: tuple[bool, str | None]) -> None:
    approved, reason = decided
    try:
        if approved:
            await rc.approve(spec_id)
        else:
            await rc.reject(spec_id, reason or "rejected at the terminal")
    except RelayError as exc:  # decided from elsewhere a moment before
        err.print(Text(str(exc), style="yellow"), soft_wrap=True)


async def _ask_while(rc: RelayClient, spec_id: str, asking: Any, still_waiting: Any) -> Any:
    """Run the prompt `asking` while the spec still waits for it; None when another terminal
    (the CLI, the Web UI, the SDK) has answered meanwhile and the prompt was withdrawn."""
    task = asyncio.ensure_future(asking)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if not still_waiting(await rc.status(spec_id)):
                _drop_typed_input()
                out.print()  # end the withdrawn prompt's line
                return None
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _drop_typed_input() -> None:
    """Forget a half-typed answer to a withdrawn prompt, so the next prompt starts clean."""
    try:
        import termios

        termios.tcflush(sys.stdin.fileno(), termios.TCIFLUSH)
    except (ImportError, OSError, ValueError):
        pass


async def read_line(prompt: str) -> str:
    """One line typed at the terminal, read without blocking the event loop.

    The terminal is in canonical mode, so it is readable once a whole line (or end of input)
    is there; meanwhile the loop keeps handling signals (Ctrl-C at a prompt stops relay) and
    other tasks, and the prompt can be withdrawn (cancelled). End of input: Interrupted."""
    out.print(prompt, end="")
    _flush()
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    readable = loop.create_future()
    loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    try:
        data = os.read(fd, 65536)
    except OSError:  # the terminal is gone
        data = b""
    if not data:
        out.print()
        raise Interrupted("end of input", 1)
    return data.decode("utf-8", errors="replace").rstrip("\r\n")


async def confirm(prompt: str, *, default: bool) -> bool:
    choices = "[Y/n]" if default else "[y/N]"
    while True:
        reply = (await read_line(f"{prompt} [bold]{choices}[/bold] ")).strip().lower()
        if not reply:
            return default
        if reply in {"y", "yes", "n", "no"}:
            return reply.startswith("y")
        out.print("[yellow]Please answer y or n.[/yellow]")


def auto_answers(questions: list[Question]) -> dict[str, str]:
    return {q.id: f"(auto-answer) use your best judgement for: {q.text}" for q in questions}


async def ask(questions: list[Question]) -> dict[str, str]:
    given = {}
    for q in questions:
        text = await read_line(f"[bold]{escape(q.id)}[/bold] {escape(q.text)}: ")
        while not text.strip():  # said, not re-asked in silence
            err.print("an answer is required (Ctrl-C stops)")
            text = await read_line(f"[bold]{escape(q.id)}[/bold] {escape(q.text)}: ")
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
    except Interrupted as exc:
        fail(f"interrupted ({exc.why})")
        return exc.code
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
