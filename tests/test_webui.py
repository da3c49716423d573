"""The Temporal Web UI as a relay front end, driven in a real headless Chromium.

A person who knows only the Web UI starts a spec from the Start Workflow form, reads
what it waits for on the workflow's page (User Metadata → Current Details), answers
and approves it from the page's More Actions menu, and finds its outcome in the
workflow list. The dev server here is the one `relay dev` starts, with its UI on.

Chromium is Debian's `chromium` package, driven through Playwright with that
binary (no browser download). Without it these tests are skipped, except under CI,
where `.ci/run` installs it and its absence is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client, WorkflowFailureError

from relay.client import RelayClient
from relay.models import OUTCOME_SEARCH_ATTRIBUTE, WORKFLOW_TYPE, Phase
from relay.registry import Registry
from relay.scripted_model import ScriptedModel
from relay.settings import RelaySettings
from tests.conftest import (
    ANSWERS,
    model_endpoint_for,
    spec_id,
    wait_for,
    wait_for_questions,
)
from worker.devserver import DevServer
from worker.main import SCRIPTED_MODEL, build_worker, connect, ensure_search_attributes
from workflows import render

CHROMIUM = "/usr/bin/chromium"
# As root Chromium needs --no-sandbox; the rest keep it from reaching out (no network here)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
NAMESPACE = "default"
STEP_TIMEOUT_MS = 20_000  # one UI step; the whole flow stays well under a minute


def _missing(reason: str) -> None:
    message = f"{reason} (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest_asyncio.fixture(scope="session")
async def ui_server(data_dir: Path) -> AsyncIterator[DevServer]:
    """The dev server with its Web UI, as `relay dev` runs it (conftest's has no UI)."""
    server = await DevServer(data_dir / "temporal-ui", ui=True, persist=False).start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def ui_client(ui_server: DevServer) -> Client:
    temporal_client = await connect(ui_server.address)
    await ensure_search_attributes(temporal_client)
    return temporal_client


@pytest_asyncio.fixture
async def ui_relay(ui_client: Client, ui_server: DevServer, data_dir: Path, registry: Registry,
                   registry_url: str, model_server: ScriptedModel) -> AsyncIterator[RelayClient]:
    """A RelayClient and an in-process worker on the UI server, on the test's own queue."""
    settings = RelaySettings(
        data_dir=data_dir, database_url=registry_url, temporal_address=ui_server.address,
        task_queue=f"webui-{uuid.uuid4().hex[:8]}", anthropic_api_key=None,
        anthropic_base_url=model_server.url, model=SCRIPTED_MODEL, heartbeat_timeout_s=5,
        model_max_attempts=4)
    endpoint = model_endpoint_for(model_server)
    worker = build_worker(ui_client, task_queue=settings.task_queue, registry=registry,
                          endpoint=endpoint, settings=settings)
    async with worker:
        yield RelayClient(ui_client, settings, registry)
    await endpoint.client.close()


@pytest_asyncio.fixture
async def page(tmp_path: Path):
    """A fresh Chromium profile and one page (playwright's own browsers are never fetched)."""
    if not Path(CHROMIUM).exists():
        _missing(f"no Chromium at {CHROMIUM} (Debian package chromium)")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _missing("the playwright package is not installed (pip install -e '.[dev]')")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(STEP_TIMEOUT_MS)
        browser_page = context.pages[0] if context.pages else await context.new_page()
        try:
            yield browser_page
        finally:
            # what the page showed last: the first thing to look at when a step timed out
            await browser_page.screenshot(path=tmp_path / "last.png", full_page=True)
            await context.close()


async def _until_listed(client: Client, query: str, timeout: float = 15.0) -> list[str]:
    """Visibility is eventually consistent: poll the list query until it shows something."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [w.id async for w in client.list_workflows(query)]
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, f"nothing listed for {query!r}"
        await asyncio.sleep(0.1)


async def _send(page, kind: str, name: str, payload: str, done_text: str) -> None:
    """More Actions → "Send an Update" / "Send a Signal": pick the name, paste the JSON."""
    await page.get_by_role("button", name="More Actions").click()
    await page.get_by_role("menuitem", name=kind).click()
    dialog = page.get_by_role("dialog").filter(has_text=kind)
    await dialog.locator('[data-testid$="-select-button"]').click()
    await dialog.get_by_role("option", name=name, exact=True).click()
    data = dialog.locator('[aria-label="Data"]')
    await data.fill(payload)
    await data.blur()  # the editor reformats on blur; click only after the layout settles
    await dialog.get_by_role("button", name="Submit").click()
    await page.get_by_text(done_text).first.wait_for()


async def _current_details(page, base: str, sid: str, expect: str):
    """Open the spec's page, then its User Metadata tab; the current details' frame.

    The UI renders the markdown in a sandboxed iframe titled "output".
    """
    await page.goto(f"{base}/namespaces/{NAMESPACE}/workflows/{sid}")
    await page.get_by_role("tab", name="User Metadata").click()
    details = page.frame_locator('iframe[title="output"]').last
    await details.get_by_text(expect).first.wait_for()
    return details


async def test_a_spec_runs_start_to_delivery_from_the_web_ui(
        page, ui_relay: RelayClient, ui_client: Client, ui_server: DevServer, tmp_path: Path):
    base = ui_server.ui_url
    sid = spec_id("webui")
    queue = ui_relay.settings.task_queue

    # Start Workflow form: id, task queue, type and the documented one-line JSON input
    await page.goto(f"{base}/namespaces/{NAMESPACE}/workflows/start-workflow")
    await page.locator("#workflowId").fill(sid)
    await page.locator("#taskQueue").fill(queue)
    await page.locator("#workflowType").fill(WORKFLOW_TYPE)
    await page.locator("#workflowType").blur()
    await page.get_by_text("Task Queue is Active").wait_for()  # the worker is seen; layout done
    data = page.locator('[aria-label="Data"]')
    await data.fill(json.dumps({"request": "Write a greeting module"}))
    await data.blur()
    await page.screenshot(path=tmp_path / "1-start-form.png", full_page=True)
    await page.get_by_test_id("start-workflow-button").click()
    await page.get_by_text("Workflow started successfully").first.wait_for()

    # The page alone says what the spec waits for and the exact JSON to send: the timeline
    # (the default tab) names the questions, User Metadata has them with the JSON
    await wait_for_questions(ui_relay, sid)
    await page.goto(f"{base}/namespaces/{NAMESPACE}/workflows/{sid}")
    await page.get_by_text("clarifier waits for answers: q1, q2").first.wait_for()
    await page.screenshot(path=tmp_path / "2-timeline.png", full_page=True)
    details = await _current_details(page, base, sid, "waiting for answers")
    await page.screenshot(path=tmp_path / "3-waiting-for-answers.png", full_page=True)
    shown = await details.locator("body").inner_text()
    template = await details.locator("code").filter(has_text='{"answers"').first.inner_text()
    ids = list(json.loads(template)["answers"])
    assert ids == list(ANSWERS), template
    assert "Send an Update" in shown and "answer_signal" in shown
    for question in (await ui_relay.status(sid)).pending.questions:
        assert question.text in shown
    await _send(page, "Send an Update", "answer",
                json.dumps({"answers": {i: ANSWERS[i] for i in ids}}), "Update successful")

    await wait_for(ui_relay, sid, lambda s: s.phase == Phase.waiting_for_approval, timeout=60)
    details = await _current_details(page, base, sid, "waiting for approval")
    await page.screenshot(path=tmp_path / "4-waiting-for-approval.png", full_page=True)
    shown = await details.locator("body").inner_text()
    assert render.APPROVE_PAYLOAD in shown and render.REJECT_PAYLOAD in shown
    assert "approve_signal" in shown and "relay approve" not in shown
    await _send(page, "Send a Signal", "approve_signal", '{"reviewer": "web-ui"}',
                "Workflow signaled")

    result = await ui_relay.result(sid)
    assert result.outcome == "delivered"
    assert result.decision is not None and result.decision.reviewer == "web-ui"
    query = f'{OUTCOME_SEARCH_ATTRIBUTE} = "delivered" AND WorkflowId = "{sid}"'
    assert await _until_listed(ui_client, query) == [sid]

    # The workflow list tells a delivered spec from a rejected one (both are COMPLETED)
    await page.goto(f"{base}/namespaces/{NAMESPACE}/workflows?query=WorkflowId%3D%22{sid}%22")
    await page.get_by_role("link", name=sid).first.wait_for()
    await page.get_by_role("button", name="Configure Columns").click()
    await page.get_by_role("button", name=f"Add {OUTCOME_SEARCH_ATTRIBUTE} column").click()
    # next to Status, where a person looks first (the UI keeps this choice in the browser)
    await page.get_by_role("button", name="Remove Run ID column").click()
    for _ in range(4):
        await page.get_by_role("button", name=f"Move {OUTCOME_SEARCH_ATTRIBUTE} column up").click()
    close = page.get_by_role("button", name="Close Workflows Table configuration")
    await close.click()
    await close.wait_for(state="hidden")
    row = page.locator("tr").filter(has_text=sid)
    await row.filter(has_text="delivered").first.wait_for()
    await page.screenshot(path=tmp_path / "5-list-with-outcome.png", full_page=True)


@pytest.mark.parametrize("ending", ["rejected", "failed"])
async def test_the_outcome_is_a_search_attribute(ending: str, ui_relay: RelayClient,
                                                 ui_client: Client):
    """A rejected and a failed run are listed by RelayOutcome, as a delivered one is."""
    sid = spec_id(ending)
    request = "Write a greeting module" if ending == "rejected" else "   "
    handle = await ui_client.start_workflow(WORKFLOW_TYPE, {"request": request}, id=sid,
                                            task_queue=ui_relay.settings.task_queue)
    if ending == "rejected":
        await wait_for_questions(ui_relay, sid)
        await ui_relay.answer(sid, ANSWERS)
        st = await wait_for(ui_relay, sid, lambda s: s.phase == Phase.waiting_for_approval,
                            timeout=60)
        shown = render.details(st)
        assert "relay approve" not in shown and render.APPROVE_PAYLOAD in shown
        await ui_relay.reject(sid, "not this way")
        assert (await ui_relay.result(sid)).outcome == "rejected"
    else:
        with pytest.raises(WorkflowFailureError):
            await handle.result()
    query = f'{OUTCOME_SEARCH_ATTRIBUTE} = "{ending}" AND WorkflowId = "{sid}"'
    assert await _until_listed(ui_client, query) == [sid]
    st = await ui_relay.status(sid)
    assert f"outcome: {ending}" in render.details(st)
