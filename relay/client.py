"""RelayClient: the typed Python face of everything the CLI does.

Temporal carries the workflow (start, answer, status, cancel); the registry
carries the conversations (sessions, history). Every failure a person can
cause surfaces as a RelayError subclass with a one-line message.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import (
    Client,
    WorkflowExecutionStatus as ExecStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from relay.ledger import EffectRecord, Ledger
from relay.models import (
    WORKFLOW_TYPE, AnswerAck, AnswerInput, ApprovalInput, CompensationInput, CompensationReport,
    Decision, HookEffect, Limits, PipelineResult, RejectInput, Role, SpecInput, Status,
    WorkspaceInput, spec_id_problem,
)
from relay.registry import AgentSession, Registry, SessionMessage
from relay.settings import RelaySettings



class RelayError(Exception):
    """A failure the caller can act on; its message is one line."""


class InvalidRequest(RelayError):
    pass


class SpecNotFound(RelayError):
    pass


class SpecAlreadyExists(RelayError):
    pass


class SpecAlreadyRunning(SpecAlreadyExists):
    pass


class SpecNotRunning(RelayError):
    pass


class InvalidAnswer(RelayError):
    pass


class TemporalUnreachable(RelayError):
    pass


class SpecFailed(RelayError):
    pass


class RegistryUnavailable(RelayError):
    pass


def new_spec_id() -> str:
    return f"spec-{uuid.uuid4().hex[:10]}"


def check_request(text: str, max_bytes: int) -> str:
    if not text or not text.strip():
        raise InvalidRequest("the request is empty")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidRequest(f"the request is {size} bytes; the limit is {max_bytes} bytes "
                             "(RELAY_MAX_REQUEST_BYTES)")
    return text


def check_spec_id(spec_id: str) -> str:
    if problem := spec_id_problem(spec_id):
        raise InvalidRequest(problem)
    return spec_id


async def connect_temporal(address: str, namespace: str = "default") -> Client:
    """A Temporal client with relay's data converter, or TemporalUnreachable in one line."""
    try:
        return await asyncio.wait_for(
            Client.connect(address, namespace=namespace, data_converter=pydantic_data_converter),
            timeout=15)
    except (RuntimeError, OSError, ValueError, asyncio.TimeoutError) as exc:
        raise TemporalUnreachable(f"cannot reach Temporal at {address}: "
                                  f"{_one_line(str(exc)) or 'timed out'}") from None


def open_registry(url: str, *, must_exist: bool = False) -> Registry:
    """The registry at `url`, or RegistryUnavailable in one line (never with the password).
    Readers pass must_exist: a missing SQLite file means the wrong data directory."""
    safe = make_url(url).render_as_string(hide_password=True)
    if must_exist and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise RegistryUnavailable(f"no relay registry at {safe} (set RELAY_DATA_DIR or "
                                  "RELAY_DATABASE_URL to the one your workers use)")
    try:
        return Registry.from_url(url)
    except SQLAlchemyError as exc:
        raise RegistryUnavailable(f"cannot open the relay registry at {safe}: "
                                  f"{_one_line(str(getattr(exc, 'orig', None) or exc))}") from None
    except ModuleNotFoundError as exc:
        raise RegistryUnavailable(f"the driver for {safe} is not installed ({exc.name}); "
                                  "for PostgreSQL install relay[postgres]") from None


def check_workspace(workspace: WorkspaceInput) -> WorkspaceInput:
    """A named repository must exist here, be a git repository and have the target branch."""
    if workspace.path is None:
        return workspace
    path = Path(workspace.path).expanduser().resolve()
    if not path.is_dir():
        raise InvalidRequest(f"workspace {workspace.path} does not exist")
    probe = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise InvalidRequest(f"workspace {workspace.path} is not a git repository")
    if subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", "--quiet",
                       f"refs/heads/{workspace.target}"], capture_output=True).returncode != 0:
        raise InvalidRequest(f"workspace {workspace.path} has no branch {workspace.target!r}")
    return workspace.model_copy(update={"path": probe.stdout.strip()})


class RelayClient:
    def __init__(self, client: Client, settings: RelaySettings | None = None,
                 registry: Registry | None = None) -> None:
        self.temporal = client
        self.settings = settings or RelaySettings()
        self._registry = registry

    @classmethod
    async def connect(cls, settings: RelaySettings | None = None, *,
                      address: str | None = None) -> RelayClient:
        settings = settings or RelaySettings()
        client = await connect_temporal(address or settings.temporal_address, settings.namespace)
        return cls(client, settings)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = open_registry(self.settings.registry_url(), must_exist=True)
        return self._registry

    def _handle(self, spec_id: str, run_id: str | None = None) -> WorkflowHandle[Any, PipelineResult]:
        return self.temporal.get_workflow_handle(spec_id, run_id=run_id, result_type=PipelineResult)

    # --- starting ------------------------------------------------------------------

    async def run(self, request: str, *, spec_id: str | None = None,
                  limits: Limits | None = None, workspace: WorkspaceInput | None = None,
                  auto_approve: bool = False, hooks: list[HookEffect] | None = None) -> str:
        """Start a new spec; returns its id (the workflow id).

        `workspace`: the git repository the agents work on (default: a fresh one relay
        creates); `auto_approve`: deliver without waiting for a human.
        """
        limits = limits or self.settings.limits()
        check_request(request, limits.max_request_bytes)
        spec_id = check_spec_id(spec_id) if spec_id else new_spec_id()
        workspace = check_workspace(workspace or WorkspaceInput())
        try:
            await self.temporal.start_workflow(
                WORKFLOW_TYPE, SpecInput(request=request, limits=limits, workspace=workspace,
                                         auto_approve=auto_approve, hooks=hooks or []), id=spec_id,
                task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=f"relay spec {spec_id}")
        except WorkflowAlreadyStartedError:
            if await self._is_running(spec_id):
                raise SpecAlreadyRunning(f"spec {spec_id} is already running") from None
            raise SpecAlreadyExists(f"spec {spec_id} already exists; use 'relay iterate {spec_id} "
                                    "\"change request\"' for its next iteration") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        return spec_id

    async def iterate(self, spec_id: str, change_request: str, *, limits: Limits | None = None,
                      workspace: WorkspaceInput | None = None, auto_approve: bool = False,
                      hooks: list[HookEffect] | None = None) -> str:
        """Start the next iteration of a finished spec; all five agents resume their sessions."""
        limits = limits or self.settings.limits()
        check_request(change_request, limits.max_request_bytes)
        workspace = check_workspace(workspace or WorkspaceInput())
        desc = await self._describe(spec_id)
        if desc.status == ExecStatus.RUNNING:
            raise SpecAlreadyRunning(f"spec {spec_id} is still running; wait for it or cancel it first")
        if await self._compensation_running(spec_id):
            raise SpecAlreadyRunning(f"spec {spec_id} is being compensated (relay compensate); "
                                     "iterate when it is done")
        try:
            handle = await self.temporal.start_workflow(
                WORKFLOW_TYPE, SpecInput(request=change_request, iterate=True, limits=limits,
                                         workspace=workspace, auto_approve=auto_approve,
                                         hooks=hooks or []),
                id=spec_id, task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                static_summary=f"relay spec {spec_id} (iteration)")
        except WorkflowAlreadyStartedError:
            raise SpecAlreadyRunning(f"spec {spec_id} is already running") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        return handle.result_run_id or ""

    # --- people in the loop ----------------------------------------------------------

    async def answer(self, spec_id: str, answers: Mapping[str, str]) -> AnswerAck:
        """Answer the clarifier's pending questions; rejected at once if they do not fit."""
        try:
            payload = AnswerInput(answers=dict(answers))
        except ValueError as exc:
            raise InvalidAnswer(f"answers must map question ids to text: {_one_line(str(exc))}") from None
        try:
            return await self._handle(spec_id).execute_update(
                "answer", payload, result_type=AnswerAck, rpc_timeout=timedelta(seconds=30))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise InvalidAnswer(f"answer rejected: {getattr(cause, 'message', None) or cause}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    async def approve(self, spec_id: str, *, reviewer: str | None = None,
                      comment: str | None = None) -> Decision:
        """Approve delivery of a validated change (the irreversible step)."""
        return await self._decide(spec_id, "approve", ApprovalInput(reviewer=reviewer, comment=comment))

    async def reject(self, spec_id: str, reason: str, *, reviewer: str | None = None) -> Decision:
        """Reject the change; every side effect of the run is compensated."""
        if not reason or not reason.strip():
            raise InvalidRequest("a rejection needs a reason")
        return await self._decide(spec_id, "reject", RejectInput(reason=reason, reviewer=reviewer))

    async def _decide(self, spec_id: str, update: str, payload: object) -> Decision:
        try:
            return await self._handle(spec_id).execute_update(
                update, payload, result_type=Decision, rpc_timeout=timedelta(seconds=30))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise InvalidAnswer(f"{update} refused: {getattr(cause, 'message', None) or cause}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    async def compensate(self, spec_id: str) -> CompensationReport:
        """Re-run the compensations still pending for a spec that is not running."""
        try:
            running = await self._is_running(spec_id)
        except SpecNotFound:
            # Temporal may have dropped the run (retention); the ledger still knows its effects
            if not Ledger(self.registry).effects(spec_id):
                raise
            running = False
        if running:
            raise SpecAlreadyRunning(f"spec {spec_id} is running; it compensates by itself when it "
                                     "fails, is cancelled or is rejected")
        from workflows.compensation import COMPENSATION_WORKFLOW, compensation_workflow_id

        try:
            return await self.temporal.execute_workflow(
                COMPENSATION_WORKFLOW, CompensationInput(spec_id=spec_id, limits=self.settings.limits()),
                id=compensation_workflow_id(spec_id), task_queue=self.settings.task_queue,
                result_type=CompensationReport,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    def effects(self, spec_id: str) -> list[EffectRecord]:
        """The effects ledger of a spec, oldest first."""
        rows = Ledger(self.registry).effects(spec_id)
        if not rows and self.registry.spec(spec_id) is None:
            raise SpecNotFound(f"unknown spec {spec_id!r} in the registry")
        return rows

    async def cancel(self, spec_id: str) -> None:
        await self._require_running(spec_id)
        try:
            await self._handle(spec_id).cancel()
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    # --- reading state -------------------------------------------------------------------

    async def status(self, spec_id: str) -> Status:
        try:
            return await self._handle(spec_id).query(
                "status", result_type=Status, rpc_timeout=timedelta(seconds=20))
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    async def result(self, spec_id: str) -> PipelineResult:
        """Wait for the current run to finish; raises SpecFailed with the reason if it failed."""
        try:
            return await self._handle(spec_id).result()
        except WorkflowFailureError as exc:
            cause = exc.cause
            reason = getattr(cause, "message", None) or str(cause)
            raise SpecFailed(f"spec {spec_id} {_status_word(cause)}: {_one_line(reason)}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    def sessions(self, spec_id: str) -> list[AgentSession]:
        rows = self.registry.sessions(spec_id)
        if not rows and self.registry.spec(spec_id) is None:
            raise SpecNotFound(f"unknown spec {spec_id!r} in the registry")
        return rows

    def history(self, spec_id: str, role: Role | str) -> tuple[AgentSession, list[SessionMessage]]:
        try:
            role = Role(role)
        except ValueError:
            raise InvalidRequest(f"unknown role {role!r}; roles: "
                                 + ", ".join(r.value for r in Role)) from None
        session = self.registry.find_session(spec_id, role)
        if session is None:
            self.sessions(spec_id)  # raises SpecNotFound for an unknown spec
            raise SpecNotFound(f"spec {spec_id} has no {role.value} session yet")
        return session, self.registry.messages(session.id)

    def orchestration_state(self, spec_id: str) -> dict[str, dict[str, Any]]:
        self.sessions(spec_id)
        return self.registry.orchestration_state(spec_id)

    # --- helpers -----------------------------------------------------------------------------

    async def _describe(self, spec_id: str) -> Any:
        try:
            return await self._handle(spec_id).describe()
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    async def _is_running(self, spec_id: str) -> bool:
        return (await self._describe(spec_id)).status == ExecStatus.RUNNING

    async def _compensation_running(self, spec_id: str) -> bool:
        from workflows.compensation import compensation_workflow_id

        try:
            desc = await self.temporal.get_workflow_handle(compensation_workflow_id(spec_id)).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise _rpc_error(exc, spec_id) from None
        return desc.status == ExecStatus.RUNNING

    async def _require_running(self, spec_id: str) -> None:
        desc = await self._describe(spec_id)
        if desc.status != ExecStatus.RUNNING:
            raise SpecNotRunning(f"spec {spec_id} is not running ({desc.status.name.lower()})")


def _rpc_error(exc: RPCError, spec_id: str) -> RelayError:
    if exc.status == RPCStatusCode.NOT_FOUND:
        if "already completed" in exc.message or "closed" in exc.message:
            return SpecNotRunning(f"spec {spec_id} is not running any more")
        return SpecNotFound(f"unknown spec {spec_id!r}")
    if exc.status == RPCStatusCode.UNAVAILABLE:
        return TemporalUnreachable(f"Temporal is unreachable: {_one_line(exc.message)}")
    if exc.status == RPCStatusCode.DEADLINE_EXCEEDED:
        return RelayError(f"Temporal did not answer in time for spec {spec_id} "
                          "(is a relay worker running?)")
    return RelayError(f"Temporal refused the call for spec {spec_id}: {_one_line(exc.message)}")


def _status_word(cause: object) -> str:
    return "was cancelled" if type(cause).__name__ == "CancelledError" else "failed"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]
