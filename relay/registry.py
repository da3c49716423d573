"""The handshake registry: which conversation belongs to which spec and role.

It answers the three handshake questions — discovery (the session of
spec-42's planner), naming (Kael-planner instead of ses_1d6f…) and
orchestration state (is the planner running? has the validator approved?) —
and stores the conversation bodies, so Temporal history only ever holds
references. Appends are idempotent on (session, turn, step, role): a retried or
duplicated activity attempt can never record a model exchange twice.

Synchronous SQLAlchemy; activities call it through a thread.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import structlog
from sqlalchemy import JSON, Column, UniqueConstraint, event, func, or_, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.dml import Update
from sqlmodel import Field, Session, SQLModel, create_engine, select

from relay.models import ROLES, Role, TokenUsage

T = TypeVar("T")
_log = structlog.get_logger("relay.registry")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SpecRecord(SQLModel, table=True):
    __tablename__ = "relay_spec"

    spec_id: str = Field(primary_key=True)
    request: str
    iteration: int = 1
    last_run_id: str
    status: str = "running"
    outcome: str | None = None
    workspace: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    # one budget for the spec, all agents and iterations (None: no limit); raised, never lowered
    budget_usd: float | None = None
    budget_tokens: int | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class AgentSession(SQLModel, table=True):
    __tablename__ = "relay_agent_session"
    __table_args__ = (UniqueConstraint("spec_id", "role", name="uq_session_spec_role"),)

    id: str = Field(primary_key=True)
    spec_id: str = Field(index=True)
    role: str
    name: str
    model: str | None = None
    status: str = "idle"  # idle | running | waiting | done | failed
    turns: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    prompt_version: str | None = None
    lease_owner: str | None = Field(default=None, index=True)  # the attempt working on a turn
    lease_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class SessionMessage(SQLModel, table=True):
    __tablename__ = "relay_session_message"
    __table_args__ = (
        UniqueConstraint("session_id", "seq", name="uq_message_seq"),
        UniqueConstraint("session_id", "turn", "step", "role", name="uq_message_exchange"),
    )

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(foreign_key="relay_agent_session.id", index=True)
    seq: int
    turn: int
    step: int = 0  # 0 = the turn's first exchange, 1 = its repair exchange
    role: str  # user | assistant
    content: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    model: str | None = None
    source: str = "primary"  # relay.models.Source: primary | fallback | cache | human
    trust: str = "full"  # relay.models.Trust: full | degraded | untrusted
    # ids of the upstream degraded steps this answer was computed from (assistant rows)
    tainted_by: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    prompt_version: str | None = None
    verified_by: str | None = None  # a degraded answer re-checked (e.g. "recheck on <model>")
    valid: bool | None = None  # assistant only: did its structured output validate?
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class PossiblyBilled(SQLModel, table=True):
    """A model call that may have been paid for but whose answer was never recorded: its
    attempt died holding the turn (sent, never recorded), or a concurrent attempt recorded the
    step first and this one's paid answer was discarded. Counted beside the recorded cost."""

    __tablename__ = "relay_possibly_billed"
    __table_args__ = (UniqueConstraint("session_id", "turn", "step", "owner",
                                       name="uq_possibly_billed_call"),)

    id: int | None = Field(default=None, primary_key=True)
    spec_id: str = Field(index=True)
    session_id: str = Field(foreign_key="relay_agent_session.id")
    turn: int
    step: int
    owner: str  # the activity attempt whose call it was
    reason: str  # attempt_lost | duplicate_discarded
    model: str | None = None
    tokens: int = 0  # the pre-call estimate (an upper bound), or the discarded answer's usage
    usd: float | None = None  # None: the model has no price
    created_at: datetime = Field(default_factory=utcnow)


class GateRecord(SQLModel, table=True):
    """Gate 2's record: each re-check of a degraded step (its primary answer and the verdict of
    the comparison) and each decision at the gate (who or what cleared it, and when).
    Idempotent on (spec, key): a retried or re-run activity finds its row instead of paying."""

    __tablename__ = "relay_gate_record"
    __table_args__ = (UniqueConstraint("spec_id", "key", name="uq_gate_record_key"),)

    id: int | None = Field(default=None, primary_key=True)
    spec_id: str = Field(index=True)
    iteration: int = 1
    key: str  # e.g. i1/recheck/planner/t1/s0 or i1/gate/deliver
    kind: str  # recheck | decision
    step_id: str | None = None
    model: str | None = None
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    agree: bool | None = None
    diff: list[str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    decision: str | None = None  # proceed | verified | waiting | approved | rejected
    decided_by: str | None = None
    reason: str | None = None
    created_at: datetime = Field(default_factory=utcnow)


class SpecConflict(Exception):
    """A run that contradicts the recorded spec (new spec id reused, unknown spec iterated)."""


# Stable, human names: the same (spec, role) always gets the same one.
_NAMES = (
    "Kael", "Aitana", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hugo", "Ines",
    "Jonas", "Kiri", "Lior", "Mara", "Nilo", "Oona", "Pavel", "Quinn", "Rhea", "Soren",
    "Tala", "Umar", "Vera", "Wren", "Xenia", "Yusuf", "Zara",
)


def session_name(spec_id: str, role: Role | str) -> str:
    role_value = Role(role).value
    digest = hashlib.sha256(f"{spec_id}/{role_value}".encode()).digest()
    return f"{_NAMES[digest[0] % len(_NAMES)]}-{role_value}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # A server that stops answering (crashed host, dropped network) must fail a connection in
    # seconds, not hang a worker thread on TCP's own timeouts: outages are retried above.
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"connect_timeout": 10} if url.startswith("postgresql") else {})


class RegistryUnavailable(Exception):
    """The registry database cannot be reached or cannot write (server down, disk full, network).

    Transient by nature: what failed should be retried once the database is back, and never
    counted as the failure of the work (a model call, an effect) that was being recorded."""


def registry_outage(exc: BaseException) -> RegistryUnavailable | None:
    """The one place that decides whether a database error is an outage (retry later) rather
    than a bug or a conflict (constraint violations and bad SQL are not outages)."""
    if isinstance(exc, RegistryUnavailable):
        return exc
    outage = (
        isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                         sa_exc.DisconnectionError))
        or type(exc) is sa_exc.DBAPIError  # a driver error SQLAlchemy could not classify
        or bool(getattr(exc, "connection_invalidated", False))
    )
    if not outage:
        return None
    unavailable = RegistryUnavailable(f"registry unavailable: {describe_db_error(exc)}")
    unavailable.__cause__ = exc
    return unavailable


# Retrying an outage: exponential backoff from a quarter second, capped, within a budget.
FIRST_DELAY_S, MAX_DELAY_S = 0.25, 10.0


class OutageBackoff:
    """The one retry schedule for registry outages, shared by the blocking loop below and the
    activities' async one (activities/heartbeat.py): call `delay_after()` in an `except`
    block; it gives how long to wait, or raises — the error itself when it is no outage, the
    outage once the budget is spent."""

    def __init__(self, what: str, budget_s: float, clock: Callable[[], float]) -> None:
        self.what, self.clock = what, clock
        self.deadline = clock() + budget_s
        self.delay, self.failures = FIRST_DELAY_S, 0

    def delay_after(self, exc: Exception) -> float:
        outage = registry_outage(exc)
        if outage is None:
            raise exc
        self.failures += 1
        if self.clock() + self.delay > self.deadline:
            _log.error("registry.gave_up", what=self.what, error=str(outage),
                       failures=self.failures)
            raise outage from exc
        if self.failures == 1 or self.failures % 10 == 0:
            _log.warning("registry.retrying", what=self.what, error=str(outage),
                         failures=self.failures)
        delay, self.delay = self.delay, min(self.delay * 2, MAX_DELAY_S)
        return delay


def patiently(fn: Callable[..., T], *args: Any, what: str, budget_s: float,
              **kwargs: Any) -> T:
    """Call `fn`, retrying a registry outage with backoff for up to `budget_s` seconds, then
    raise RegistryUnavailable; any other error is raised at once. Blocking: for worker threads
    (the activity's own heartbeats go on meanwhile). Only for calls that are safe to repeat."""
    backoff = OutageBackoff(what, budget_s, time.monotonic)
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            time.sleep(backoff.delay_after(exc))


def describe_db_error(exc: BaseException) -> str:
    """A database error on one line: the driver's own message, without SQLAlchemy's statement
    dump, parameters and help link."""
    orig = getattr(exc, "orig", None)
    text = str(orig) if orig is not None and str(orig) else str(exc)
    text = re.sub(r"\(Background on this error at: [^)]*\)", "", text)
    text = text.split("[SQL:", 1)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _claim(session_id: str, owner: str, ttl_s: float, supersede: str | None = None) -> Update:
    now = utcnow()
    free = [AgentSession.lease_owner.is_(None),  # type: ignore[union-attr]
            AgentSession.lease_owner == owner,
            AgentSession.lease_until < now]  # type: ignore[operator]
    if supersede is not None:  # an attempt known to have given up: no need to wait for its lapse
        free.append(AgentSession.lease_owner == supersede)
    return (update(AgentSession)
            .where(AgentSession.id == session_id, or_(*free))  # type: ignore[arg-type]
            .values(lease_owner=owner, lease_until=now + timedelta(seconds=ttl_s)))


def _release(owner: str) -> Update:
    return (update(AgentSession)
            .where(AgentSession.lease_owner == owner)  # type: ignore[arg-type]
            .values(lease_owner=None, lease_until=None))


def _raised(budget: tuple[float | None, int | None],
            given: tuple[float | None, int | None]) -> tuple[float | None, int | None]:
    """Each part of the budget: the larger of the two; a given None leaves it as it is."""
    def up(old: Any, new: Any) -> Any:
        return old if new is None else (new if old is None else max(old, new))

    return up(budget[0], given[0]), up(budget[1], given[1])


class Registry:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> Registry:
        registry = cls(make_engine(url))
        registry.upgrade_schema()
        return registry

    def upgrade_schema(self) -> None:
        """Bring the schema to the newest migration (creating it in an empty database)."""
        from relay.schema import migrate

        migrate(self.engine)

    # --- specs ------------------------------------------------------------------

    def open_spec(self, spec_id: str, run_id: str, request: str, iterate: bool,
                  workspace: dict[str, Any] | None = None,
                  budget: tuple[float | None, int | None] | None = None) -> SpecRecord:
        """Record the start of a run; idempotent per run id. A run naming a workspace path
        makes it the spec's workspace; one that names none keeps the spec's. A run's budget
        (usd, tokens) can only raise the spec's: it is one budget over all iterations."""
        with Session(self.engine) as db:
            spec = db.get(SpecRecord, spec_id)
            if spec is not None and spec.last_run_id == run_id:
                return spec
            if spec is not None and budget is not None:
                spec.budget_usd, spec.budget_tokens = _raised(
                    (spec.budget_usd, spec.budget_tokens), budget)
            if spec is None:
                if iterate:
                    raise SpecConflict(f"unknown spec {spec_id!r}: nothing to iterate")
                spec = SpecRecord(spec_id=spec_id, request=request, last_run_id=run_id,
                                  workspace=workspace, budget_usd=(budget or (None, None))[0],
                                  budget_tokens=(budget or (None, None))[1])
            else:
                if not iterate:
                    raise SpecConflict(
                        f"spec {spec_id!r} already exists (iteration {spec.iteration}); "
                        "use 'relay iterate' to start its next iteration"
                    )
                spec.iteration += 1
                spec.last_run_id = run_id
                if workspace and (workspace.get("path") or not spec.workspace):
                    spec.workspace = workspace
                spec.status = "running"
                spec.outcome = None
                spec.updated_at = utcnow()
            db.add(spec)
            db.commit()
            db.refresh(spec)
            return spec

    def set_budget(self, spec_id: str, usd: float | None, tokens: int | None) -> None:
        """Record a raised budget for the spec's next iterations (never lowers it)."""
        with Session(self.engine) as db:
            spec = db.get(SpecRecord, spec_id)
            if spec is None:
                return
            raised = _raised((spec.budget_usd, spec.budget_tokens), (usd, tokens))
            if raised != (spec.budget_usd, spec.budget_tokens):
                spec.budget_usd, spec.budget_tokens = raised
                db.add(spec)
                db.commit()

    def spend(self, spec_id: str) -> tuple[list[tuple[str, str | None, int, int, int, int, int]],
                                           list[tuple[str, int, float | None]]]:
        """What the spec has used, from the recorded answers of all its sessions (all
        iterations): (role, model, answers, input, output, cache read, cache write) per session
        and model, and its possibly-billed calls (role, tokens, usd). One read transaction."""
        m, s = SessionMessage, AgentSession
        with Session(self.engine) as db:
            usage = db.exec(
                select(s.role, m.model, func.count(), func.sum(m.input_tokens),
                       func.sum(m.output_tokens), func.sum(m.cache_read_tokens),
                       func.sum(m.cache_write_tokens))
                .join(s, s.id == m.session_id)  # type: ignore[arg-type]
                .where(s.spec_id == spec_id, m.role == "assistant")
                .group_by(s.role, m.model)).all()
            billed = db.exec(
                select(s.role, PossiblyBilled.tokens, PossiblyBilled.usd)
                .join(s, s.id == PossiblyBilled.session_id)  # type: ignore[arg-type]
                .where(PossiblyBilled.spec_id == spec_id)).all()
        return ([(r, model, int(n), int(a or 0), int(b or 0), int(c or 0), int(d or 0))
                 for r, model, n, a, b, c, d in usage],
                [(r, int(t or 0), u) for r, t, u in billed])

    def record_possibly_billed(self, spec_id: str, session_id: str, *, turn: int, step: int,
                               owner: str, reason: str, model: str | None, tokens: int,
                               usd: float | None) -> bool:
        """Count one possibly-billed call; idempotent per (session, turn, step, owner)."""
        try:
            with Session(self.engine) as db:
                db.add(PossiblyBilled(spec_id=spec_id, session_id=session_id, turn=turn,
                                      step=step, owner=owner, reason=reason, model=model,
                                      tokens=tokens, usd=usd))
                db.commit()
                return True
        except IntegrityError:
            return False

    def possibly_billed(self, spec_id: str) -> list[PossiblyBilled]:
        with Session(self.engine) as db:
            return list(db.exec(select(PossiblyBilled).where(PossiblyBilled.spec_id == spec_id)
                                .order_by(PossiblyBilled.id)).all())  # type: ignore[arg-type]

    def spec(self, spec_id: str) -> SpecRecord | None:
        with Session(self.engine) as db:
            return db.get(SpecRecord, spec_id)

    def close_spec(self, spec_id: str, status: str, outcome: str | None) -> None:
        with Session(self.engine) as db:
            spec = db.get(SpecRecord, spec_id)
            if spec is None:
                return
            spec.status, spec.outcome, spec.updated_at = status, outcome, utcnow()
            db.add(spec)
            db.commit()

    # --- sessions: discovery and naming ------------------------------------------

    def find_session(self, spec_id: str, role: Role | str) -> AgentSession | None:
        """Discovery: the session of this spec's role, if it exists (scenario B)."""
        with Session(self.engine) as db:
            return db.exec(
                select(AgentSession).where(
                    AgentSession.spec_id == spec_id, AgentSession.role == Role(role).value
                )
            ).first()

    def session_by_name(self, spec_id: str, name: str) -> AgentSession | None:
        with Session(self.engine) as db:
            return db.exec(
                select(AgentSession).where(AgentSession.spec_id == spec_id, AgentSession.name == name)
            ).first()

    def resolve_session(self, spec_id: str, role: Role | str) -> tuple[AgentSession, bool]:
        """Find the role's session or create it (scenario A). Returns (session, created)."""
        found = self.find_session(spec_id, role)
        if found is not None:
            return found, False
        session = AgentSession(
            id=f"ses_{uuid.uuid4().hex[:20]}",
            spec_id=spec_id,
            role=Role(role).value,
            name=session_name(spec_id, role),
        )
        try:
            with Session(self.engine) as db:
                db.add(session)
                db.commit()
                db.refresh(session)
                return session, True
        except IntegrityError:
            # Another attempt created it first; theirs is the session.
            found = self.find_session(spec_id, role)
            assert found is not None
            return found, False

    def begin_turn(self, spec_id: str, role: Role | str, turn: int, lease_owner: str,
                   lease_ttl_s: float, supersede: str | None = None,
                   ) -> tuple[AgentSession, bool, list[SessionMessage], bool]:
        """Everything an agent turn needs, in one transaction: its session (found or created),
        the session's whole history, the session marked running unless the turn is recorded,
        and whether the turn's lease (see claim_turn) was taken for `lease_owner`."""
        created = False
        for _ in range(2):
            with Session(self.engine, expire_on_commit=False) as db:
                session = db.exec(select(AgentSession).where(
                    AgentSession.spec_id == spec_id, AgentSession.role == Role(role).value)
                    .with_for_update()).first()  # the holder read here is the one replaced
                if session is not None:
                    leased = db.connection().execute(
                        _claim(session.id, lease_owner, lease_ttl_s, supersede)).rowcount == 1
                    history = list(db.exec(
                        select(SessionMessage).where(SessionMessage.session_id == session.id)
                        .order_by(SessionMessage.seq)  # type: ignore[arg-type]
                    ).all())
                    if not any(m.turn == turn for m in history) and session.status != "running":
                        session.status, session.updated_at = "running", utcnow()
                        db.add(session)
                    db.commit()
                    return session, created, history, leased
            _, created = self.resolve_session(spec_id, role)  # scenario A: create, then read it
        raise RuntimeError(f"session of {spec_id}/{Role(role).value} vanished")

    def claim_turn(self, session_id: str, owner: str, ttl_s: float,
                   supersede: str | None = None) -> bool:
        """Lease the session to one activity attempt, so two live attempts of a turn never
        both pay for its model calls (claiming again renews it). Free, lapsed or already
        ours: taken; held by another live attempt: False."""
        with self.engine.begin() as conn:
            return conn.execute(_claim(session_id, owner, ttl_s, supersede)).rowcount == 1

    def take_turn(self, session_id: str, owner: str, ttl_s: float,
                  supersede: str | None = None) -> tuple[bool, str | None]:
        """claim_turn, and the other attempt whose lapsed lease it took over (None if the
        lease was free, ours or superseded): that attempt died holding the turn."""
        with Session(self.engine) as db:
            held = db.exec(select(AgentSession.lease_owner)
                           .where(AgentSession.id == session_id).with_for_update()).first()
            taken = db.connection().execute(
                _claim(session_id, owner, ttl_s, supersede)).rowcount == 1
            db.commit()
        return taken, (held if taken and held not in (None, owner, supersede) else None)

    def extend_turn(self, session_id: str, owner: str, ttl_s: float) -> bool:
        """Renew a lease this owner still holds; False if it ended or was taken over."""
        with self.engine.begin() as conn:
            return conn.execute(
                update(AgentSession)
                .where(AgentSession.id == session_id,  # type: ignore[arg-type]
                       AgentSession.lease_owner == owner)
                .values(lease_until=utcnow() + timedelta(seconds=ttl_s))).rowcount == 1

    def release_turn(self, owner: str) -> None:
        """End every lease this owner (one activity attempt) holds; a no-op if none."""
        with self.engine.begin() as conn:
            conn.execute(_release(owner))

    def sessions(self, spec_id: str) -> list[AgentSession]:
        order = {r.value: i for i, r in enumerate(ROLES)}
        with Session(self.engine) as db:
            rows = db.exec(select(AgentSession).where(AgentSession.spec_id == spec_id)).all()
        return sorted(rows, key=lambda s: order.get(s.role, 99))

    def set_status(self, spec_id: str, roles: list[Role], status: str) -> None:
        with Session(self.engine) as db:
            for row in db.exec(
                select(AgentSession).where(
                    AgentSession.spec_id == spec_id,
                    AgentSession.role.in_([Role(r).value for r in roles]),  # type: ignore[attr-defined]
                )
            ):
                row.status, row.updated_at = status, utcnow()
                db.add(row)
            db.commit()

    # --- messages -------------------------------------------------------------------

    def messages(self, session_id: str) -> list[SessionMessage]:
        with Session(self.engine) as db:
            return list(
                db.exec(
                    select(SessionMessage)
                    .where(SessionMessage.session_id == session_id)
                    .order_by(SessionMessage.seq)  # type: ignore[arg-type]
                ).all()
            )

    def append_exchange(
        self,
        session_id: str,
        *,
        turn: int,
        step: int,
        user_content: list[dict[str, Any]],
        assistant_content: list[dict[str, Any]],
        model: str,
        usage: TokenUsage,
        valid: bool,
        error: str | None,
        prompt_version: str,
        source: str = "primary",
        trust: str = "full",
        status: str | None = None,
        release_lease: str | None = None,
        tainted_by: list[str] | None = None,
    ) -> bool:
        """Append one model exchange (the user message and the answer) atomically; with
        `release_lease`, the turn's lease held by that owner ends in the same transaction.

        Returns False when this (turn, step) is already recorded — a duplicate
        attempt lost the race and must use the recorded exchange instead.
        """
        try:
            with Session(self.engine) as db:
                last = db.exec(
                    select(func.max(SessionMessage.seq)).where(SessionMessage.session_id == session_id)
                ).one()
                seq = (last or 0) + 1
                common = dict(session_id=session_id, turn=turn, step=step, model=model,
                              source=str(getattr(source, "value", source)),
                              trust=str(getattr(trust, "value", trust)),
                              prompt_version=prompt_version)
                db.add(SessionMessage(seq=seq, role="user", content=user_content, **common))
                db.add(
                    SessionMessage(
                        seq=seq + 1, role="assistant", content=assistant_content, valid=valid,
                        error=error, input_tokens=usage.input_tokens,
                        output_tokens=usage.output_tokens,
                        cache_read_tokens=usage.cache_read_input_tokens,
                        cache_write_tokens=usage.cache_creation_input_tokens,
                        tainted_by=list(tainted_by) if tainted_by else None, **common,
                    )
                )
                session = db.get(AgentSession, session_id)
                assert session is not None, session_id
                session.input_tokens += usage.input_tokens
                session.output_tokens += usage.output_tokens
                session.cache_read_tokens += usage.cache_read_input_tokens
                session.cache_write_tokens += usage.cache_creation_input_tokens
                session.model = model
                session.prompt_version = prompt_version
                session.turns = max(session.turns, turn)
                if status is not None:
                    session.status = status
                session.updated_at = utcnow()
                db.add(session)
                db.flush()
                if release_lease is not None:
                    db.connection().execute(_release(release_lease))
                db.commit()
                return True
        except IntegrityError:
            return False

    def exchange(self, session_id: str, turn: int, step: int) -> dict[str, SessionMessage]:
        """The recorded messages of one step, by role (user, assistant); empty if none."""
        with Session(self.engine) as db:
            rows = db.exec(select(SessionMessage).where(
                SessionMessage.session_id == session_id, SessionMessage.turn == turn,
                SessionMessage.step == step)).all()
        return {m.role: m for m in rows}

    # --- Gate 2 -------------------------------------------------------------------------

    def gate_record(self, spec_id: str, key: str) -> GateRecord | None:
        with Session(self.engine) as db:
            return db.exec(select(GateRecord).where(GateRecord.spec_id == spec_id,
                                                    GateRecord.key == key)).first()

    def add_gate_record(self, record: GateRecord) -> GateRecord:
        """Insert once; a second insert of the same key returns the first row."""
        try:
            with Session(self.engine, expire_on_commit=False) as db:
                db.add(record)
                db.commit()
                return record
        except IntegrityError:
            found = self.gate_record(record.spec_id, record.key)
            assert found is not None
            return found

    def gate_records(self, spec_id: str) -> list[GateRecord]:
        with Session(self.engine) as db:
            return list(db.exec(select(GateRecord).where(GateRecord.spec_id == spec_id)
                                .order_by(GateRecord.id)).all())  # type: ignore[arg-type]

    def verify(self, session_id: str, turn: int, step: int, by: str) -> None:
        """Mark a degraded answer verified: it taints nothing from now on."""
        with Session(self.engine) as db:
            for row in db.exec(select(SessionMessage).where(
                    SessionMessage.session_id == session_id, SessionMessage.turn == turn,
                    SessionMessage.step == step, SessionMessage.role == "assistant")):
                if not row.verified_by:
                    row.verified_by = by
                    db.add(row)
            db.commit()

    def verified_steps(self, spec_id: str) -> list[tuple[str, int, int]]:
        """(role, turn, step) of every verified answer of the spec."""
        with Session(self.engine) as db:
            rows = db.exec(select(AgentSession.role, SessionMessage.turn, SessionMessage.step)
                           .join(AgentSession, AgentSession.id == SessionMessage.session_id)
                           .where(AgentSession.spec_id == spec_id,
                                  SessionMessage.verified_by.is_not(None))).all()  # type: ignore[union-attr]
        return [(r[0], r[1], r[2]) for r in rows]

    # --- orchestration state -----------------------------------------------------------

    def last_output(self, session_id: str) -> dict[str, Any] | None:
        """The newest valid structured output of a session (its forced tool's input)."""
        with Session(self.engine) as db:
            row = db.exec(
                select(SessionMessage)
                .where(SessionMessage.session_id == session_id, SessionMessage.valid == True)  # noqa: E712
                .order_by(SessionMessage.seq.desc())  # type: ignore[attr-defined]
            ).first()
        if row is None:
            return None
        return next((b.get("input") for b in row.content if b.get("type") == "tool_use"), None)

    def orchestration_state(self, spec_id: str) -> dict[str, dict[str, Any]]:
        """Per role: its session's state, turns and newest output (e.g. has the validator approved?)."""
        state: dict[str, dict[str, Any]] = {}
        for s in self.sessions(spec_id):
            out = self.last_output(s.id)
            state[s.role] = {
                "session_id": s.id, "name": s.name, "status": s.status, "turns": s.turns,
                "running": s.status == "running",
                "approved": out.get("approved") if isinstance(out, dict) else None,
                "last_output": out,
            }
        return state
