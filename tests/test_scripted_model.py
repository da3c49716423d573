"""Tests of relay.scripted_model, driven through the real anthropic SDK.

The SDK's own request building and response parsing run against the server, so
these tests also pin down that the scripted model speaks the Messages API wire format.
"""

from __future__ import annotations

import ast
import http.client
import json
import time
import urllib.error
import urllib.request

import anthropic
import pytest
import pytest_asyncio
from pydantic import ValidationError

from relay import prompts
from relay.models import (
    OUTPUT_MODELS,
    OUTPUT_TOOLS,
    ROLES,
    Audit,
    Clarification,
    Plan,
    Role,
)
from relay.scripted_model import Fault, RecordedRequest, ScriptedModel

REQUEST = "Add a CSV export to the reports page!"
MODEL = "relay-scripted-1"


@pytest.fixture(scope="module")
def server():
    with ScriptedModel() as s:
        yield s


@pytest.fixture(autouse=True)
def _reset(server):
    server.reset()
    yield
    server.reset()


@pytest_asyncio.fixture
async def client(server):
    c = anthropic.AsyncAnthropic(api_key="test-key", base_url=server.url, max_retries=0)
    yield c
    await c.close()


def tool_for(role: Role) -> dict:
    return {"name": OUTPUT_TOOLS[role], "description": f"Submit the {role.value} output",
            "input_schema": OUTPUT_MODELS[role].model_json_schema()}


async def ask(client, role: Role, messages: list | None = None):
    return await client.messages.create(
        model=MODEL, max_tokens=1024, system=f"You are the {role.value}.",
        messages=messages or [{"role": "user", "content": REQUEST}],
        tools=[tool_for(role)], tool_choice={"type": "tool", "name": OUTPUT_TOOLS[role]},
    )


def output_of(message) -> dict:
    block = message.content[0]
    assert block.type == "tool_use"
    return block.input


def second_turn(role: Role, first_output: dict, newest: str) -> list:
    """History with one assistant tool_use turn, then a user turn opening with its tool_result."""
    return [
        {"role": "user", "content": [{"type": "text", "text": REQUEST}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": OUTPUT_TOOLS[role], "input": first_output}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "Recorded."}]},
            {"type": "text", "text": newest},
        ]},
    ]


def http_json(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + path, data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class TestRoleAnswers:
    """Each role's normal answer is a well-formed Message whose tool input validates."""

    @pytest.mark.asyncio
    @pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
    async def test_output_validates_against_role_model(self, client, role):
        msg = await ask(client, role)
        assert msg.stop_reason == "tool_use"
        assert msg.model == MODEL
        assert msg.content[0].name == OUTPUT_TOOLS[role]
        assert msg.usage.input_tokens >= 1 and msg.usage.output_tokens >= 1
        OUTPUT_MODELS[role].model_validate(output_of(msg))

    @pytest.mark.asyncio
    async def test_same_request_same_answer(self, client):
        first, second = await ask(client, Role.planner), await ask(client, Role.planner)
        assert output_of(first) == output_of(second)
        assert first.usage == second.usage
        assert first.id != second.id

    @pytest.mark.asyncio
    async def test_constructor_writes_valid_python(self, client):
        change = OUTPUT_MODELS[Role.constructor].model_validate(
            output_of(await ask(client, Role.constructor)))
        (file,) = change.files
        assert file.path == "relay_output/add_a_csv_export_to_the_report.py"
        tree = ast.parse(file.content)
        assert ast.get_docstring(tree)
        assert any(isinstance(n, ast.FunctionDef) and ast.get_docstring(n) for n in tree.body)

    @pytest.mark.asyncio
    async def test_planner_revision_is_numbered(self, client):
        plan = Plan.model_validate(output_of(await ask(client, Role.planner)))
        assert "revision" not in plan.summary and 3 <= len(plan.steps) <= 4
        revised = Plan.model_validate(output_of(
            await ask(client, Role.planner, second_turn(Role.planner, plan.model_dump(), "Fix it"))))
        assert "revision number 1" in revised.summary
        assert "fix_it" not in revised.summary  # the summary names the work, not the last message
        assert revised.steps[:3] == plan.steps and "Verify the result" in revised.steps[3]


class TestConversation:
    """Answers depend on the history: first turn versus later turns."""

    @pytest.mark.asyncio
    async def test_clarifier_asks_then_specifies(self, client):
        first = Clarification.model_validate(output_of(await ask(client, Role.clarifier)))
        assert [q.id for q in first.questions] == ["q1", "q2"]
        assert first.clarified_spec is None
        history = second_turn(Role.clarifier, first.model_dump(), "q1: analysts. q2: CSV downloads.")
        final = Clarification.model_validate(output_of(await ask(client, Role.clarifier, history)))
        assert not final.questions
        assert "Clarified spec (scripted model)" in final.clarified_spec
        assert REQUEST in final.clarified_spec
        assert "q1: analysts. q2: CSV downloads." in final.clarified_spec

    @pytest.mark.asyncio
    async def test_auditor_rejects_then_approves(self, client):
        first = Audit.model_validate(output_of(await ask(client, Role.auditor)))
        assert first.approved is False and first.findings
        history = second_turn(Role.auditor, first.model_dump(), "Revised plan with a test step.")
        second = Audit.model_validate(output_of(await ask(client, Role.auditor, history)))
        assert second.approved is True and second.findings == []


GREETING = "Write a small Python module that greets a person by name, with tests."
WORKSPACE_TOOLS = [{"name": "list_files", "description": "List files",
                    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}]


def rendered(role: Role, kind: str, **variables: str) -> str:
    """A user turn exactly as relay renders it from its prompt files."""
    return prompts.load(role).render(kind, variables)


async def converse(client, role: Role, kinds: list[tuple[str, dict]], tools: list | None = None):
    """Drive one role through several turns of relay's prompts; the last answer's output."""
    messages: list = []
    for kind, variables in kinds:
        user = [{"type": "text", "text": rendered(role, kind, **variables)}]
        if messages:
            user.insert(0, {"type": "tool_result", "tool_use_id": messages[-1]["content"][0]["id"],
                            "content": "Accepted."})
        messages.append({"role": "user", "content": user})
        msg = await client.messages.create(
            model=MODEL, max_tokens=1024, system="s", messages=messages,
            tools=[tool_for(role), *(tools or [])],
            tool_choice={"type": "tool", "name": OUTPUT_TOOLS[role]})
        messages.append({"role": "assistant",
                         "content": [b.model_dump(exclude_none=True) for b in msg.content]})
    return output_of(msg)


class TestTextsMatchTheRun:
    """The scripted texts restate the conversation, name the files, and say their limits."""

    ANSWERS = "q1. Who will use the result, and how?\n   -> Support staff.\nq2. Done?\n   -> Tests pass."

    async def clarified(self, client, request: str, tools=None) -> str:
        out = await converse(client, Role.clarifier, [("clarify", {"request": request}),
                                                      ("answers", {"answers": self.ANSWERS})], tools)
        return Clarification.model_validate(out).clarified_spec

    @pytest.mark.asyncio
    async def test_clarified_spec_restates_request_and_answers(self, client):
        spec = await self.clarified(client, GREETING, WORKSPACE_TOOLS)
        assert f"Request: {GREETING}" in spec
        assert "-> Support staff." in spec and "-> Tests pass." in spec
        assert "The person answered" not in spec and "A new request" not in spec  # no echo
        assert "greeting.py" in spec and "ANTHROPIC_API_KEY" not in spec

    @pytest.mark.asyncio
    async def test_other_requests_are_told_plainly(self, client):
        spec = await self.clarified(client, REQUEST, WORKSPACE_TOOLS)
        plan = Plan.model_validate(await converse(
            client, Role.planner, [("plan", {"spec": spec, "iteration": "1"})], WORKSPACE_TOOLS))
        for text in (spec, plan.summary):
            assert "can only build its example module" in text
            assert "ANTHROPIC_API_KEY" in text

    @pytest.mark.asyncio
    async def test_revised_plan_names_the_files_not_the_findings(self, client):
        spec = await self.clarified(client, GREETING, WORKSPACE_TOOLS)
        plan = Plan.model_validate(await converse(client, Role.planner, [
            ("plan", {"spec": spec, "iteration": "1"}),
            ("revise", {"findings": "- The plan has no step that verifies the result."})],
            WORKSPACE_TOOLS))
        assert "the_auditor_rejected" not in plan.summary.lower()
        assert "greeting.py" in plan.summary and "test_greeting.py" in plan.summary
        assert "revision number 1" in plan.summary
        assert any("python -m unittest" in step for step in plan.steps)

    @pytest.mark.asyncio
    async def test_first_plan_has_no_verification_the_auditor_asks_for_it(self, client):
        spec = await self.clarified(client, GREETING, WORKSPACE_TOOLS)
        plan = Plan.model_validate(await converse(
            client, Role.planner, [("plan", {"spec": spec, "iteration": "1"})], WORKSPACE_TOOLS))
        assert not any("Verify" in step for step in plan.steps)
        assert [s.split(":")[0] for s in plan.steps[1:]] == ["Write greeting.py",
                                                             "Write test_greeting.py"]

    @pytest.mark.asyncio
    async def test_without_a_workspace_the_plan_names_the_stub_it_writes(self, client):
        spec = await self.clarified(client, GREETING)
        plan = Plan.model_validate(await converse(
            client, Role.planner, [("plan", {"spec": spec, "iteration": "1"})]))
        change = await converse(client, Role.constructor, [("construct", {"spec": spec,
                                                                         "plan": plan.summary})])
        (written,) = [f["path"] for f in change["files"]]
        assert written in plan.summary and written in " ".join(plan.steps)

    @pytest.mark.asyncio
    async def test_a_later_iteration_lists_its_change(self, client):
        out = await converse(client, Role.clarifier, [
            ("clarify", {"request": GREETING}), ("answers", {"answers": self.ANSWERS}),
            ("iterate", {"iteration": "2", "request": "Add German"})], WORKSPACE_TOOLS)
        spec = Clarification.model_validate(out).clarified_spec
        assert f"Request: {GREETING}" in spec and "- iteration 2: Add German" in spec
        assert "cannot make the changes asked since" in spec and "ANTHROPIC_API_KEY" in spec

    @pytest.mark.asyncio
    async def test_same_conversation_same_bytes(self, client):
        first = await self.clarified(client, REQUEST, WORKSPACE_TOOLS)
        assert await self.clarified(client, REQUEST, WORKSPACE_TOOLS) == first


class TestFaults:
    """Injected faults map to the SDK's exceptions, apply `count` times and filter by role."""

    @pytest.mark.asyncio
    async def test_rate_limit_with_retry_after(self, client, server):
        server.add_fault(Fault(kind="rate_limit", retry_after=2))
        with pytest.raises(anthropic.RateLimitError) as exc:
            await ask(client, Role.planner)
        assert exc.value.response.headers["retry-after"] == "2"
        assert exc.value.body["error"]["type"] == "rate_limit_error"

    @pytest.mark.asyncio
    async def test_overloaded_is_529(self, client, server):
        server.add_fault(Fault(kind="overloaded", retry_after=0.5))
        with pytest.raises(anthropic.InternalServerError) as exc:
            await ask(client, Role.planner)
        assert exc.value.status_code == 529
        assert exc.value.response.headers["retry-after"] == "0.5"

    @pytest.mark.asyncio
    async def test_server_error_is_500_without_retry_after(self, client, server):
        server.add_fault(Fault(kind="server_error"))
        with pytest.raises(anthropic.InternalServerError) as exc:
            await ask(client, Role.planner)
        assert exc.value.status_code == 500
        assert "retry-after" not in exc.value.response.headers

    @pytest.mark.asyncio
    async def test_auth_error(self, client, server):
        server.add_fault(Fault(kind="auth_error"))
        with pytest.raises(anthropic.AuthenticationError):
            await ask(client, Role.planner)

    @pytest.mark.asyncio
    async def test_slow_delays_then_answers(self, client, server):
        server.add_fault(Fault(kind="slow", delay_s=0.3))
        start = time.monotonic()
        msg = await ask(client, Role.validator)
        assert time.monotonic() - start >= 0.3
        OUTPUT_MODELS[Role.validator].model_validate(output_of(msg))

    @pytest.mark.asyncio
    @pytest.mark.parametrize("role", ROLES, ids=[r.value for r in ROLES])
    async def test_invalid_output_fails_validation(self, client, server, role):
        server.add_fault(Fault(kind="invalid_output"))
        msg = await ask(client, role)
        assert output_of(msg) == {"unexpected": True}
        with pytest.raises(ValidationError):
            OUTPUT_MODELS[role].model_validate(output_of(msg))

    @pytest.mark.asyncio
    async def test_count_then_spent(self, client, server):
        server.add_fault(Fault(kind="server_error", count=2))
        for _ in range(2):
            with pytest.raises(anthropic.InternalServerError):
                await ask(client, Role.planner)
        await ask(client, Role.planner)
        assert [r.status for r in server.recorded()] == [500, 500, 200]
        assert [r.fault for r in server.recorded()] == ["server_error", "server_error", None]

    @pytest.mark.asyncio
    async def test_role_filter(self, client, server):
        server.add_fault(Fault(kind="rate_limit", role="auditor"))
        await ask(client, Role.planner)
        with pytest.raises(anthropic.RateLimitError):
            await ask(client, Role.auditor)
        await ask(client, Role.auditor)
        assert [(r.role, r.status) for r in server.recorded()] == [
            ("planner", 200), ("auditor", 429), ("auditor", 200)]


class TestRecordingAndErrors:
    """Requests are recorded without key values; malformed requests get Anthropic errors."""

    @pytest.mark.asyncio
    async def test_records_requests_without_key(self, client, server):
        await ask(client, Role.clarifier)
        await ask(client, Role.planner)
        (rec,) = server.recorded("planner")
        assert isinstance(rec, RecordedRequest)
        assert rec.status == 200 and rec.auth_present is True and rec.fault is None
        assert rec.body["model"] == MODEL
        assert rec.body["tool_choice"] == {"type": "tool", "name": "submit_plan"}
        assert len(server.recorded()) == 2
        assert "test-key" not in json.dumps([r.model_dump() for r in server.recorded()])

    @pytest.mark.asyncio
    async def test_missing_tool_choice_is_bad_request(self, client, server):
        with pytest.raises(anthropic.BadRequestError) as exc:
            await client.messages.create(model=MODEL, max_tokens=64,
                                         messages=[{"role": "user", "content": "hi"}])
        assert exc.value.body["error"]["type"] == "invalid_request_error"
        (rec,) = server.recorded()
        assert rec.status == 400 and rec.role is None

    @pytest.mark.asyncio
    async def test_unknown_tool_is_bad_request(self, client):
        with pytest.raises(anthropic.BadRequestError):
            await client.messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                tools=[{"name": "other", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "other"})

    def test_invalid_json_and_no_auth(self, server):
        status, body = http_json(server, "POST", "/v1/messages", b"{not json")
        assert status == 400
        assert body == {"type": "error", "error": {"type": "invalid_request_error",
                                                   "message": body["error"]["message"]}}
        (rec,) = server.recorded()
        assert rec.auth_present is False and rec.body == {}

    def test_unknown_path_is_404(self, server):
        status, body = http_json(server, "GET", "/v1/nothing")
        assert status == 404 and body["type"] == "error"

    @pytest.mark.asyncio
    async def test_count_tokens(self, client):
        result = await client.messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": REQUEST}])
        assert result.input_tokens >= 1

    def test_keep_alive_reuses_connection(self, server):
        host, port = server.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            for _ in range(3):
                conn.request("GET", "/_relay/health")
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read()) == {"ok": True}
                assert resp.getheader("Content-Length")
        finally:
            conn.close()


class TestControlEndpoints:
    """The /_relay endpoints drive a server living in another process."""

    @pytest.mark.asyncio
    async def test_faults_requests_reset_over_http(self, client, server):
        assert http_json(server, "GET", "/_relay/health") == (200, {"ok": True})
        fault = Fault(kind="overloaded", role="planner", retry_after=1).model_dump_json()
        assert http_json(server, "POST", "/_relay/faults", fault.encode())[0] == 200
        with pytest.raises(anthropic.InternalServerError):
            await ask(client, Role.planner)
        status, body = http_json(server, "GET", "/_relay/requests")
        assert status == 200
        assert [(r["role"], r["status"], r["fault"]) for r in body["requests"]] == [
            ("planner", 529, "overloaded")]
        assert http_json(server, "POST", "/_relay/reset", b"")[0] == 200
        assert http_json(server, "GET", "/_relay/requests") == (200, {"requests": []})
        await ask(client, Role.planner)  # the fault was cleared too

    def test_bad_fault_is_rejected(self, server):
        status, body = http_json(server, "POST", "/_relay/faults", b'{"kind": "meteor"}')
        assert status == 400 and body["error"]["type"] == "invalid_request_error"


class TestLifecycle:
    """start/stop: the url needs a started server; stop ends kept-alive connections too."""

    def test_url_requires_start(self):
        with pytest.raises(RuntimeError):
            ScriptedModel().url

    def test_stop_closes_kept_alive_connections(self):
        model = ScriptedModel().start()
        host, port = model.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", "/_relay/health")
            assert conn.getresponse().read()
            model.stop()
            with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
                conn.request("GET", "/_relay/health")
                conn.getresponse().read()
        finally:
            conn.close()
            model.stop()


SYSTEM = "You are the planner of a five-agent pipeline; answer with the submit_plan tool. " * 16
EPHEMERAL = {"type": "ephemeral"}


def marked(messages: list, ttl: str | None = None) -> list:
    """`messages` with a breakpoint on the last block, as relay's agent_turn places it."""
    *head, last = messages
    blocks = [dict(b) for b in last["content"]]
    blocks[-1]["cache_control"] = {**EPHEMERAL, **({"ttl": ttl} if ttl else {})}
    return [*head, {**last, "content": blocks}]


def turns(n: int) -> list:
    """A planner conversation of `n` user turns, each answered except the last."""
    messages: list = []
    for i in range(n):
        text = {"type": "text", "text": f"Turn {i}: plan the greeting module, step by step. " * 8}
        if messages:
            messages.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": "Accepted."}, text]})
        else:
            messages.append({"role": "user", "content": [text]})
        if i < n - 1:
            messages.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": f"toolu_{i + 1}", "name": "submit_plan",
                 "input": {"summary": f"Plan {i}", "steps": ["Write greeting.py"]}}]})
    return messages


async def cached_ask(client, messages: list, *, ttl: str | None = None, model: str = MODEL,
                     system_mark: dict | None = EPHEMERAL):
    system = {"type": "text", "text": SYSTEM, **({"cache_control": system_mark}
                                                  if system_mark else {})}
    msg = await client.messages.create(
        model=model, max_tokens=1024, system=[system], messages=marked(messages, ttl),
        tools=[tool_for(Role.planner)], tool_choice={"type": "tool", "name": "submit_plan"})
    return msg.usage


def total(u) -> int:
    return u.input_tokens + u.cache_read_input_tokens + u.cache_creation_input_tokens


class TestPromptCache:
    """Usage splits input into cache reads, cache writes and plain input as the API does."""

    @pytest.mark.asyncio
    async def test_first_request_writes_the_same_one_reads(self, client):
        first = await cached_ask(client, turns(1))
        again = await cached_ask(client, turns(1))
        assert first.cache_read_input_tokens == 0 and first.cache_creation_input_tokens > 0
        assert again.cache_read_input_tokens == first.cache_creation_input_tokens
        assert again.cache_creation_input_tokens == 0 and total(again) == total(first)
        assert 0 < again.input_tokens <= 3  # the turn's framing is never cached

    @pytest.mark.asyncio
    async def test_a_resumed_conversation_reads_its_history(self, client):
        """The rolling breakpoint: turn 2 reads all of turn 1's prompt and writes what is new."""
        first = await cached_ask(client, turns(1))
        second = await cached_ask(client, turns(2))
        assert second.cache_read_input_tokens == first.cache_creation_input_tokens
        assert total(second) == (second.cache_read_input_tokens
                                 + second.cache_creation_input_tokens + second.input_tokens)
        third = await cached_ask(client, turns(3))
        assert third.cache_read_input_tokens == (second.cache_read_input_tokens
                                                 + second.cache_creation_input_tokens)

    @pytest.mark.asyncio
    async def test_tools_and_system_are_read_when_the_messages_change(self, client):
        first = await cached_ask(client, turns(1))
        other = [{"role": "user", "content": [{"type": "text", "text": "Something else. " * 30}]}]
        usage = await cached_ask(client, other)
        assert 0 < usage.cache_read_input_tokens < first.cache_creation_input_tokens

    @pytest.mark.asyncio
    async def test_without_breakpoints_nothing_is_cached(self, client):
        for _ in range(2):
            usage = (await ask(client, Role.planner)).usage
            assert usage.cache_read_input_tokens == usage.cache_creation_input_tokens == 0

    @pytest.mark.asyncio
    async def test_a_short_prefix_is_not_cached(self):
        with ScriptedModel(min_cacheable_tokens=100_000) as server:
            async with anthropic.AsyncAnthropic(api_key="k", base_url=server.url) as c:
                for _ in range(2):
                    usage = await cached_ask(c, turns(1))
                    assert usage.cache_read_input_tokens == usage.cache_creation_input_tokens == 0

    @pytest.mark.asyncio
    async def test_the_cache_is_per_model(self, client):
        await cached_ask(client, turns(1))
        usage = await cached_ask(client, turns(1), model="relay-scripted-2")
        assert usage.cache_read_input_tokens == 0

    @pytest.mark.asyncio
    async def test_entries_expire_after_their_ttl_and_reads_refresh_them(self):
        now = [0.0]
        with ScriptedModel(clock=lambda: now[0]) as server:
            async with anthropic.AsyncAnthropic(api_key="k", base_url=server.url) as c:
                await cached_ask(c, turns(1), system_mark=None)
                now[0] = 299.0
                assert (await cached_ask(c, turns(1), system_mark=None)).cache_read_input_tokens
                now[0] = 598.0  # 5 minutes after the first write, but the read refreshed it
                assert (await cached_ask(c, turns(1), system_mark=None)).cache_read_input_tokens
                now[0] = 899.0
                assert not (await cached_ask(c, turns(1),
                                             system_mark=None)).cache_read_input_tokens
                await cached_ask(c, turns(2), ttl="1h", system_mark=None)
                now[0] += 3000.0
                assert (await cached_ask(c, turns(2), system_mark=None)).cache_read_input_tokens

    @pytest.mark.asyncio
    async def test_the_lookback_reaches_20_blocks_before_a_breakpoint(self, client):
        """As in the API: a turn that adds more than 20 blocks misses the history it extends."""
        first = await cached_ask(client, turns(1))
        wide = turns(1) + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": f"toolu_w{i}",
                                               "name": "list_files", "input": {}}
                                              for i in range(12)]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"toolu_w{i}",
                                          "content": "."} for i in range(12)]}]
        usage = await cached_ask(client, wide)
        assert 0 < usage.cache_read_input_tokens < first.cache_creation_input_tokens

    @pytest.mark.asyncio
    async def test_top_level_cache_control_marks_the_last_block(self, client):
        for _ in range(2):
            msg = await client.messages.create(
                model=MODEL, max_tokens=1024, system=SYSTEM, messages=turns(1),
                tools=[tool_for(Role.planner)], tool_choice={"type": "tool", "name": "submit_plan"},
                extra_body={"cache_control": EPHEMERAL})
        assert msg.usage.cache_read_input_tokens > 0 and msg.usage.cache_creation_input_tokens == 0

    @pytest.mark.asyncio
    async def test_more_than_four_breakpoints_is_a_bad_request(self, client):
        blocks = [{"type": "text", "text": f"part {i}", "cache_control": EPHEMERAL}
                  for i in range(5)]
        with pytest.raises(anthropic.BadRequestError) as exc:
            await client.messages.create(
                model=MODEL, max_tokens=64, messages=[{"role": "user", "content": blocks}],
                tools=[tool_for(Role.planner)], tool_choice={"type": "tool", "name": "submit_plan"})
        assert "A maximum of 4 blocks with cache_control" in exc.value.body["error"]["message"]

    @pytest.mark.asyncio
    async def test_count_tokens_is_the_total_that_usage_splits(self, client):
        usage = await cached_ask(client, turns(2))
        counted = await client.messages.count_tokens(
            model=MODEL, system=[{"type": "text", "text": SYSTEM}], messages=turns(2),
            tools=[tool_for(Role.planner)])
        assert counted.input_tokens == total(usage)
