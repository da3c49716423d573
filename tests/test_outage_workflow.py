"""A registry outage that outlasts an activity's attempts is waited out, not a failure.

The workflow helper `through_outages` is exercised in a small workflow with stub
activities registered under their own names (the pipeline's own steps use it the
same way): an activity failing with RegistryUnavailable is run again after a durable
pause; any other failure, or an outage past the limit, is raised at once.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from workflows.outage import OUTAGE_TYPE, through_outages

calls: dict[str, int] = {}


@activity.defn(name="flaky_registry")
async def flaky_registry(key: str) -> str:
    """Unavailable for the first two calls of `key`, then fine; 'broken' keys fail otherwise."""
    calls[key] = calls.get(key, 0) + 1
    if key.startswith("broken"):
        raise ApplicationError("constraint violated", type="IntegrityError", non_retryable=True)
    if calls[key] <= 2:
        raise ApplicationError("registry unreachable: connection refused", type=OUTAGE_TYPE)
    return f"done after {calls[key]} calls"


@workflow.defn(name="OutageProbe")
class OutageProbe:
    @workflow.run
    async def run(self, key: str, limit_s: float) -> str:
        return await through_outages(lambda: workflow.execute_activity(
            "flaky_registry", key, result_type=str, start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=1)), "probe",
            pause=timedelta(milliseconds=100), limit=timedelta(seconds=limit_s))


async def probe(client: Client, key: str, limit_s: float = 60) -> str:
    queue = f"outage-{uuid.uuid4().hex[:8]}"
    async with Worker(client, task_queue=queue, workflows=[OutageProbe],
                      activities=[flaky_registry]):
        return await client.execute_workflow(OutageProbe.run, args=[key, limit_s],
                                             id=f"outage-{key}", task_queue=queue)


async def test_an_outage_longer_than_the_attempts_is_waited_out(client: Client) -> None:
    key = f"outage-{uuid.uuid4().hex[:6]}"
    assert await probe(client, key) == "done after 3 calls"


async def test_another_failure_is_not_retried(client: Client) -> None:
    key = f"broken-{uuid.uuid4().hex[:6]}"
    with pytest.raises(WorkflowFailureError):
        await probe(client, key)
    assert calls[key] == 1


async def test_an_outage_past_the_limit_fails_the_step(client: Client) -> None:
    key = f"outage-{uuid.uuid4().hex[:6]}"
    with pytest.raises(WorkflowFailureError) as failure:
        await probe(client, key, limit_s=0)
    assert calls[key] == 1
    assert "registry unreachable" in str(failure.value.cause.cause)
