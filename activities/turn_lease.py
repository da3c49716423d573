"""One attempt at a time per agent session: a lease in the registry.

Temporal can run a retry while an earlier attempt is still alive (its heartbeat
was lost, or it outlived its timeout). Both would call the model for the same
exchange and pay twice, though only one exchange is recorded. The attempt that
holds the lease works; another waits, heartbeating, until the lease is released
(then it finds the exchanges recorded and reuses them) or lapses because its
holder died. The lease lasts as long as the activity's heartbeat timeout and is
renewed at a third of it, so a dead worker's lease lapses about when Temporal
notices the death. Taking and ending it ride on the turn's own registry
transactions (begin_turn, the final append_exchange), so a turn pays no extra
write for it. Lease times come from the workers' clocks, which must agree to
within a fraction of the heartbeat timeout.

An attempt that gave up on a registry outage could not end its lease; the next
attempt knows it from the answer it carried over (see heartbeat.carry) and
supersedes that lease instead of waiting for it to lapse. Ending a lease is
bookkeeping: its failure is logged, never raised over the turn's own outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import patiently
from relay.registry import Registry

log = structlog.get_logger("relay.agent_turn")

DEFAULT_TTL_S = 60.0
RELEASE_PATIENCE_S = 3.0  # short: the turn's own outcome is waiting to be reported


@dataclass
class TurnLease:
    registry: Registry
    owner: str  # one activity attempt
    ttl_s: float
    held: bool = False
    released: bool = False  # ended by the turn's final append_exchange
    lost: bool = False  # it lapsed and another attempt took it over
    supersede: str | None = None  # a previous attempt known to have given up: its lease is ours
    took_over: str | None = None  # an attempt that died holding the turn: its lapsed lease is ours

    @classmethod
    def for_this_attempt(cls, registry: Registry) -> TurnLease:
        info = activity.info()
        timeout = info.heartbeat_timeout
        return cls(registry, owner=f"{info.workflow_run_id}/{info.activity_id}/{info.attempt}",
                   ttl_s=timeout.total_seconds() if timeout else DEFAULT_TTL_S)

    async def wait_for(self, session_id: str) -> bool:
        """Take the lease, waiting while another live attempt holds it; True if it waited."""
        waited = False
        while not self.held:
            self.held, lapsed = await patiently(self.registry.take_turn, session_id, self.owner,
                                                self.ttl_s, supersede=self.supersede,
                                                what="claim_turn")
            self.took_over = lapsed or self.took_over
            if not self.held:
                if not waited:
                    log.info("agent_turn.waiting_for_other_attempt")
                waited = True
                await asyncio.sleep(min(1.0, self.ttl_s / 4))
        return waited

    @contextlib.asynccontextmanager
    async def renewed(self, session_id: str) -> AsyncIterator[None]:
        renewing = asyncio.create_task(self._renew(session_id))
        try:
            yield
        finally:
            renewing.cancel()

    def check(self) -> None:
        """Before paying for a model call: stop if another attempt has taken the turn over."""
        if self.lost:
            raise ApplicationError("another attempt took this turn over after its lease lapsed",
                                   type="TurnLeaseLost")

    async def end(self) -> None:
        """Whatever happened (even a cancellation mid-claim), this attempt holds nothing after.
        Never raises: a failure here must not hide why the turn ended. A lease left behind by
        a registry outage lapses after its TTL, or the next attempt supersedes it."""
        if self.released:
            return
        try:
            await patiently(self.registry.release_turn, self.owner, what="release_turn",
                            budget_s=RELEASE_PATIENCE_S)
        except BaseException as exc:  # noqa: BLE001  (cancellation included: we are in a finally)
            log.warning("agent_turn.lease_release_failed", error=str(exc) or type(exc).__name__)

    async def _renew(self, session_id: str) -> None:
        while not self.released:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if not await asyncio.to_thread(self.registry.extend_turn, session_id, self.owner,
                                               self.ttl_s) and not self.released:
                    self.lost = True
                    log.warning("agent_turn.lease_lost")
                    return
            except Exception as exc:  # noqa: BLE001  (the registry may be back at the next tick)
                log.warning("agent_turn.lease_renewal_failed", error=str(exc))
