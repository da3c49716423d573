"""The relay worker: builds the activities with their dependencies and runs them.

Dependencies (registry engine, model client, settings) are made here and
passed in; nothing is created at import time. Without an API key the worker
uses the scripted model — started in-process unless ANTHROPIC_BASE_URL points
at a running one — and says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import anthropic
import httpx2
import structlog
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities import AgentTurnActivities, RegistryActivities
from activities.effects import EffectActivities, EffectExecutor
from activities.change_report import ChangeActivities
from activities.git_effects import git_effects
from activities.review import ReviewActivities
from activities.model_step import ModelStepActivities
from activities.workspace import WorkspaceActivities
from relay.client import connect_settings
from relay.client import connect_temporal as connect
from relay.client import open_registry
from relay.effects import EffectRegistry, load_registry
from relay.failpoints import Failpoints
from relay.ledger import Ledger
from relay.models import OUTCOME_SEARCH_ATTRIBUTE, PHASE_SEARCH_ATTRIBUTE, is_scripted
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from workflows.compensation import SpecCompensation
from workflows.pipeline import SpecPipeline

log = structlog.get_logger("relay.worker")

SCRIPTED_MODEL = "relay-scripted-1"
SEARCH_ATTRIBUTES = (PHASE_SEARCH_ATTRIBUTE, OUTCOME_SEARCH_ATTRIBUTE)  # both Keyword


async def ensure_search_attributes(client: Client) -> None:
    """The workflow upserts RelayPhase and RelayOutcome; register those the server lacks."""
    ops = client.operator_service
    known = await ops.list_search_attributes(ListSearchAttributesRequest(namespace=client.namespace))
    missing = {name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
               for name in SEARCH_ATTRIBUTES if name not in known.custom_attributes}
    if missing:
        await ops.add_search_attributes(AddSearchAttributesRequest(
            namespace=client.namespace, search_attributes=missing))


@dataclasses.dataclass
class ModelEndpoint:
    client: anthropic.AsyncAnthropic
    model: str
    scripted: ScriptedModel | None = None

    @property
    def label(self) -> str:
        if is_scripted(self.model):
            return f"{self.model} (scripted model, not a real LLM) at {self.client.base_url}"
        return f"{self.model} at {self.client.base_url}"

    async def aclose(self) -> None:
        await self.client.close()
        if self.scripted is not None:
            self.scripted.stop()


def model_endpoint(settings: RelaySettings) -> ModelEndpoint:
    """Anthropic with a key; a configured endpoint without one; else the scripted model."""
    scripted = None
    base_url = settings.anthropic_base_url
    model = settings.model
    if settings.anthropic_api_key is not None:
        api_key = settings.anthropic_api_key.get_secret_value()
    else:
        api_key = "no-key"
        if base_url is None:
            scripted = ScriptedModel(model_name=SCRIPTED_MODEL).start()
            base_url, model = scripted.url, SCRIPTED_MODEL
    client = anthropic.AsyncAnthropic(
        api_key=api_key, base_url=base_url, max_retries=0,  # Temporal owns retries
        timeout=httpx2.Timeout(settings.turn_timeout_s, connect=10.0))
    return ModelEndpoint(client=client, model=model, scripted=scripted)


def effect_registry(settings: RelaySettings, extra: EffectRegistry | None = None) -> EffectRegistry:
    """The bundled git effects plus the adopter's (RELAY_EFFECTS=module:attribute)."""
    effects = git_effects
    if settings.effects:
        effects = effects.merge(load_registry(settings.effects))
    return effects.merge(extra) if extra is not None else effects


def build_worker(client: Client, *, task_queue: str, registry: Registry,
                 endpoint: ModelEndpoint, settings: RelaySettings,
                 effects: EffectRegistry | None = None, **options: object) -> Worker:
    executor = EffectExecutor(Ledger(registry), effect_registry(settings, effects),
                              settings.data_dir.resolve(), Failpoints(settings.failpoints))
    prices = settings.price_table()  # RELAY_PRICES over the built-in table
    turns = AgentTurnActivities(registry, endpoint.client, endpoint.model, settings.max_tokens,
                                executor=executor, prices=prices)
    steps = ModelStepActivities(registry, endpoint.client, endpoint.model, settings.max_tokens,
                                executor=executor, prices=prices)
    bookkeeping = RegistryActivities(registry, prices)
    side_effects = EffectActivities(executor)
    workspace = WorkspaceActivities(executor, settings.data_dir)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[SpecPipeline, SpecCompensation],
        # agent_turn: the whole turn in one activity, kept for runs recorded before the loop
        # moved into the workflow (workflows/pipeline.LOOP_PATCH)
        activities=[steps.model_step, steps.agent_tool, steps.recheck_step, bookkeeping.record_gate,
                    ChangeActivities(executor.effects).inspect_change,
                    turns.agent_turn, bookkeeping.open_spec, bookkeeping.set_session_states,
                    side_effects.run_effect, side_effects.pending_compensations,
                    side_effects.compensate_effect, side_effects.mark_needs_human,
                    workspace.prepare_workspace, ReviewActivities().describe_change],
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(
                "structlog", "relay.models", "workflows.render")),
        graceful_shutdown_timeout=timedelta(seconds=5),
        max_cached_workflows=settings.max_cached_workflows,
        max_concurrent_activities=settings.max_concurrent_activities,
        **options,  # type: ignore[arg-type]
    )


async def run_worker(settings: RelaySettings, stop: asyncio.Event, *,
                     ready: asyncio.Event | None = None, client: Client | None = None) -> None:
    # relay's order of precedence (explicit > RELAY_* > TEMPORAL_*/temporal.toml > relay dev),
    # unless the caller (the embedded dev stack) already connected to its own server
    client = client or await connect_settings(settings)
    await ensure_search_attributes(client)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = open_registry(settings.registry_url())
    endpoint = model_endpoint(settings)
    worker = build_worker(client, task_queue=settings.task_queue, registry=registry,
                          endpoint=endpoint, settings=settings)
    log.info("worker.started", address=client.service_client.config.target_host,
             namespace=client.namespace, task_queue=settings.task_queue,
             model=endpoint.label, registry=_safe_url(settings.registry_url()))
    try:
        async with worker:
            if ready is not None:
                ready.set()
            await stop.wait()
    finally:
        await endpoint.aclose()
        registry.engine.dispose()


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
