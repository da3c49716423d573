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
write for it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from temporalio import activity

from relay.registry import Registry

log = structlog.get_logger("relay.agent_turn")

DEFAULT_TTL_S = 60.0


@dataclass
class TurnLease:
    registry: Registry
    owner: str
    ttl_s: float
    held: bool = False
    released: bool = False  # ended by the turn's final append_exchange

    @classmethod
    def for_this_attempt(cls, registry: Registry) -> TurnLease:
        info = activity.info()
        timeout = info.heartbeat_timeout
        return cls(registry, owner=f"{info.workflow_run_id}/{info.activity_id}/{info.attempt}",
                   ttl_s=timeout.total_seconds() if timeout else DEFAULT_TTL_S)

    @contextlib.asynccontextmanager
    async def hold(self, session_id: str) -> AsyncIterator[bool]:
        """Hold the lease while the turn works; yields whether another attempt was waited for."""
        waited = False
        while not self.held:
            self.held = await asyncio.to_thread(self.registry.claim_turn, session_id, self.owner,
                                                self.ttl_s)
            if not self.held:
                if not waited:
                    log.info("agent_turn.waiting_for_other_attempt")
                waited = True
                await asyncio.sleep(min(1.0, self.ttl_s / 4))
        renewing = asyncio.create_task(self._renew(session_id))
        try:
            yield waited
        finally:
            renewing.cancel()
            if not self.released:
                await asyncio.to_thread(self.registry.release_turn, session_id, self.owner)

    async def _renew(self, session_id: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            await asyncio.to_thread(self.registry.claim_turn, session_id, self.owner, self.ttl_s)
