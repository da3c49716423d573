"""RelayClient: the typed Python face of everything the CLI does.

Temporal carries the workflow (start, answer, status, cancel); the registry
carries the conversations (sessions, history). Every failure a person can
cause surfaces as a RelayError subclass with a one-line message.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import contextlib
import dataclasses
import functools
import inspect
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from temporalio.api.common.v1 import Payloads
from temporalio.client import (
    Client,
    PayloadLimitsConfig,
    RPCTimeoutOrCancelledError,
    WorkflowExecutionStatus as ExecStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.envconfig import ClientConfig
from temporalio.service import TLSConfig
from relay.converter import data_converter as pydantic_data_converter
from temporalio.exceptions import TemporalError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from relay import one_line
from relay.ledger import EffectRecord, Ledger
from relay.models import (
    WORKFLOW_TYPE, AnswerAck, AnswerInput, ApprovalInput, ChangeDiff, CompensationInput,
    CompensationReport, ProgressEvent,
    Budget, RaiseBudgetInput, SpecCost,
    Decision, GatePolicy, HookEffect, Limits, PipelineResult, RejectInput, Role, SpecInput, Status,
    WorkspaceInput, spec_id_problem,
)
from relay.pricing import spec_cost
from relay.registry import AgentSession, Registry, SessionMessage
from relay.settings import RelaySettings, load_settings, setting_problem

# The Temporal server's default `limit.blobSize.error`: a larger payload is refused by the
# server. relay refuses it first, naming what was too large.
TEMPORAL_PAYLOAD_LIMIT = 2 * 1024 * 1024
# Temporal's limit on a workflow id (`limit.maxIDLength`); longer ids are refused by the server.
SPEC_REF_MAX = 1000
CONNECT_TIMEOUT_S = 10.0


class RelayError(Exception):
    """A failure the caller can act on; its message is one line."""


class InvalidRequest(RelayError):
    pass


class PayloadTooLarge(InvalidRequest):
    """The request, answer or reason would exceed Temporal's payload size limit."""


class InvalidSettings(RelayError):
    """A RELAY_* setting is out of bounds or not of its type."""


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


def check_text(value: object, what: str, *, optional: bool = False) -> Any:
    """`value` if it is text that can travel (UTF-8); else InvalidRequest naming `what`.
    Undecodable bytes from the OS reach Python as lone surrogates, which UTF-8 cannot encode."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be text, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid UTF-8 text: {one_line(repr(value), 120)}") from None
    return value


def validation_problem(exc: ValidationError) -> str:
    """`field.path: why` for the first problem pydantic found, on one line."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return one_line(f"{where + ': ' if where else ''}{first['msg']}{more}")


M = TypeVar("M", bound=BaseModel)


def check_gate_policy(value: object) -> GatePolicy:
    """Gate 2's policy for a tainted trajectory: recheck (the default) or human."""
    if value is None:
        return GatePolicy.recheck
    try:
        return GatePolicy(value)
    except ValueError:
        raise InvalidRequest("gate_policy must be one of "
                             f"{', '.join(p.value for p in GatePolicy)}, not {value!r}") from None


def check_model(model: type[M], value: object, what: str) -> M:
    """`value` (a `model` or a mapping of its fields) validated afresh: an instance may have been
    changed after it was built, and pydantic does not re-check assignments."""
    if isinstance(value, model):
        value = value.model_dump(warnings=False)
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"{what} must be a {model.__name__} or a mapping, "
                             f"not {type(value).__name__}")
    try:
        return model.model_validate(dict(value))
    except ValidationError as exc:
        raise InvalidRequest(f"invalid {what}: {validation_problem(exc)}") from None


def check_flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequest(f"{what} must be True or False, not {type(value).__name__}")
    return value


def check_payload(value: BaseModel, what: str) -> None:
    """Refuse a payload Temporal would refuse (its blob size limit), before sending it."""
    payloads = pydantic_data_converter.payload_converter.to_payloads([value])
    size = Payloads(payloads=payloads).ByteSize()
    if size > TEMPORAL_PAYLOAD_LIMIT:
        raise PayloadTooLarge(f"{what} is {size:,} bytes once encoded; Temporal refuses payloads "
                              f"over {TEMPORAL_PAYLOAD_LIMIT:,} bytes (its blob size limit)")


def check_request(text: str, max_bytes: int) -> str:
    check_text(text, "the request")
    if not text or not text.strip():
        raise InvalidRequest("the request is empty")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise InvalidRequest(f"the request is {size} bytes; the limit is {max_bytes} bytes "
                             "(RELAY_MAX_REQUEST_BYTES)")
    return text


def check_spec_id(spec_id: str) -> str:
    """A new spec's id: it names a git branch and a directory, so the strict rule applies."""
    check_text(spec_id, "the spec id")
    if problem := spec_id_problem(spec_id):
        raise InvalidRequest(one_line(problem))
    return spec_id


def check_spec_ref(spec_id: str) -> str:
    """An existing spec's id: any text Temporal accepts as a workflow id (a spec started from
    the Web UI may have any id), but never empty, too long or undecodable."""
    check_text(spec_id, "the spec id")
    if not spec_id.strip():
        raise InvalidRequest("the spec id is empty")
    if len(spec_id.encode("utf-8")) > SPEC_REF_MAX:
        raise InvalidRequest(f"the spec id is {len(spec_id.encode('utf-8')):,} bytes; "
                             f"Temporal allows at most {SPEC_REF_MAX:,}")
    return spec_id


# --- reaching Temporal ----------------------------------------------------------------------
#
# Where relay finds Temporal, first match wins (the same for the CLI, the SDK and `relay worker`):
#   1. an explicit address: `--address`, `RelayClient.connect(address=...)`, a RelaySettings built
#      with `temporal_address=...`;
#   2. RELAY_TEMPORAL_ADDRESS (and RELAY_NAMESPACE);
#   3. Temporal's own client configuration (temporalio.envconfig): TEMPORAL_ADDRESS,
#      TEMPORAL_NAMESPACE, TEMPORAL_API_KEY, TEMPORAL_TLS*, the temporal.toml profile named by
#      TEMPORAL_PROFILE in TEMPORAL_CONFIG_FILE (or the default location);
#   4. the `relay dev` running for this data directory (its dev.json);
#   5. 127.0.0.1:7233.
# The namespace follows the same order (RELAY_NAMESPACE > TEMPORAL_NAMESPACE > "default"). API key,
# TLS and gRPC metadata come only from Temporal's configuration, and are not applied to a running
# `relay dev`: that is a local plaintext server that knows nothing of them.

DEV_FILE = "dev.json"
DEFAULT_ADDRESS = "127.0.0.1:7233"
# A server that accepts the TCP connection but never answers would hold the SDK's own connect for
# about 30 s (its get_system_info call); relay's probe gives up sooner, in Python.
PROBE_TIMEOUT_S = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_H2_SETTINGS = 0x4


def dev_file(data_dir: Path) -> Path:
    return Path(data_dir) / DEV_FILE


def write_dev_file(data_dir: Path, **info: Any) -> Path:
    """What `relay dev` (and the demo) publish so that other processes find them."""
    path = dev_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)  # readers never see half a file
    return path


def running_dev(data_dir: Path) -> dict[str, Any] | None:
    """The `relay dev` serving `data_dir` (address, ui, pids), or None. A stale file (its process
    is gone), an unreadable or a foreign one is no server at all."""
    try:
        info = json.loads(dev_file(data_dir).read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
        if not isinstance(info["address"], str) or not info["address"]:
            return None
        return info
    except PermissionError:  # alive, but another user's process: not ours to use
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def spec_summary(spec_id: str, request: str, *, iteration: bool = False) -> str:
    """The summary on the spec's Web UI page. It is fixed at start, so it says where the live
    state is: what the spec waits for, and the exact update or signal with its JSON, are in the
    current details (User Metadata), kept up to date by the workflow."""
    first = one_line(request, 120)
    kind = "next iteration" if iteration else "spec"
    return (f"relay {kind} {spec_id}: {first}\n\nWhat it waits for, and which update or signal "
            "to send with its JSON, is under User Metadata → Current Details (query `status` "
            "for everything).")


@dataclasses.dataclass(frozen=True)
class TemporalTarget:
    """Where and how to connect, and why there (for error messages)."""

    address: str
    namespace: str = "default"
    source: str = "default"
    api_key: str | None = dataclasses.field(default=None, repr=False)
    tls: bool | TLSConfig = False
    rpc_metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # the SDK only warns about a URL today (and will refuse it later): say it plainly now
        if "://" in self.address:
            raise InvalidSettings(f"the Temporal address from {self.source} is a URL "
                                  f"({one_line(self.address, 80)}): give host:port, e.g. "
                                  f"127.0.0.1:7233")

    @property
    def hint(self) -> str:
        if self.source == "default":
            return ("; no `relay dev` is running for this data directory: start one with "
                    "`relay dev`, or set --address, RELAY_TEMPORAL_ADDRESS or TEMPORAL_ADDRESS")
        if self.source.startswith("relay dev"):
            return f"; the {self.source} does not answer: restart it"
        if self.source == "--address":
            return ""
        return f" (from {self.source})"


def _collect_at_exit() -> None:
    """Free the Temporal client's native objects while the interpreter is still whole.

    A script that used a Temporal client and simply returns can abort at exit with "Fatal
    Python error: PyGILState_Release" (temporalio/sdk-python#300): the client sits in a
    reference cycle, and its native part is dropped on a Rust thread during finalization.
    Measured with the README's SDK pattern (connect, run, status, cancel, return): 5 of 25
    runs aborted; with this collection at exit, 0 of 25.
    """
    gc.collect()


atexit.register(_collect_at_exit)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: bytes the OS gave that are not UTF-8
        return False
    return True


def temporal_config(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Temporal's own client configuration (env and temporal.toml), as Client.connect arguments."""
    if env is None:
        # Temporal's Rust core reads the process environment itself and panics on a variable
        # that is not UTF-8 (any variable, not only TEMPORAL_*): hand it the readable ones
        env = {k: v for k, v in os.environ.items() if _utf8(k) and _utf8(v)}
    try:
        return dict(ClientConfig.load_client_connect_config(override_env_vars=env))
    except Exception as exc:  # the bridge's ConfigError: a bad file, an unknown profile
        raise InvalidSettings(f"invalid Temporal client configuration (TEMPORAL_* or "
                              f"temporal.toml): {one_line(exc)}") from None


def temporal_target(settings: RelaySettings, address: str | None = None) -> TemporalTarget:
    """Resolve where to connect, in the order written above."""
    address = check_text(address, "the Temporal address", optional=True)
    explicit = settings.model_fields_set  # RELAY_* values and constructor arguments
    config = temporal_config()
    if "namespace" in explicit:
        namespace = settings.namespace
    else:
        namespace = config.get("namespace") or settings.namespace
    auth = {"api_key": config.get("api_key"), "tls": config.get("tls", False),
            "rpc_metadata": config.get("rpc_metadata") or {}}
    if address:
        return TemporalTarget(address, namespace, "--address", **auth)
    if "temporal_address" in explicit:
        return TemporalTarget(settings.temporal_address, namespace,
                              "RELAY_TEMPORAL_ADDRESS or the settings", **auth)
    if config.get("target_host"):
        return TemporalTarget(config["target_host"], namespace,
                              "Temporal's client configuration (TEMPORAL_ADDRESS or temporal.toml)",
                              **auth)
    if dev := running_dev(settings.data_dir):
        return TemporalTarget(dev["address"], namespace,
                              f"relay dev for {settings.data_dir} (pid {dev['pid']})")
    return TemporalTarget(settings.temporal_address or DEFAULT_ADDRESS, namespace, "default", **auth)


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST:PORT or [V6]:PORT; None for anything else (the SDK then says what is wrong)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


async def _probe(address: str, tls: bool) -> str | None:
    """Why nothing Temporal-like answers at `address`, or None when something might.

    Checked in Python before the SDK connects: a refused or silent port then fails in well under
    a second, and the SDK's native connect never runs for it. A native connect that is abandoned
    (timed out) or that fails just before the interpreter exits can crash the process at exit
    (temporalio/sdk-python#300: a pyo3 panic or `Fatal Python error`, exit code 134)."""
    parsed = None if "://" in address else _host_port(address)  # URLs: the SDK's to parse
    if parsed is None:
        return None
    host, port = parsed
    if not 0 < port < 65536:
        return f"port {port} is out of range"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT_S)
    except asyncio.TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT_S:g}s"
    except OSError as exc:  # asyncio words it "Connect call failed (...)"; the errno says why
        return os.strerror(exc.errno) if exc.errno else one_line(exc) or type(exc).__name__
    try:
        if tls:  # TLS must be negotiated first; the SDK does that and reports what fails
            return None
        writer.write(_H2_PREFACE)  # a gRPC server answers the HTTP/2 preface with SETTINGS
        await writer.drain()
        frame = await asyncio.wait_for(reader.readexactly(9), PROBE_TIMEOUT_S)
        return None if frame[3] == _H2_SETTINGS else "it does not speak gRPC (not a Temporal server?)"
    except asyncio.TimeoutError:
        return (f"it accepts connections but does not answer within {PROBE_TIMEOUT_S:g}s "
                "(not a Temporal server?)")
    except (OSError, asyncio.IncompleteReadError):
        return "it closed the connection (not a Temporal server?)"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def connect_temporal(address: str | TemporalTarget, namespace: str = "default") -> Client:
    """A Temporal client with relay's data converter, or TemporalUnreachable in one line.

    `address` is HOST:PORT (plaintext, no credentials) or a resolved TemporalTarget.
    The core's own payload-size warning is off: relay refuses oversized payloads itself
    (check_payload), and the warning would break the CLI's one-line output."""
    target = address if isinstance(address, TemporalTarget) else TemporalTarget(
        check_text(address, "the Temporal address"), check_text(namespace, "the Temporal namespace"),
        source="--address")
    shown = one_line(target.address, 200)
    if problem := await _probe(target.address, bool(target.tls)):
        raise TemporalUnreachable(f"cannot reach Temporal at {shown}: {problem}{target.hint}")
    try:
        # The outer bound is above the SDK's own (connect_timeout, then ~30 s for its first call),
        # so the native connect always finishes before we give up on it: see _probe.
        return await asyncio.wait_for(
            Client.connect(target.address, namespace=target.namespace, api_key=target.api_key,
                           tls=target.tls, rpc_metadata=dict(target.rpc_metadata),
                           data_converter=pydantic_data_converter,
                           connect_timeout=timedelta(seconds=CONNECT_TIMEOUT_S),
                           payload_limits=PayloadLimitsConfig(payloads_warn_size=0)),
            timeout=CONNECT_TIMEOUT_S + 40)
    except (RuntimeError, OSError, ValueError, asyncio.TimeoutError, RPCError) as exc:
        # The native task that failed still drops its Python references on its own thread;
        # an interpreter that starts finalizing meanwhile can abort (sdk-python#300). Nothing
        # signals when it is done, so give it a moment before the error can end the program.
        await asyncio.sleep(0.1)
        raise TemporalUnreachable(f"cannot reach Temporal at {shown}: "
                                  f"{one_line(exc) or 'timed out'}{target.hint}") from None


async def connect_settings(settings: RelaySettings, address: str | None = None) -> Client:
    """Connect where `settings` (and an explicit `address`) say, in relay's order of precedence."""
    return await connect_temporal(temporal_target(settings, address))


def open_registry(url: str, *, must_exist: bool = False) -> Registry:
    """The registry at `url`, or RegistryUnavailable in one line (never with the password).
    Readers pass must_exist: a missing SQLite file means the wrong data directory."""
    check_text(url, "the registry URL (RELAY_DATABASE_URL)")
    try:
        safe = make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        raise RegistryUnavailable("the registry URL (RELAY_DATABASE_URL) is not a database URL") from None
    if must_exist and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise RegistryUnavailable(f"no relay registry at {safe} (set RELAY_DATA_DIR or "
                                  "RELAY_DATABASE_URL to the one your workers use)")
    try:
        return Registry.from_url(url)
    except SQLAlchemyError as exc:
        raise RegistryUnavailable(f"cannot open the relay registry at {safe}: "
                                  f"{one_line(getattr(exc, 'orig', None) or exc)}") from None
    except ModuleNotFoundError as exc:
        raise RegistryUnavailable(f"the driver for {safe} is not installed ({exc.name}); "
                                  "for PostgreSQL install relay[postgres]") from None


def check_workspace(workspace: WorkspaceInput) -> WorkspaceInput:
    """A named repository must exist here, be a git repository and have the target branch."""
    if workspace.path is None:
        return workspace
    shown = one_line(workspace.path, 200)
    try:
        path = Path(workspace.path).expanduser().resolve()
        is_dir = path.is_dir()
    except (OSError, ValueError) as exc:  # too long, a NUL byte, a loop of links
        raise InvalidRequest(f"workspace {shown} cannot be used: "
                             f"{one_line(getattr(exc, 'strerror', None) or exc)}") from None
    if not is_dir:
        raise InvalidRequest(f"workspace {shown} does not exist")
    probe = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise InvalidRequest(f"workspace {shown} is not a git repository")
    if subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", "--quiet",
                       f"refs/heads/{workspace.target}"], capture_output=True).returncode != 0:
        raise InvalidRequest(f"workspace {shown} has no branch {one_line(repr(workspace.target), 200)}")
    return workspace.model_copy(update={"path": probe.stdout.strip()})


def _sdk_error(exc: Exception, what: str) -> RelayError:
    """Whatever escaped a public method, as the RelayError a caller can catch, cause kept.

    The checks above refuse bad input with precise messages; this is the floor under them, so
    that a library's exception (pydantic, SQLAlchemy, Temporal) never reaches a caller raw."""
    if isinstance(exc, RelayError):
        return exc
    if isinstance(exc, ValidationError):
        return InvalidRequest(f"{what}: invalid input: {validation_problem(exc)}")
    if isinstance(exc, SQLAlchemyError):
        return RegistryUnavailable(f"the relay registry failed: "
                                   f"{one_line(getattr(exc, 'orig', None) or exc)}")
    if isinstance(exc, RPCError):
        return _rpc_error(exc, None)
    if isinstance(exc, (TypeError, ValueError, UnicodeError)):
        return InvalidRequest(f"{what}: {one_line(exc)}")
    if isinstance(exc, TemporalError):
        return RelayError(f"{what}: Temporal: {one_line(exc)}")
    return RelayError(f"{what} failed: {type(exc).__name__}: {one_line(exc)}")


F = TypeVar("F", bound=Callable[..., Any])


def relay_errors(method: F) -> F:
    """Make a public method raise RelayError subclasses only (sync or async)."""
    what = method.__name__.strip("_")
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except Exception as exc:
                raise _sdk_error(exc, what) from exc

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            raise _sdk_error(exc, what) from exc

    return wrapper  # type: ignore[return-value]


class RelayClient:
    def __init__(self, client: Client, settings: RelaySettings | None = None,
                 registry: Registry | None = None) -> None:
        if settings is not None and not isinstance(settings, RelaySettings):
            raise InvalidSettings(f"settings must be RelaySettings, not {type(settings).__name__}")
        self.temporal = client
        self.settings = settings or load_settings()
        self._registry = registry

    @classmethod
    @relay_errors
    async def connect(cls, settings: RelaySettings | None = None, *,
                      address: str | None = None) -> RelayClient:
        if settings is not None and not isinstance(settings, RelaySettings):
            raise InvalidSettings(f"settings must be RelaySettings, not {type(settings).__name__}")
        settings = settings or load_settings()
        client = await connect_settings(settings, address)
        return cls(client, settings)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = open_registry(self.settings.registry_url(), must_exist=True)
        return self._registry

    def _handle(self, spec_id: str, run_id: str | None = None) -> WorkflowHandle[Any, PipelineResult]:
        return self.temporal.get_workflow_handle(spec_id, run_id=run_id, result_type=PipelineResult)

    def _limits(self, limits: Limits | Mapping[str, Any] | None) -> Limits:
        """The run's limits: given ones checked, else the settings' (which may have been
        changed after loading, so they are checked too)."""
        if limits is not None:
            return check_model(Limits, limits, "limits")
        try:
            return self.settings.limits()
        except ValidationError as exc:
            raise InvalidSettings(setting_problem(exc)) from None

    def _spec_input(self, request: str, *, iterate: bool, limits: Any, workspace: Any,
                    auto_approve: Any, hooks: Any, budget_usd: Any = None,
                    budget_tokens: Any = None, gate_policy: Any = None) -> SpecInput:
        """The start input, every part checked, small enough for Temporal."""
        checked = self._limits(limits)
        check_request(request, checked.max_request_bytes)
        check_flag(auto_approve, "auto_approve")
        if hooks is not None and not isinstance(hooks, (list, tuple)):
            raise InvalidRequest(f"hooks must be a list, not {type(hooks).__name__}")
        fallbacks, by_role = self.settings.fallback_chains()
        spec = SpecInput(
            request=request, iterate=iterate, limits=checked, auto_approve=auto_approve,
            workspace=check_workspace(check_model(WorkspaceInput, workspace or {}, "workspace")),
            hooks=[check_model(HookEffect, hook, "hook") for hook in hooks or []],
            # the spec's own budget, else the settings' (RELAY_BUDGET_USD/_TOKENS; unset: none)
            budget_usd=self.settings.budget_usd if budget_usd is None else budget_usd,
            budget_tokens=self.settings.budget_tokens if budget_tokens is None else budget_tokens,
            fallback_models=fallbacks, fallback_models_by_role=by_role,
            gate_policy=check_gate_policy(gate_policy))
        check_payload(spec, "the request")
        return spec

    # --- starting ------------------------------------------------------------------

    @relay_errors
    async def run(self, request: str, *, spec_id: str | None = None,
                  limits: Limits | None = None, workspace: WorkspaceInput | None = None,
                  auto_approve: bool = False, hooks: list[HookEffect] | None = None,
                  budget_usd: float | None = None, budget_tokens: int | None = None,
                  gate_policy: GatePolicy | str | None = None) -> str:
        """Start a new spec; returns its id (the workflow id).

        `budget_usd`, `budget_tokens`: the spec's budget over all its agents and iterations
        (default: the settings' RELAY_BUDGET_USD / RELAY_BUDGET_TOKENS; unset: no limit).

        `workspace`: the git repository the agents work on (default: a fresh one relay
        creates); `auto_approve`: deliver without waiting for a human.
        """
        spec_id = check_spec_id(spec_id) if spec_id is not None else new_spec_id()
        spec = self._spec_input(request, iterate=False, limits=limits, workspace=workspace,
                                auto_approve=auto_approve, hooks=hooks, budget_usd=budget_usd,
                                budget_tokens=budget_tokens, gate_policy=gate_policy)
        try:
            await self.temporal.start_workflow(
                WORKFLOW_TYPE, spec, id=spec_id, task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                static_summary=spec_summary(spec_id, request))
        except WorkflowAlreadyStartedError:
            if await self._is_running(spec_id):
                raise SpecAlreadyRunning(f"spec {spec_id} is already running") from None
            raise SpecAlreadyExists(f"spec {spec_id} already exists; use 'relay iterate {spec_id} "
                                    "\"change request\"' for its next iteration") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        return spec_id

    @relay_errors
    async def iterate(self, spec_id: str, change_request: str, *, limits: Limits | None = None,
                      workspace: WorkspaceInput | None = None, auto_approve: bool = False,
                      hooks: list[HookEffect] | None = None, budget_usd: float | None = None,
                      budget_tokens: int | None = None,
                      gate_policy: GatePolicy | str | None = None) -> str:
        """Start the next iteration of a finished spec; all five agents resume their sessions.
        The spec keeps one budget over all iterations: a budget given here can only raise it."""
        check_spec_ref(spec_id)
        spec = self._spec_input(change_request, iterate=True, limits=limits, workspace=workspace,
                                auto_approve=auto_approve, hooks=hooks, budget_usd=budget_usd,
                                budget_tokens=budget_tokens, gate_policy=gate_policy)
        desc = await self._describe(spec_id)
        if desc.status == ExecStatus.RUNNING:
            raise SpecAlreadyRunning(f"spec {spec_id} is still running; wait for it or cancel it first")
        if await self._compensation_running(spec_id):
            raise SpecAlreadyRunning(f"spec {spec_id} is being compensated (relay compensate); "
                                     "iterate when it is done")
        try:
            handle = await self.temporal.start_workflow(
                WORKFLOW_TYPE, spec, id=spec_id, task_queue=self.settings.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
                static_summary=spec_summary(spec_id, change_request, iteration=True))
        except WorkflowAlreadyStartedError:
            raise SpecAlreadyRunning(f"spec {spec_id} is already running") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        return handle.result_run_id or ""

    # --- people in the loop ----------------------------------------------------------

    @relay_errors
    async def answer(self, spec_id: str, answers: Mapping[str, str]) -> AnswerAck:
        """Answer the clarifier's pending questions; rejected at once if they do not fit."""
        check_spec_ref(spec_id)
        if not isinstance(answers, Mapping):
            raise InvalidAnswer("answers must map question ids to text, not "
                                f"{type(answers).__name__}")
        try:
            for qid, text in answers.items():
                check_text(qid, "a question id")
                check_text(text, f"the answer to {one_line(repr(qid), 60)}")
        except InvalidRequest as exc:
            raise InvalidAnswer(f"answers must map question ids to text: {exc}") from None
        try:
            payload = AnswerInput(answers=dict(answers))
        except ValidationError as exc:
            raise InvalidAnswer(f"answers must map question ids to text: "
                                f"{validation_problem(exc)}") from None
        check_payload(payload, "the answers")
        try:
            return await self._handle(spec_id).execute_update(
                "answer", payload, result_type=AnswerAck, rpc_timeout=timedelta(seconds=30))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise InvalidAnswer(f"answer rejected: {one_line(getattr(cause, 'message', None) or cause)}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    @relay_errors
    async def approve(self, spec_id: str, *, reviewer: str | None = None,
                      comment: str | None = None) -> Decision:
        """Approve delivery of a validated change (the irreversible step)."""
        check_spec_ref(spec_id)
        check_text(reviewer, "the reviewer", optional=True)
        check_text(comment, "the comment", optional=True)
        return await self._decide(spec_id, "approve", ApprovalInput(reviewer=reviewer, comment=comment))

    @relay_errors
    async def reject(self, spec_id: str, reason: str, *, reviewer: str | None = None) -> Decision:
        """Reject the change; every side effect of the run is compensated."""
        check_spec_ref(spec_id)
        check_text(reason, "the reason")
        check_text(reviewer, "the reviewer", optional=True)
        if not reason.strip():
            raise InvalidRequest("a rejection needs a reason")
        return await self._decide(spec_id, "reject", RejectInput(reason=reason, reviewer=reviewer))

    async def _decide(self, spec_id: str, update: str, payload: BaseModel) -> Decision:
        check_payload(payload, f"the {update} decision")
        try:
            return await self._handle(spec_id).execute_update(
                update, payload, result_type=Decision, rpc_timeout=timedelta(seconds=30))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise InvalidAnswer(f"{update} refused: {one_line(getattr(cause, 'message', None) or cause)}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    @relay_errors
    async def budget(self, spec_id: str, *, add_usd: float | None = None,
                     add_tokens: int | None = None) -> Budget:
        """Raise a running spec's budget (the `raise_budget` update); returns the new budget.
        A spec waiting_for_budget goes on where it stopped; nothing already paid is paid again."""
        check_spec_ref(spec_id)
        try:
            payload = RaiseBudgetInput(add_usd=add_usd, add_tokens=add_tokens)
        except (ValidationError, ValueError) as exc:
            problem = (validation_problem(exc) if isinstance(exc, ValidationError)
                       else one_line(exc))
            raise InvalidRequest(f"invalid budget raise: {problem}") from None
        try:
            return await self._handle(spec_id).execute_update(
                "raise_budget", payload.model_dump(exclude_none=True), result_type=Budget,
                rpc_timeout=timedelta(seconds=30))
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            raise InvalidRequest(f"budget raise refused: "
                                 f"{one_line(getattr(cause, 'message', None) or cause)}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    @relay_errors
    def cost(self, spec_id: str) -> SpecCost:
        """What the spec has cost, from the registry (every session, every iteration), priced
        with this client's price table (RELAY_PRICES over the built-in one)."""
        check_spec_ref(spec_id)
        self.sessions(spec_id)  # SpecNotFound for an unknown spec
        return spec_cost(*self.registry.spend(spec_id), self.settings.price_table())

    @relay_errors
    async def compensate(self, spec_id: str) -> CompensationReport:
        """Re-run the compensations still pending for a spec that is not running."""
        check_spec_ref(spec_id)
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
                COMPENSATION_WORKFLOW, CompensationInput(spec_id=spec_id, limits=self._limits(None)),
                id=compensation_workflow_id(spec_id), task_queue=self.settings.task_queue,
                result_type=CompensationReport,
                id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING)
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    @relay_errors
    def effects(self, spec_id: str) -> list[EffectRecord]:
        """The effects ledger of a spec, oldest first."""
        check_spec_ref(spec_id)
        rows = Ledger(self.registry).effects(spec_id)
        if not rows and self.registry.spec(spec_id) is None:
            raise SpecNotFound(f"unknown spec {spec_id!r} in the registry")
        return rows

    @relay_errors
    async def cancel(self, spec_id: str) -> None:
        check_spec_ref(spec_id)
        await self._require_running(spec_id)
        try:
            await self._handle(spec_id).cancel()
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    # --- reading state -------------------------------------------------------------------

    @relay_errors
    async def status(self, spec_id: str, *, after: int | None = None) -> Status:
        """The spec's state. `after=K`: its `progress` holds only the events numbered above K
        (what a watcher has not seen yet); `progress_seq` is the newest event's number."""
        check_spec_ref(spec_id)
        if after is not None and (not isinstance(after, int) or isinstance(after, bool)
                                  or after < 0):
            raise InvalidRequest(f"after must be a whole number >= 0, not {after!r}")
        st = await self._status_of(spec_id, after=after)
        if st.stray_run and (real := await self._real_run(spec_id)) is not None:
            # a run started outside relay on this id was refused: the spec is its last real run
            shown = await self._status_of(spec_id, real, after=after)
            shown.stray_run = f"a run started outside relay on this spec id failed ({st.stray_run})"
            return shown
        return st

    async def _real_run(self, spec_id: str) -> str | None:
        """The spec's last real run when the newest run of its id is another (a stray one)."""
        try:
            spec = await asyncio.wait_for(asyncio.to_thread(self.registry.spec, spec_id), 5)
            newest = (await self._describe(spec_id)).run_id
        except Exception:  # noqa: BLE001  (no registry: show what Temporal has)
            return None
        if spec is None or spec.last_run_id == newest:
            return None
        return spec.last_run_id

    async def _status_of(self, spec_id: str, run_id: str | None = None, *,
                         after: int | None = None) -> Status:
        try:
            st = await self._handle(spec_id, run_id).query(
                "status", *([] if after is None else [{"after": after}]), result_type=Status,
                rpc_timeout=timedelta(seconds=20))
            if after is not None:  # a worker from before `after` existed sends every event
                st.progress = [e for e in st.progress if e.seq > after]
            return st
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
            raise RelayError(f"the status of spec {spec_id} cannot be read: {one_line(exc)}") from None
        except RPCTimeoutOrCancelledError:
            raise RelayError(f"Temporal did not answer in time for spec {spec_id} "
                             "(is a relay worker running?)") from None

    @relay_errors
    async def progress(self, spec_id: str, after: int = 0) -> list[ProgressEvent]:
        """The run's progress events numbered above `after`, oldest first (the status keeps the
        last PROGRESS_KEPT; the numbers tell a reader when older ones were missed)."""
        return (await self.status(spec_id, after=after)).progress

    @relay_errors
    async def diff(self, spec_id: str) -> ChangeDiff:
        """The validated change of the spec's current run: diff stat and diff, as a worker
        computed them when the validator approved (capped; `truncated` says so). Before that,
        empty, with a `note` saying why."""
        check_spec_ref(spec_id)
        try:
            return await self._handle(spec_id).query(
                "diff", result_type=ChangeDiff, rpc_timeout=timedelta(seconds=20))
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None
        except (WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
            raise RelayError(f"the diff of spec {spec_id} cannot be read: {one_line(exc)}") from None
        except RPCTimeoutOrCancelledError:
            raise RelayError(f"Temporal did not answer in time for spec {spec_id} "
                             "(is a relay worker running?)") from None

    def web_ui_url(self, spec_id: str) -> str | None:
        """The spec's page in the Temporal Web UI, or None when relay does not know the UI:
        RELAY_WEB_UI_URL (e.g. http://localhost:8233), else the running `relay dev`'s UI when
        this client talks to its server."""
        base = os.environ.get("RELAY_WEB_UI_URL", "").strip().rstrip("/")
        if not base:
            dev = running_dev(self.settings.data_dir)
            config = getattr(getattr(self.temporal, "service_client", None), "config", None)
            if dev and dev.get("ui") and getattr(config, "target_host", None) == dev.get("address"):
                base = str(dev["ui"]).rstrip("/")
        if not base or not isinstance(spec_id, str):
            return None
        namespace = getattr(self.temporal, "namespace", None) or self.settings.namespace
        return f"{base}/namespaces/{quote(namespace, safe='')}/workflows/{quote(spec_id, safe='')}"

    @relay_errors
    async def registry_problem(self, spec_id: str | None = None, timeout: float = 5.0) -> str | None:
        """Why the registry cannot be read right now, or None when it can.

        `relay status` shows Temporal's view of a spec even while the registry is down, and says
        that it is down. A read that hangs (a server that stopped answering) counts as down."""
        if spec_id is not None:
            check_spec_ref(spec_id)

        def probe() -> None:
            self.registry.spec(spec_id or "")

        try:
            await asyncio.wait_for(asyncio.to_thread(probe), timeout)
        except asyncio.TimeoutError:
            return f"the relay registry did not answer within {timeout:g} s"
        except RelayError as exc:
            return str(exc)
        except SQLAlchemyError as exc:
            return f"the relay registry failed: {one_line(getattr(exc, 'orig', None) or exc)}"
        return None

    @relay_errors
    async def result(self, spec_id: str) -> PipelineResult:
        """Wait for the current run to finish; raises SpecFailed with the reason if it failed."""
        check_spec_ref(spec_id)
        try:
            return await self._handle(spec_id).result()
        except WorkflowFailureError as exc:
            cause = exc.cause
            if getattr(cause, "type", None) == "SpecConflict" and (
                    real := await self._real_run(spec_id)) is not None:
                return await self._result_of(spec_id, real)
            reason = getattr(cause, "message", None) or str(cause)
            raise SpecFailed(f"spec {spec_id} {_status_word(cause)}: {one_line(reason)}") from None
        except RPCError as exc:
            raise _rpc_error(exc, spec_id) from None

    async def _result_of(self, spec_id: str, run_id: str) -> PipelineResult:
        try:
            return await self._handle(spec_id, run_id).result()
        except WorkflowFailureError as exc:
            reason = getattr(exc.cause, "message", None) or str(exc.cause)
            raise SpecFailed(f"spec {spec_id} {_status_word(exc.cause)}: {one_line(reason)}") from None

    @relay_errors
    def sessions(self, spec_id: str) -> list[AgentSession]:
        check_spec_ref(spec_id)
        rows = self.registry.sessions(spec_id)
        if not rows and self.registry.spec(spec_id) is None:
            raise SpecNotFound(f"unknown spec {spec_id!r} in the registry")
        return rows

    @relay_errors
    def history(self, spec_id: str, role: Role | str) -> tuple[AgentSession, list[SessionMessage]]:
        check_spec_ref(spec_id)
        try:
            role = Role(role)
        except (ValueError, TypeError):
            raise InvalidRequest(f"unknown role {one_line(repr(role), 80)}; roles: "
                                 + ", ".join(r.value for r in Role)) from None
        session = self.registry.find_session(spec_id, role)
        if session is None:
            self.sessions(spec_id)  # raises SpecNotFound for an unknown spec
            raise SpecNotFound(f"spec {spec_id} has no {role.value} session yet")
        return session, self.registry.messages(session.id)

    @relay_errors
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


def _too_large(exc: RPCError) -> bool:
    """The server's words for a payload over its blob limit or over gRPC's message limit."""
    message = exc.message.lower()
    return ("size exceeds limit" in message or "larger than max" in message
            or (exc.status == RPCStatusCode.RESOURCE_EXHAUSTED and "size" in message))


def _rpc_error(exc: RPCError, spec_id: str | None) -> RelayError:
    spec = f"spec {spec_id}" if spec_id is not None else "the call"
    if _too_large(exc):
        return PayloadTooLarge(f"Temporal refused {spec}: the payload is too large "
                               f"({one_line(exc.message)})")
    if exc.status == RPCStatusCode.NOT_FOUND and exc.message.lower().startswith("namespace "):
        # e.g. TEMPORAL_NAMESPACE names one this server lacks: not an unknown spec
        return InvalidSettings(f"Temporal: {one_line(exc.message)} (check RELAY_NAMESPACE, "
                               "TEMPORAL_NAMESPACE or the temporal.toml profile)")
    if exc.status == RPCStatusCode.NOT_FOUND:
        if "already completed" in exc.message or "closed" in exc.message:
            return SpecNotRunning(f"{spec} is not running any more")
        return SpecNotFound(f"unknown spec {spec_id!r}" if spec_id is not None else
                            f"not found: {one_line(exc.message)}")
    if exc.status == RPCStatusCode.UNAVAILABLE:
        return TemporalUnreachable(f"Temporal is unreachable: {one_line(exc.message)}")
    if exc.status == RPCStatusCode.DEADLINE_EXCEEDED:
        return RelayError(f"Temporal did not answer in time for {spec} "
                          "(is a relay worker running?)")
    if exc.status == RPCStatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"Temporal refused {spec}: {one_line(exc.message)}")
    return RelayError(f"Temporal refused the call for {spec}: {one_line(exc.message)}")


def _status_word(cause: object) -> str:
    return "was cancelled" if type(cause).__name__ == "CancelledError" else "failed"
