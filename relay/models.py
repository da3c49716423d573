"""Contracts shared by the workflow, the activities, the client and the scripted model.

Pure pydantic, no I/O and no clock/uuid default factories: workflows build these
models, and the sandbox would not catch a non-deterministic default here.
Every field added later must carry a default so running workflows keep decoding.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

WORKFLOW_TYPE = "SpecPipeline"
PHASE_SEARCH_ATTRIBUTE = "RelayPhase"
# How a run ended (delivered, rejected, plan_rejected, change_rejected, failed, cancelled):
# the Web UI's workflow list shows it, where every finished spec is a green COMPLETED.
OUTCOME_SEARCH_ATTRIBUTE = "RelayOutcome"
SCRIPTED_MODEL_PREFIX = "relay-scripted"


class Role(str, Enum):
    clarifier = "clarifier"
    planner = "planner"
    auditor = "auditor"
    constructor = "constructor"
    validator = "validator"


ROLES: tuple[Role, ...] = tuple(Role)


SPEC_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
SPEC_ID_MAX = 200


def spec_id_problem(spec_id: str) -> str | None:
    """Why a spec id is not allowed, or None. It names a git branch and a directory."""
    if not spec_id or len(spec_id) > SPEC_ID_MAX or not re.match(SPEC_ID_PATTERN, spec_id) or (
            spec_id.endswith(".lock")):
        return (f"invalid spec id {spec_id!r}: use 1-{SPEC_ID_MAX} letters, digits, '_', '-' and "
                "single dots between them, starting with a letter or digit")
    return None


def is_scripted(model: str | None) -> bool:
    return bool(model) and model.startswith(SCRIPTED_MODEL_PREFIX)  # type: ignore[union-attr]


# --- structured outputs of the five agents (the forced tool's input schema) ---


class Question(BaseModel):
    id: str = Field(description="Short stable id, e.g. q1")
    text: str = Field(min_length=1)


class Clarification(BaseModel):
    """Clarifier: either questions for the human, or the clarified spec."""

    questions: list[Question] = Field(default_factory=list)
    clarified_spec: str | None = Field(
        default=None, description="The complete clarified spec; null while questions remain"
    )

    @field_validator("questions")
    @classmethod
    def _unique_ids(cls, qs: list[Question]) -> list[Question]:
        ids = [q.id for q in qs]
        if len(ids) != len(set(ids)):
            raise ValueError("question ids must be unique")
        return qs

    def model_post_init(self, _ctx: object) -> None:
        if not self.questions and not (self.clarified_spec or "").strip():
            raise ValueError("give either questions or a non-empty clarified_spec")


class Plan(BaseModel):
    summary: str = Field(min_length=1)
    steps: list[str] = Field(min_length=1)


class Audit(BaseModel):
    approved: bool
    findings: list[str] = Field(default_factory=list)


class FileChange(BaseModel):
    path: str = Field(min_length=1)
    content: str


class Change(BaseModel):
    summary: str = Field(min_length=1)
    files: list[FileChange] = Field(default_factory=list)


class Validation(BaseModel):
    approved: bool
    failures: list[str] = Field(default_factory=list)


OUTPUT_MODELS: dict[Role, type[BaseModel]] = {
    Role.clarifier: Clarification,
    Role.planner: Plan,
    Role.auditor: Audit,
    Role.constructor: Change,
    Role.validator: Validation,
}

# Tool names are part of the wire contract with models (and the scripted model).
OUTPUT_TOOLS: dict[Role, str] = {
    Role.clarifier: "submit_clarification",
    Role.planner: "submit_plan",
    Role.auditor: "submit_audit",
    Role.constructor: "submit_change",
    Role.validator: "submit_validation",
}
ROLE_BY_TOOL: dict[str, Role] = {v: k for k, v in OUTPUT_TOOLS.items()}


# --- workflow input / human input -------------------------------------------


MAX_ATTEMPTS = 1_000
MAX_DURATION_S = 30 * 24 * 3600.0  # 30 days
MAX_ROUNDS = 1_000


def _attempts(default: int, description: str | None = None) -> Any:
    return Field(default=default, ge=1, le=MAX_ATTEMPTS, description=description)


def _duration(default: float, description: str | None = None) -> Any:
    # finite and bounded: a timer of inf or 1e300 seconds cannot be scheduled, and a workflow
    # that tries fails its task forever instead of failing cleanly
    return Field(default=default, gt=0, le=MAX_DURATION_S, allow_inf_nan=False,
                 description=description)


class Source(str, Enum):
    """Where an output came from."""

    primary = "primary"
    fallback = "fallback"
    cache = "cache"
    human = "human"


class Trust(str, Enum):
    """How far an output may be acted on: `full` only when freshly earned from the primary."""

    full = "full"
    degraded = "degraded"
    untrusted = "untrusted"


class Provenance(BaseModel):
    """Where a step's output came from, and which upstream degraded steps it was computed from."""

    source: Source = Source.primary
    trust: Trust = Trust.full
    model: str = ""
    prompt_version: str = ""
    tainted_by: list[str] = Field(default_factory=list,
                                  description="ids of the upstream degraded or untrusted steps")

    @property
    def tainted(self) -> bool:
        return self.trust != Trust.full or bool(self.tainted_by)


class Limits(BaseModel):
    """Bounds of one run. The client fills them from settings; raw JSON may omit them.

    Every bound is finite: attempts <= 1,000, durations <= 30 days, rounds >= 1.
    """

    max_request_bytes: int = Field(default=200_000, ge=1, le=2_000_000)
    max_clarify_rounds: int = Field(default=3, ge=1, le=MAX_ROUNDS)
    max_audit_rounds: int = Field(default=3, ge=1, le=MAX_ROUNDS)
    max_fix_rounds: int = Field(default=3, ge=1, le=MAX_ROUNDS)
    answer_timeout_s: float | None = _duration(None, "no deadline when null")  # type: ignore[arg-type]
    model_max_attempts: int = _attempts(6)
    turn_timeout_s: float = _duration(600)
    # 15 s: a turn whose worker died is retried about 15 s later (the cost: a heartbeat every
    # few seconds per running activity)
    heartbeat_timeout_s: float = _duration(15)
    max_tool_steps: int = Field(default=25, ge=1, le=MAX_ROUNDS,
                                description="model calls per agent turn with tools")
    check_timeout_s: float = _duration(300)
    effect_max_attempts: int = _attempts(5)
    compensation_max_attempts: int = _attempts(3)
    # Gate 1: a capacity error (429, 529, 5xx, timeout, connection) is retried this many times
    # on one model, then the next model of the role's chain answers; without one, the spec
    # waits for the model (phase waiting_for_model) on the schedule below, never failing.
    capacity_attempts: int = _attempts(3, "attempts on one model before falling back or waiting")
    destructive_share: float = Field(
        default=0.5, gt=0, le=1, description="a change removing more than this share of a "
                                             "file's lines is destructive: a person approves it")
    max_retry_after_s: float = _duration(
        60, "a retry-after longer than this falls back (or waits) at once")
    model_wait_s: float = _duration(30, "first wait while no model of the chain is available")
    model_wait_max_s: float = _duration(900, "longest wait between tries of an unavailable model")
    model_call_timeout_s: float | None = _duration(  # type: ignore[arg-type]
        None, "timeout of one model call; null: sized to the tokens requested")


class WorkspaceInput(BaseModel):
    """Where the agents work: a git repository (or, without a path, a fresh one relay creates)."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(default=None, description="Path of a git repository on the workers")
    target: str = Field(default="main", min_length=1, description="Branch the change is delivered to")
    check: str | None = Field(default=None, description="Check command run by the validator")

    @field_validator("check")
    @classmethod
    def _blank_check_is_none(cls, value: str | None) -> str | None:
        """A command of only spaces would "pass" (the shell exits 0): it is no command."""
        return (value.strip() or None) if isinstance(value, str) else value


class HookEffect(BaseModel):
    """An adopter's registered effect, run by the pipeline at a stage."""

    model_config = ConfigDict(extra="forbid")

    effect: str
    payload: dict[str, Any] = Field(default_factory=dict)
    at: Literal["prepare", "deliver"] = "prepare"


MAX_BUDGET_USD = 1_000_000.0
MAX_BUDGET_TOKENS = 10**12


class Budget(BaseModel):
    """One budget per spec, shared by all five agents across iterations; None: no limit."""

    usd: float | None = None
    tokens: int | None = None


class RaiseBudgetInput(BaseModel):
    """What the `raise_budget` update (and `raise_budget_signal`) adds: {"add_usd": 2.0}."""

    model_config = ConfigDict(extra="forbid", strict=True)

    add_usd: float | None = Field(default=None, gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False)
    add_tokens: int | None = Field(default=None, gt=0, le=MAX_BUDGET_TOKENS)

    def model_post_init(self, _ctx: object) -> None:
        if self.add_usd is None and self.add_tokens is None:
            raise ValueError('give add_usd and/or add_tokens, e.g. {"add_usd": 2.0}')


class GatePolicy(str, Enum):
    """What Gate 2 does with a tainted trajectory before an irreversible step."""

    recheck = "recheck"  # re-run the degraded steps on the primary; a human if they differ
    human = "human"  # always a human


class SpecInput(BaseModel):
    """Input of the SpecPipeline workflow. Plain JSON: {"request": "..."}."""

    model_config = ConfigDict(extra="forbid")

    request: str = Field(description="The request (first run) or the change request (iterate)")
    iterate: bool = Field(default=False, description="Next iteration of an existing spec")
    limits: Limits = Field(default_factory=Limits)
    workspace: WorkspaceInput = Field(default_factory=WorkspaceInput)
    auto_approve: bool = Field(default=False, description="Deliver without waiting for a human")
    hooks: list[HookEffect] = Field(default_factory=list)
    budget_usd: float | None = Field(
        default=None, gt=0, le=MAX_BUDGET_USD, allow_inf_nan=False,
        description="The spec's budget in USD, all agents and iterations; null: no limit")
    budget_tokens: int | None = Field(
        default=None, gt=0, le=MAX_BUDGET_TOKENS,
        description="The spec's budget in tokens (input, output, cache read and write); "
                    "null: no limit")
    fallback_models: list[str] = Field(
        default_factory=list, description="Models that answer, in order, when the primary is "
                                          "out of capacity (429/529/5xx/timeouts)")
    fallback_models_by_role: dict[Role, list[str]] = Field(
        default_factory=dict, description="Per-role fallback chains, overriding fallback_models")
    gate_policy: GatePolicy = Field(
        default=GatePolicy.recheck, description="Gate 2 on a tainted trajectory: recheck or human")

    def fallbacks(self, role: Role) -> list[str]:
        return list(self.fallback_models_by_role.get(role, self.fallback_models))


class ApprovalInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reviewer: str | None = None
    comment: str | None = None


class RejectInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1)
    reviewer: str | None = None


class Decision(BaseModel):
    approved: bool
    reviewer: str | None = None
    reason: str | None = None


class AnswerInput(BaseModel):
    """Answers to the clarifier's pending questions, by question id."""

    model_config = ConfigDict(extra="forbid")

    answers: dict[str, str]


class AnswerAck(BaseModel):
    accepted: list[str]
    round: int


# --- activity contracts ---------------------------------------------------------


class TokenUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_input_tokens=self.cache_read_input_tokens + other.cache_read_input_tokens,
            cache_creation_input_tokens=self.cache_creation_input_tokens
            + other.cache_creation_input_tokens,
        )


class Cost(BaseModel):
    """What a spec (or a role) cost: recorded usage x the price table of the model that
    answered, plus model calls whose answer was lost (sent, never recorded) as possibly billed,
    at their pre-call estimate (an upper bound)."""

    usd: float = 0.0
    tokens: int = Field(default=0, description="input + output + cache read + cache write")
    calls: int = Field(default=0, description="recorded model answers")
    possibly_billed_calls: int = 0
    possibly_billed_usd: float = 0.0
    possibly_billed_tokens: int = 0
    unpriced_models: list[str] = Field(
        default_factory=list, description="models with no price: their tokens count, not in usd")

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            usd=self.usd + other.usd, tokens=self.tokens + other.tokens,
            calls=self.calls + other.calls,
            possibly_billed_calls=self.possibly_billed_calls + other.possibly_billed_calls,
            possibly_billed_usd=self.possibly_billed_usd + other.possibly_billed_usd,
            possibly_billed_tokens=self.possibly_billed_tokens + other.possibly_billed_tokens,
            unpriced_models=sorted(set(self.unpriced_models) | set(other.unpriced_models)))


class SpecCost(BaseModel):
    """A spec's cost over all its sessions and iterations, in total and per role."""

    total: Cost = Field(default_factory=Cost)
    by_role: dict[str, Cost] = Field(default_factory=dict)


class BudgetWait(BaseModel):
    """Why a spec waits for budget: the call it would make and what is spent already."""

    role: Role
    turn: int
    step: int = 0
    estimate_tokens: int = 0
    estimate_usd: float | None = None
    spent_tokens: int = 0
    spent_usd: float = 0.0
    budget: Budget = Field(default_factory=Budget)
    reason: str = ""
    spend: SpecCost | None = None


class SessionRef(BaseModel):
    role: Role
    session_id: str
    name: str
    state: str = "idle"
    turns: int = 0


class OpenSpecInput(BaseModel):
    spec_id: str
    run_id: str
    request: str
    iterate: bool = False
    workspace: WorkspaceInput | None = None
    budget: Budget | None = Field(default=None, description="this run's budget (raises only)")


class OpenSpecResult(BaseModel):
    spec_id: str
    iteration: int
    original_request: str
    sessions: list[SessionRef]
    workspace: WorkspaceInput | None = Field(
        default=None, description="The spec's workspace: an iteration without a path reuses it")
    budget: Budget | None = Field(default=None, description="The spec's budget, as recorded")
    spend: SpecCost | None = Field(default=None, description="What the spec has cost so far")


# Kinds of user turn; each has a template file per role under relay/prompts/.
TurnKind = Literal[
    "clarify", "answers", "finalize", "iterate",
    "plan", "revise", "audit", "construct", "fix", "validate",
]


class WorkspaceRef(BaseModel):
    """A prepared workspace: the branch's worktree the agents' tools act in."""

    repo: str
    target: str
    branch: str
    worktree: str
    check: str | None = None
    base: str = ""


class ToolUse(BaseModel):
    """One workspace tool call of a turn, as progress shows it: `write_file greeting.py`."""

    name: str
    path: str | None = None
    error: bool = False


class AgentTurnInput(BaseModel):
    spec_id: str
    role: Role
    turn: int = Field(ge=1, description="Turn number within the role's session; the idempotency key")
    kind: TurnKind
    variables: dict[str, str] = Field(default_factory=dict)
    iteration: int = 1
    workspace: WorkspaceRef | None = None
    max_tool_steps: int = 25
    check_timeout_s: float = 300
    budget: Budget | None = Field(default=None, description="checked before every model call")


class ToolCallRef(BaseModel):
    """A tool call the model made; its input stays in the registry (the recorded answer)."""

    id: str
    name: str


class ToolResultBlock(BaseModel):
    tool_use_id: str
    content: str
    is_error: bool = False


class ModelStepInput(BaseModel):
    """One model call of an agent turn's loop; (spec, role, turn, step) is its idempotency key."""

    spec_id: str
    role: Role
    turn: int = Field(ge=1)
    step: int = Field(ge=0)
    kind: TurnKind
    variables: dict[str, str] = Field(default_factory=dict, description="step 0 only")
    iteration: int = 1
    workspace: WorkspaceRef | None = None
    model: str | None = Field(default=None, description="None: the worker's primary model")
    source: Source = Source.primary
    tool_results: list[ToolResultBlock] = Field(
        default_factory=list, description="results of the previous step's tool calls")
    tainted_by: list[str] = Field(default_factory=list, description="taint of the step's inputs")
    capacity_attempts: int = 3
    max_retry_after_s: float = 60
    call_timeout_s: float | None = None
    budget: Budget | None = Field(default=None, description="checked before the call is paid")


class ModelStepResult(BaseModel):
    """What the workflow needs of a model call; the exchange itself stays in the registry."""

    session_id: str
    session_name: str
    step_id: str
    output: dict | None = None
    error: str | None = None
    refused: bool = False
    cut: bool = False
    tool_calls: list[ToolCallRef] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    provenance: Provenance = Field(default_factory=Provenance)
    replayed: bool = False
    spend: SpecCost | None = Field(default=None, description="The spec's cost after this step")
    cost_usd: float | None = Field(default=None, description="What this attempt paid")


class ToolStepInput(BaseModel):
    spec_id: str
    role: Role
    session_id: str
    turn: int
    step: int
    index: int
    call_id: str
    name: str
    iteration: int = 1
    workspace: WorkspaceRef
    check_timeout_s: float = 300


class ToolStepResult(BaseModel):
    block: ToolResultBlock
    changed_path: str | None = None
    unsandboxed: bool = False
    use: ToolUse | None = Field(default=None, description="the call and its path, for progress")
    check_report: str | None = Field(default=None, description="the tail of a run_checks output")


class AgentTurnResult(BaseModel):
    session_id: str
    session_name: str
    turn: int
    output: dict
    model: str
    source: str = "primary"
    trust: str = "full"
    usage: TokenUsage = Field(default_factory=TokenUsage)
    replayed: bool = Field(default=False, description="Served from the registry, model not called")
    repaired: bool = False
    tool_calls: int = 0
    effects: list[str] = Field(default_factory=list, description="Ledger keys of effects made")
    changed_paths: list[str] = Field(default_factory=list)
    unsandboxed_checks: bool = Field(
        default=False, description="A check ran outside the sandbox (RELAY_UNSANDBOXED_CHECKS=1)")
    spend: SpecCost | None = Field(default=None, description="The spec's cost after this turn")
    cost_usd: float | None = Field(default=None, description="What this attempt paid (as usage)")
    tool_uses: list[ToolUse] = Field(
        default_factory=list, description="The turn's workspace tool calls, in order, with paths")
    check_report: str | None = Field(
        default=None, description="The tail of the turn's last run_checks output (validator)")
    provenance: Provenance | None = None
    step_ids: list[str] = Field(default_factory=list, description="the turn's model steps")


class EffectInput(BaseModel):
    spec_id: str
    step: str = Field(description="Stable id of the step within the spec, e.g. i1/commit/r2")
    effect: str
    payload: dict[str, Any] = Field(default_factory=dict)
    key: str | None = Field(default=None, description="Explicit idempotency key (adopters)")
    max_attempts: int = 5
    reversible_only: bool = Field(default=False, description="Refuse irreversible effects")


class PrepareWorkspaceInput(BaseModel):
    spec_id: str
    iteration: int = 1
    workspace: WorkspaceInput = Field(default_factory=WorkspaceInput)


class EffectResult(BaseModel):
    key: str
    effect: str
    status: str
    result: dict[str, Any] = Field(default_factory=dict)
    replayed: bool = False


class EffectRef(BaseModel):
    key: str
    effect: str
    step: str
    status: str
    reversible: bool = True
    error: str | None = None


class PendingCompensationsInput(BaseModel):
    spec_id: str
    run_id: str | None = None


class CompensateInput(BaseModel):
    key: str


class NeedsHumanInput(BaseModel):
    key: str
    reason: str


class CompensationInput(BaseModel):
    """Input of the SpecCompensation workflow (`relay compensate`)."""

    spec_id: str
    limits: Limits = Field(default_factory=Limits)


class CompensationReport(BaseModel):
    spec_id: str
    compensated: list[EffectRef] = Field(default_factory=list)
    needs_human: list[EffectRef] = Field(default_factory=list)


class SessionStateInput(BaseModel):
    spec_id: str
    state: str
    roles: list[Role] = Field(default_factory=lambda: list(ROLES))
    spec_status: str | None = None
    outcome: str | None = None
    error: str | None = None
    budget: Budget | None = Field(default=None, description="recorded for the next iteration")


# --- query / result -------------------------------------------------------------


class Phase(str, Enum):
    starting = "starting"
    clarifying = "clarifying"
    waiting_for_answers = "waiting_for_answers"
    planning = "planning"
    auditing = "auditing"
    constructing = "constructing"
    validating = "validating"
    waiting_for_approval = "waiting_for_approval"
    waiting_for_budget = "waiting_for_budget"
    waiting_for_model = "waiting_for_model"
    rechecking = "rechecking"
    delivering = "delivering"
    compensating = "compensating"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


REJECTED_KEPT = 20


class PendingQuestions(BaseModel):
    round: int
    questions: list[Question]


PROGRESS_KEPT = 100  # progress events a spec's status keeps (the newest); all are numbered
REVIEW_DIFF_MAX = 128_000  # characters of the validated diff kept in workflow state


class ProgressEvent(BaseModel):
    """One step of a run, as it happened: what `relay watch` prints, numbered from 1.

    Built in workflow code from workflow.now(): `at` is always set explicitly."""

    seq: int
    at: datetime | None = None
    kind: str = Field(description="opened, workspace, phase, turn, answers, commit, review, "
                                  "decision, delivered, compensated")
    phase: str | None = None
    role: str | None = None
    turn: int | None = None
    text: str = Field(default="", description="The line a person reads")
    detail: str | None = Field(default=None, description="Lines shown under it (a failing check)")
    elapsed_s: float | None = Field(default=None, description="How long the step took")
    usage: TokenUsage | None = None
    cost_usd: float | None = None
    tools: list[ToolUse] = Field(default_factory=list)
    verdict: str | None = Field(default=None, description="approved / rejected (auditor, validator)")


class ReviewFile(BaseModel):
    path: str
    added: int | None = None  # None: a binary file
    deleted: int | None = None


class Review(BaseModel):
    """What a reviewer needs at approval: the validated change, the verdict and the checks."""

    commit: str | None = Field(default=None, description="The validated commit")
    base: str | None = Field(default=None, description="The target's commit the branch was cut from")
    repo: str | None = None
    branch: str | None = None
    target: str | None = None
    worktree: str | None = None
    approved: bool | None = Field(default=None, description="The validator's verdict")
    failures: list[str] = Field(default_factory=list)
    check_command: str | None = None
    check_report: str | None = Field(default=None, description="The tail of the check output")
    diff_stat: str = ""
    files: list[ReviewFile] = Field(default_factory=list)
    insertions: int = 0
    deletions: int = 0
    diff_chars: int = Field(default=0, description="Size of the whole diff")
    diff_truncated: bool = False
    diff_error: str | None = Field(default=None, description="Why the diff could not be read")


class DescribeChangeInput(BaseModel):
    repo: str
    base: str
    commit: str
    max_chars: int = REVIEW_DIFF_MAX


class ChangeDescription(BaseModel):
    """The validated change as git has it (computed on a worker, which has the repository)."""

    stat: str = ""
    files: list[ReviewFile] = Field(default_factory=list)
    insertions: int = 0
    deletions: int = 0
    diff: str = ""
    diff_chars: int = 0
    truncated: bool = False


class ChangeDiff(BaseModel):
    """The `diff` query: the validated change of the current run (empty before validation)."""

    spec_id: str
    commit: str | None = None
    base: str | None = None
    stat: str = ""
    diff: str = ""
    diff_chars: int = 0
    truncated: bool = False
    note: str | None = Field(default=None, description="Why there is no diff (yet)")


class ModelWait(BaseModel):
    """A model that stays unavailable: the spec waits for it, visibly, and tries again."""

    role: Role
    model: str
    last_error: str
    next_attempt_at: str = Field(description="ISO 8601, UTC")
    waited_s: float = 0


class DegradedStep(BaseModel):
    """A step whose output was not freshly earned from the primary, or computed from one."""

    step_id: str
    role: Role
    provenance: Provenance
    reason: str = ""
    verified_by: str | None = None


class RecheckInput(BaseModel):
    spec_id: str
    iteration: int
    role: Role
    session_id: str
    turn: int
    step: int
    step_id: str
    workspace: WorkspaceRef | None = None
    call_timeout_s: float | None = None


class RecheckResult(BaseModel):
    """A degraded step re-run on the primary with the same inputs, compared role-aware."""

    step_id: str
    role: Role
    model: str = ""
    agree: bool | None = Field(default=None, description="None: the re-check could not be made")
    diff: list[str] = Field(default_factory=list)
    error: str | None = None


class ChangedFile(BaseModel):
    path: str
    status: str  # A added, M modified, D deleted (git's letters)
    added: int = 0
    removed: int = 0
    lines_before: int = 0


class InspectChangeInput(BaseModel):
    spec_id: str
    workspace: WorkspaceRef
    commit: str | None = None
    declared: list[FileChange] = Field(default_factory=list)
    destructive_share: float = 0.5
    hooks: list[str] = Field(default_factory=list, description="effects run at delivery")


class ChangeReport(BaseModel):
    """The branch's real change against the target: what the validator judges, what lands."""

    files: list[ChangedFile] = Field(default_factory=list)
    diff: str = Field(default="", description="the unified diff, cut to a bounded size")
    destructive: list[str] = Field(default_factory=list, description="why a person must approve")
    declared_mismatch: list[str] = Field(
        default_factory=list, description="declared files that differ from the branch")

    @property
    def empty(self) -> bool:
        return not self.files


class GateReport(BaseModel):
    """Gate 2 before an irreversible step: the trajectory checked, and who or what cleared it."""

    policy: GatePolicy = GatePolicy.recheck
    tainted: bool = False
    degraded_steps: list[str] = Field(default_factory=list)
    rechecks: list[RecheckResult] = Field(default_factory=list)
    destructive: list[str] = Field(default_factory=list)
    needs_human: bool = False
    reason: str = ""
    decision: str | None = None  # proceed | verified | approved | rejected
    decided_by: str | None = None
    decided_at: str | None = None


class GateRecordInput(BaseModel):
    spec_id: str
    iteration: int
    key: str
    decision: str
    decided_by: str
    reason: str = ""
    steps: list[str] = Field(default_factory=list)


class Status(BaseModel):
    spec_id: str
    iteration: int = 0
    phase: Phase = Phase.starting
    current_role: Role | None = None
    rounds: dict[str, int] = Field(default_factory=dict)
    pending: PendingQuestions | None = None
    sessions: list[SessionRef] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    usage_by_role: dict[str, TokenUsage] = Field(default_factory=dict)
    models: list[str] = Field(default_factory=list)
    flags: list[str] = Field(default_factory=list)
    outcome: str | None = None
    error: str | None = None
    rejected_inputs: list[str] = Field(
        default_factory=list, description=f"the last {REJECTED_KEPT} refused signals, newest last")
    rejected_count: int = Field(default=0, description="every refused signal, counted")
    waiting_for: str | None = None
    workspace: WorkspaceRef | None = None
    effects: list[EffectRef] = Field(default_factory=list)
    needs_human: list[EffectRef] = Field(default_factory=list)
    decision: Decision | None = None
    delivery: dict[str, Any] | None = None
    validated_commit: str | None = Field(
        default=None, description="the commit the validator checked; delivery merges exactly it")
    cost: Cost | None = Field(default=None, description="the spec's cost, all iterations")
    cost_by_role: dict[str, Cost] = Field(default_factory=dict)
    budget: Budget | None = None
    budget_wait: BudgetWait | None = Field(
        default=None, description="while waiting_for_budget: the call that would exceed it")
    started_at: datetime | None = Field(default=None, description="when this run started")
    progress: list[ProgressEvent] = Field(
        default_factory=list, description=f"the last {PROGRESS_KEPT} progress events, oldest first")
    progress_seq: int = Field(default=0, description="the number of the newest progress event")
    review: Review | None = Field(default=None, description="the validated change, for approval")
    stray_run: str | None = Field(
        default=None, description="a run started on this spec id outside relay (raw CLI, Web UI) "
                                  "that was refused without touching the spec, and why")
    model_wait: ModelWait | None = None
    gate: GateReport | None = None
    change_report: ChangeReport | None = None
    degraded: list[DegradedStep] = Field(
        default_factory=list, description="degraded or tainted steps of this run's trajectory")


class PipelineResult(BaseModel):
    spec_id: str
    iteration: int
    outcome: Literal["approved", "delivered", "plan_rejected", "change_rejected", "rejected"]
    clarified_spec: str
    plan: Plan
    change: Change | None = None
    validation: Validation | None = None
    flags: list[str] = Field(default_factory=list)
    usage: TokenUsage = Field(default_factory=TokenUsage)
    models: list[str] = Field(default_factory=list)
    delivery: dict[str, Any] | None = None
    branch: str | None = None
    compensated: list[EffectRef] = Field(default_factory=list)
    needs_human: list[EffectRef] = Field(default_factory=list)
    decision: Decision | None = None
    validated_commit: str | None = None
    cost: Cost | None = None
    cost_by_role: dict[str, Cost] = Field(default_factory=dict)
    budget: Budget | None = None
    repository: str | None = Field(default=None, description="the repository worked on")
    worktree: str | None = None
    review: Review | None = None
    degraded: list[DegradedStep] = Field(default_factory=list)
    gate: GateReport | None = None
