"""A local, deterministic stand-in for the Anthropic Messages API.

relay uses it as its built-in model when no API key is configured, and tests use
it as the model double: it answers `POST /v1/messages` with the forced tool's
structured output for each relay role, can inject faults, records every request
(never the key's value), and exposes `/_relay/*` control endpoints so a test can
drive a server in another process.

Faults: any HTTP error status (`error` with `status`, or the named 429/529/500/401
kinds), with or without retry-after; transport faults (`reset`: the connection
is cut mid-answer; `hang`: no answer for `delay_s`; `truncated`: a 200 whose
JSON body is cut short); and answers a real model may give (`slow`,
`invalid_output`, `max_tokens`: cut at max_tokens with incomplete tool input,
`refusal`, `text_only`: text and no tool call).

It answers as relay's roles would, reading relay's own prompts back: the
clarified spec restates the request and the answers, the plan names the files
the constructor will write, and a request other than its example (a greeting
module) is told plainly that only the example can be built and that
`ANTHROPIC_API_KEY` gives real work. Same request, same bytes.

Usage counts prompt caching as the Messages API does (see PromptCache): cache
breakpoints, prefix matches, TTLs, and the split into cache reads, cache writes
and plain input tokens.

Run alone with `python -m relay.scripted_model --port 8765`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from relay import prompts, scripted_workspace
from relay.models import OUTPUT_TOOLS, ROLE_BY_TOOL, SCRIPTED_MODEL_PREFIX, Role

FaultKind = Literal["rate_limit", "overloaded", "server_error", "auth_error", "error", "slow",
                    "invalid_output", "reset", "hang", "truncated", "max_tokens", "refusal",
                    "text_only", "divergent"]

# Fault kinds answered with an error: kind -> (HTTP status, Anthropic error type).
ERROR_FAULTS: dict[str, tuple[int, str]] = {
    "rate_limit": (429, "rate_limit_error"),
    "overloaded": (529, "overloaded_error"),
    "server_error": (500, "api_error"),
    "auth_error": (401, "authentication_error"),
}

# The Anthropic error type of each status (for the `error` fault).
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 408: "timeout_error", 409: "conflict_error",
    413: "request_too_large", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "api_error", 502: "api_error", 503: "api_error", 504: "timeout_error",
    529: "overloaded_error",
}

REFUSAL_TEXT = "I can't help with that request."


class _Transport(Exception):
    """A fault that is not an HTTP answer: the handler acts on the socket itself."""

    def __init__(self, fault: Fault, payload: dict | None = None) -> None:
        super().__init__(fault.kind)
        self.fault, self.payload = fault, payload


class Fault(BaseModel):
    kind: FaultKind
    role: str | None = None  # only requests of this role (None = any)
    count: int = 1  # how many matching requests it applies to, then it is spent
    retry_after: float | None = None  # seconds, sent as `retry-after` on error faults
    delay_s: float = 0.0  # "slow": sleep this long, then answer normally; "hang": hold this long
    status: int | None = None  # for "error": the HTTP status to answer with
    model: str | None = None  # only requests naming this model (None = any)


class RecordedRequest(BaseModel):
    role: str | None
    model: str | None = None
    body: dict
    status: int
    fault: str | None = None
    auth_present: bool = False


# --- role behaviour ----------------------------------------------------------
#
# The scripted model reads relay's own prompts back: each user text is matched against the
# role's prompt templates (relay/prompts), so it knows the request, the answers and the
# iteration instead of echoing whatever text came last. A text no template matches (a
# client talking to it directly) is the request when it comes first, and an answer or a
# request to revise when it comes later.


def _text(content: Any) -> str:
    """Text of message content: a string, or text / tool_result blocks (recursively)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(t for t in map(_text, content) if t)
    if isinstance(content, dict) and content.get("type") == "text":
        return str(content.get("text", ""))
    if isinstance(content, dict) and content.get("type") == "tool_result":
        return _text(content.get("content", ""))
    return ""


def _said(content: Any) -> str:
    """What the user wrote in a message: its text blocks, not the tool results."""
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content
                         if isinstance(b, dict) and b.get("type") == "text")
    return _text(content)


def slug(text: str, default: str = "change") -> str:
    """Lowercase alnum/underscore identifier of at most 30 characters."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:30].strip("_") or default


KEEP_ASKING = "[keep-asking]"  # a request carrying this marker makes the clarifier never finish
REJECT_ONCE = "[reject-once]"  # a request carrying this marker makes the validator reject once
API_KEY_HINT = "Set ANTHROPIC_API_KEY to have a real model do this work."
NO_TEST_FINDING = "The plan has no step that verifies the result with a test."


def is_example(request: str) -> bool:
    """Whether `request` asks for the one thing the scripted model can build: its greeting
    module (relay/examples/greeting.md and greeting-fix.md). A plain, deterministic rule: the
    request mentions greeting."""
    return "greet" in request.lower()


@functools.lru_cache(maxsize=None)
def _templates(role: Role) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Each prompt kind of `role` as a regex whose named groups are the template's variables."""
    compiled = []
    for kind, template in prompts.load(role).templates.items():
        regex, seen = [], set()
        for i, part in enumerate(re.split(r"\$(\w+)", template)):  # literal, name, literal, ...
            if i % 2 == 0:
                regex.append(re.escape(part))
            else:
                regex.append(f"(?P={part})" if part in seen else f"(?P<{part}>.*?)")
                seen.add(part)
        compiled.append((kind, re.compile("".join(regex), re.DOTALL)))
    return tuple(compiled)


@dataclass(frozen=True)
class Said:
    """One user text of the conversation: the prompt kind relay rendered it from (None for
    other text), that prompt's variables, and the text itself."""

    kind: str | None
    fields: dict[str, str]
    text: str


def _parse(role: Role, text: str) -> Said:
    for kind, pattern in _templates(role):
        if match := pattern.fullmatch(text):
            return Said(kind, match.groupdict(), text)
    return Said(None, {}, text)


@dataclass(frozen=True)
class Conversation:
    """A role's conversation as the scripted model reads it."""

    role: Role
    said: tuple[Said, ...]  # the user's texts, oldest first (never empty)
    prior: int  # results the role gave earlier in the conversation
    workspace: bool  # tools are offered and the request did not say [no-tools]

    @property
    def original(self) -> str:
        return self.said[0].text

    def request(self) -> str:
        """The spec's original request: the clarifier's first prompt holds it; the other roles
        find it in the clarified spec (the scripted clarifier's restates it; any other spec
        stands for itself)."""
        first = self.said[0]
        if "request" in first.fields:
            return first.fields["request"]
        if "spec" in first.fields:
            found = re.search(r"^Request: (.*?)(?:\n\n|\Z)", first.fields["spec"], re.M | re.S)
            return found.group(1) if found else first.fields["spec"]
        return first.text

    def files(self) -> list[str]:
        """What the constructor writes (see scripted_workspace): the greeting module and its
        tests in a workspace, a stub module named after the request without one."""
        if self.workspace:
            return list(scripted_workspace.EXAMPLE_FILES)
        return [f"relay_output/{slug(self.request())}.py"]

    def example(self) -> str:
        """The scripted model's example module, in words."""
        if self.workspace:
            return scripted_workspace.EXAMPLE
        return f"{self.files()[0]}, a stub whose describe() returns '{slug(self.request())}'"


def _limitation(conv: Conversation) -> str:
    return (f"relay's scripted model is answering, not a real model: it can only build its "
            f"example module ({conv.example()}), not what this request asks, so the change will "
            f"be that module. {API_KEY_HINT}")


def _later_changes_note() -> str:
    return ("The scripted model cannot make the changes asked since: each iteration it writes "
            f"its example module again and adds a change note under changes/. {API_KEY_HINT}")


def _clarifier(conv: Conversation) -> dict:
    if KEEP_ASKING in conv.original:
        n = 2 * conv.prior
        return {"questions": [{"id": f"q{n + 1}", "text": f"Question {n + 1}?"},
                              {"id": f"q{n + 2}", "text": f"Question {n + 2}?"}]}
    if conv.prior == 0:
        return {"questions": [{"id": "q1", "text": "Who will use the result, and how?"},
                              {"id": "q2", "text": "What must be true for this to count as done?"}]}
    return {"clarified_spec": _clarified_spec(conv)}


def _clarified_spec(conv: Conversation) -> str:
    """The request and every answer and change request, restated from the conversation."""
    answers, changes = [], []
    for said in conv.said[1:]:
        if said.kind == "answers":
            answers.append(said.fields["answers"])
        elif said.kind == "iterate":
            changes.append(f"- iteration {said.fields['iteration']}: {said.fields['request']}")
        elif said.kind is None:
            answers.append(said.text)
    parts = ["Clarified spec (scripted model)", f"Request: {conv.request()}",
             "Answers:\n" + "\n".join(answers) if answers else "Answers: none were given."]
    if changes:
        parts.append("Changes asked since:\n" + "\n".join(changes))
    if not is_example(conv.request()):
        parts.append(f"Scope: {_limitation(conv)}")
    else:
        parts.append(f"Scope: the scripted model's example module, {conv.example()}.")
        if changes:
            parts.append(_later_changes_note())
    return "\n\n".join(parts)


def _planner(conv: Conversation) -> dict:
    kinds = [s.kind for s in conv.said]
    newest_plan = max((i for i, k in enumerate(kinds) if k == "plan"), default=0)
    iteration = conv.said[newest_plan].fields.get("iteration", "1")
    revision = sum(1 for k in kinds[newest_plan + 1:] if k in ("revise", None))
    files = conv.files()
    if not conv.workspace:
        name = slug(conv.request())
        summary = f"Build {files[0]} (scripted model)"
        steps = ["Take the module's name from the request",
                 f"Write {files[0]}: a module whose describe() returns '{name}'",
                 f"Review {files[0]}"]
        verify = f"Verify the result: import {files[0]} and check that describe() returns '{name}'"
    elif iteration == "1":
        summary = f"Build {' and '.join(files)} (scripted model)"
        steps = ["List the workspace's files",
                 "Write greeting.py: greet(name, lang) in English, Spanish and French",
                 "Write test_greeting.py: one unittest case per language"]
        verify = "Verify the result with a test: run python -m unittest and fix any failure"
    else:
        summary = (f"Iteration {iteration}: write greeting.py again and note the change under "
                   f"changes/ (scripted model)")
        steps = ["Read greeting.py as the last iteration left it",
                 "Write greeting.py: greet(name, lang) in English, Spanish and French",
                 f"Write a change note under changes/ for the request of iteration {iteration}"]
        verify = "Verify the result with a test: run python -m unittest and fix any failure"
    if conv.prior:  # the auditor asked for it once; later plans keep it
        steps.append(verify)
    if revision:
        summary += f", revision number {revision}: adds a step that verifies the result"
    summary += "."
    if not is_example(conv.request()):
        summary += " " + _limitation(conv)
    elif iteration != "1":
        summary += " " + _later_changes_note()
    return {"summary": summary, "steps": steps}


def _auditor(conv: Conversation) -> dict:
    if conv.prior == 0:  # the first plan has no verification step (see _planner)
        return {"approved": False, "findings": [NO_TEST_FINDING]}
    return {"approved": True, "findings": []}


def _constructor(conv: Conversation) -> dict:
    name = slug(conv.request())
    content = (f'"""Scripted change for: {name}."""\n\n\ndef describe() -> str:\n'
               f'    """Return the name of this change."""\n    return "{name}"\n')
    return {"summary": f"Add relay_output/{name}.py",
            "files": [{"path": f"relay_output/{name}.py", "content": content}]}


def _validator(conv: Conversation) -> dict:
    if conv.prior == 0 and REJECT_ONCE in conv.original:
        return {"approved": False, "failures": ["The module has no test (scripted rejection)."]}
    return {"approved": True, "failures": []}


ROLE_ANSWERS = {Role.clarifier: _clarifier, Role.planner: _planner, Role.auditor: _auditor,
                Role.constructor: _constructor, Role.validator: _validator}


def conversation(role: Role, messages: Any, tools: Collection[str] = ()) -> Conversation:
    """How the scripted model reads `messages`, offered the workspace `tools`."""
    messages = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    texts = [t for t in (_said(m.get("content")) for m in messages if m.get("role") == "user") if t]
    said = tuple(_parse(role, t) for t in texts or [""])
    prior = sum(1 for m in messages if m.get("role") == "assistant" and _calls_output(role, m))
    workspace = bool(tools) and scripted_workspace.NO_TOOLS not in said[0].text
    return Conversation(role=role, said=said, prior=prior, workspace=workspace)


def role_output(role: Role, messages: Any, tools: Collection[str] = ()) -> dict:
    """The forced tool's input for `role`, given the request's `messages` history."""
    return ROLE_ANSWERS[role](conversation(role, messages, tools))


def _calls_output(role: Role, message: dict) -> bool:
    """Whether an assistant message gave the role's result (tool-free answers always do)."""
    content = message.get("content")
    if not isinstance(content, list):
        return True
    names = [b.get("name") for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    return not names or OUTPUT_TOOLS[role] in names


def divergent_output(role: Role, output: dict) -> dict:
    """A structurally different answer (the `divergent` fault): another verdict, other steps,
    other files — what a re-check on another model must catch."""
    if role in (Role.auditor, Role.validator):
        approved = not output.get("approved", True)
        key = "findings" if role == Role.auditor else "failures"
        return {"approved": approved, key: [] if approved else ["A divergent verdict (scripted)."]}
    if role == Role.planner:
        return {"summary": "A divergent plan (scripted)", "steps": ["Do something else entirely"]}
    if role == Role.constructor:
        return {**output, "summary": "A divergent change (scripted)",
                "files": [{"path": "relay_output/divergent.py", "content": "x = 1\n"}]}
    return output


def mark_model(output: dict, model: str) -> dict:
    """A second model's answer: the same decisions, text that says which model gave it."""
    marked = dict(output)
    if isinstance(marked.get("summary"), str):
        marked["summary"] = f"{marked['summary']} [by {model}]"
    if isinstance(marked.get("clarified_spec"), str):
        marked["clarified_spec"] = f"{marked['clarified_spec']}\n(answered by {model})"
    return marked


def error_body(error_type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _role_of(body: Any) -> Role | None:
    """The role from the forced output tool, or (tool_choice any) from the offered tools."""
    choice = body.get("tool_choice") if isinstance(body, dict) else None
    if isinstance(choice, dict) and choice.get("type") == "tool":
        return ROLE_BY_TOOL.get(choice.get("name"))  # type: ignore[arg-type]
    if isinstance(choice, dict) and choice.get("type") == "any":
        names = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
        return next((ROLE_BY_TOOL[n] for n in names if n in ROLE_BY_TOOL), None)
    return None


def _workspace_tools(body: dict) -> set[str]:
    return {t.get("name") for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("name") not in ROLE_BY_TOOL}


# --- prompt caching ----------------------------------------------------------
#
# Accounted the way the Messages API does it: blocks marked `cache_control` (on tools, system
# blocks and message content blocks, or the last block through the top-level `cache_control`;
# at most 4) end cacheable prefixes, rendered in the API's order tools -> system -> messages.
# A request reads the longest cached prefix it finds, looking back from each breakpoint over
# the 20 block boundaries before it (as the API does), writes the prefixes ending at its
# breakpoints beyond that, and pays the rest as plain input. Entries live per model for their
# TTL (5 minutes, or 1 hour with ttl "1h"), refreshed by every read.

MAX_BREAKPOINTS = 4
LOOKBACK_BLOCKS = 20
CACHE_TTL_S = {"5m": 300.0, "1h": 3600.0}
# Sonnet's minimum is 1024 tokens. relay's prompts are small (a role's tools and system prompt
# are 250-530 tokens by this count), so the default is a quarter of that: short prefixes still
# go uncached, while a role's tools + system prompt and its history are cached, as they would
# be with a real model's larger prompts. Pass 1024 to model Sonnet exactly.
MIN_CACHEABLE_TOKENS = 256
# What the API renders after the last block (the assistant turn's opening) is never cached:
# real answers report a few input_tokens even when every block is read from cache.
FRAMING_TOKENS = 3


def _tokens(value: Any) -> int:
    """The scripted model's token count: about 4 characters of JSON per token."""
    return max(1, len(json.dumps(value)) // 4)


@dataclass(frozen=True)
class _Block:
    """One block of the rendered prompt: its tokens, the hash of the whole prefix it ends, and
    the TTL it was marked with (None: not a breakpoint)."""

    tokens: int
    key: str
    ttl: float | None


def _ttl(block: Any) -> float | None:
    mark = block.get("cache_control") if isinstance(block, dict) else None
    if not isinstance(mark, dict) or mark.get("type") != "ephemeral":
        return None
    return CACHE_TTL_S.get(str(mark.get("ttl", "5m")), CACHE_TTL_S["5m"])


def _rendered(body: dict) -> list[tuple[str, Any]]:
    """(where, block) for every block of the prompt, in the API's order; a string system
    prompt or message content is one text block."""
    def as_blocks(content: Any) -> list[Any]:
        return [{"type": "text", "text": content}] if isinstance(content, str) else (
            list(content) if isinstance(content, list) else [])

    blocks = [("tools", t) for t in body.get("tools") or []]
    blocks += [("system", b) for b in as_blocks(body.get("system"))]
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            blocks += [(str(m.get("role")), b) for b in as_blocks(m.get("content"))]
    return blocks


def prompt_blocks(body: dict) -> list[_Block]:
    """The prompt's blocks with their prefix hashes. A block's `cache_control` is not part of
    its content (moving a breakpoint does not change the prefix), and key order is not either
    (the API reads JSON, it does not hash the bytes the client happened to send)."""
    rendered = _rendered(body)
    top = _ttl(body)  # the top-level cache_control marks the last block
    out, prefix = [], hashlib.sha256(str(body.get("model")).encode()).hexdigest()
    for i, (where, block) in enumerate(rendered):
        content = {k: v for k, v in block.items() if k != "cache_control"} if isinstance(
            block, dict) else block
        canonical = json.dumps([where, content], sort_keys=True, separators=(",", ":"))
        prefix = hashlib.sha256((prefix + canonical).encode()).hexdigest()
        ttl = _ttl(block) or (top if i == len(rendered) - 1 else None)
        out.append(_Block(tokens=_tokens(content), key=prefix, ttl=ttl))
    return out


def input_tokens(body: dict) -> int:
    """All of a request's input tokens, cached or not (what count_tokens answers)."""
    return sum(b.tokens for b in prompt_blocks(body)) + FRAMING_TOKENS


def too_many_breakpoints(body: dict) -> str | None:
    marks = sum(1 for b in prompt_blocks(body) if b.ttl is not None)
    if marks > MAX_BREAKPOINTS:
        return (f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                f"Found {marks}.")
    return None


class CacheUsage(BaseModel):
    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class PromptCache:
    """The server side of prompt caching: prefix hashes per model, each with its expiry."""

    def __init__(self, min_tokens: int = MIN_CACHEABLE_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.min_tokens, self.clock = min_tokens, clock
        self._entries: dict[str, tuple[float, float]] = {}  # prefix hash -> (expires, ttl)
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def account(self, body: dict) -> CacheUsage:
        """Split the request's input into cache reads, cache writes and plain input, and
        store the prefixes it writes (the model is in every hash: caches are per model)."""
        blocks = prompt_blocks(body)
        ends = list(itertools.accumulate(b.tokens for b in blocks))  # tokens up to block i
        marks = [i for i, b in enumerate(blocks) if b.ttl is not None]
        with self._lock:
            now = self.clock()
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            hit = max((self._hit(blocks, m) for m in marks), default=-1)
            if hit >= 0:  # a read refreshes the entry's lifetime
                ttl = self._entries[blocks[hit].key][1]
                self._entries[blocks[hit].key] = (now + ttl, ttl)
            written = hit
            for m in marks:
                if m > hit and ends[m] >= self.min_tokens:
                    self._entries[blocks[m].key] = (now + blocks[m].ttl, blocks[m].ttl)  # type: ignore[operator]
                    written = m
        read = ends[hit] if hit >= 0 else 0
        write = ends[written] - read if written > hit else 0
        total = ends[-1] if ends else 0
        return CacheUsage(input_tokens=total - read - write + FRAMING_TOKENS,
                          cache_creation_input_tokens=write, cache_read_input_tokens=read)

    def _hit(self, blocks: list[_Block], mark: int) -> int:
        """The longest cached prefix found looking back from a breakpoint, as a block index."""
        for i in range(mark, max(mark - LOOKBACK_BLOCKS, -1), -1):
            if blocks[i].key in self._entries:
                return i
        return -1


# --- HTTP --------------------------------------------------------------------


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Overloaded" if status == 529 else "Error"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server  # type: ignore[assignment]

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        self.server.open_sockets.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def send(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        """Write status line, headers and body in a single write."""
        data = json.dumps(payload).encode()
        lines = [f"HTTP/1.1 {status} {_reason(status)}", "Content-Type: application/json",
                 f"Content-Length: {len(data)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        if self.close_connection:
            lines.append("Connection: close")
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)

    def transport_fault(self, fault: Fault, payload: dict | None) -> None:
        """Misbehave on the wire: cut the answer, withhold it, or send a truncated body."""
        data = json.dumps(payload or {}).encode()
        if fault.kind == "hang":
            deadline = time.monotonic() + (fault.delay_s or 30.0)
            while time.monotonic() < deadline and not self.server.stopping.is_set():
                time.sleep(0.05)
        elif fault.kind == "truncated":  # a complete HTTP message whose JSON is cut short
            cut = data[: len(data) // 2]
            self.wfile.write(("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(cut)}\r\n\r\n").encode() + cut)
            return
        elif fault.kind == "reset":  # headers and half the body, then a TCP reset
            self.wfile.write(("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                              f"Content-Length: {len(data)}\r\n\r\n").encode()
                             + data[: len(data) // 2])
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()

    def not_found(self, path: str) -> None:
        self.send(404, error_body("not_found_error", f"Unknown path: {path}"))

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/_relay/health":
            self.send(200, {"ok": True})
        elif path == "/_relay/requests":
            self.send(200, {"requests": [r.model_dump() for r in self.server.model.recorded()]})
        else:
            self.not_found(path)

    def do_POST(self) -> None:  # noqa: N802
        path, model = self.path.split("?", 1)[0], self.server.model
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if path == "/v1/messages":
            auth = bool(self.headers.get("Authorization") or self.headers.get("x-api-key"))
            try:
                self.send(*model.handle_messages(raw, auth))
            except _Transport as t:
                self.transport_fault(t.fault, t.payload)
            except Exception as e:  # a bug must still get an answer, not a dropped connection
                self.send(500, error_body("api_error", f"Scripted model error: {e!r}"))
        elif path == "/v1/messages/count_tokens":
            with contextlib.suppress(ValueError):
                raw = json.loads(raw or b"{}")
            body = raw if isinstance(raw, dict) else {}
            self.send(200, {"input_tokens": input_tokens(body)})
        elif path == "/_relay/faults":
            try:
                model.add_fault(Fault.model_validate_json(raw))
                self.send(200, {"ok": True})
            except ValidationError as e:
                self.send(400, error_body("invalid_request_error", str(e)))
        elif path == "/_relay/reset":
            model.reset()
            self.send(200, {"ok": True})
        else:
            self.not_found(path)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], model: ScriptedModel) -> None:
        super().__init__(address, _Handler)
        self.model = model
        self.open_sockets: set[socket.socket] = set()
        self.stopping = threading.Event()  # ends held (hanging) requests

    def close_connections(self) -> None:
        """End kept-alive connections so clients see the server go away."""
        for sock in list(self.open_sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class ScriptedModel:
    """The scripted Messages API server. Use as a context manager or start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = f"{SCRIPTED_MODEL_PREFIX}-1",
                 min_cacheable_tokens: int = MIN_CACHEABLE_TOKENS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`min_cacheable_tokens`: the shortest prefix the prompt cache stores (see
        MIN_CACHEABLE_TOKENS); `clock`: seconds, for the cache's TTLs."""
        self.host, self.port, self.model_name = host, port, model_name
        self.cache = PromptCache(min_cacheable_tokens, clock)
        self.requests: list[RecordedRequest] = []
        self._arrived: list[str] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ScriptedModel is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ScriptedModel:
        self._server = _Server((self.host, self.port), self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="scripted-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stopping.set()
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ScriptedModel:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def recorded(self, role: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if role is None or r.role == role]

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault.model_copy())

    def arrived(self, role: str | None = None) -> int:
        """Requests received so far (counted on arrival, before any delay or answer)."""
        with self._lock:
            return sum(1 for r in self._arrived if role is None or r == role)

    def reset(self) -> None:
        with self._lock:
            self._arrived.clear()
            self.requests.clear()
            self._faults.clear()
        self.cache.clear()  # a test starts from a cold cache, as if its prefixes had expired

    def _take_fault(self, role: Role, model: str | None = None) -> Fault | None:
        """The first unspent fault matching `role` (and model), with its count decremented."""
        with self._lock:
            for fault in self._faults:
                if fault.count > 0 and fault.role in (None, role.value) and (
                        fault.model in (None, model)):
                    fault.count -= 1
                    if fault.count <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record(self, role: Role | None, body: Any, status: int, fault: str | None,
                auth: bool) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        rec = RecordedRequest(role=role.value if role else None, status=status, fault=fault,
                              model=model if isinstance(model, str) else None,
                              body=body if isinstance(body, dict) else {}, auth_present=auth)
        with self._lock:
            self.requests.append(rec)

    def handle_messages(self, raw: bytes, auth: bool) -> tuple[int, dict, dict[str, str]]:
        """Answer one `POST /v1/messages`: (status, JSON payload, extra headers)."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict) and (problem := too_many_breakpoints(body)):
            self._record(None, body, 400, None, auth)
            return 400, error_body("invalid_request_error", problem), {}
        role = _role_of(body)
        if role is None:
            self._record(None, body, 400, None, auth)
            msg = "Body must be JSON with tool_choice {type: tool, name: <a relay output tool>}"
            return 400, error_body("invalid_request_error", msg), {}
        with self._lock:
            self._arrived.append(role.value)
        asked = body.get("model") if isinstance(body.get("model"), str) else None
        fault = self._take_fault(role, asked)
        kind = fault.kind if fault else None
        if fault and (fault.kind in ERROR_FAULTS or fault.kind == "error"):
            if fault.kind == "error":
                status = fault.status or 500
                error_type = ERROR_TYPES.get(status, "api_error")
            else:
                status, error_type = ERROR_FAULTS[fault.kind]
            self._record(role, body, status, kind, auth)
            retry = {} if fault.retry_after is None else {"retry-after": f"{fault.retry_after:g}"}
            return status, error_body(error_type, f"Scripted fault: {kind}"
                                      + (f" {status}" if fault.kind == "error" else "")), retry
        if fault and fault.kind == "slow":
            time.sleep(fault.delay_s)
        if fault and fault.kind in ("hang", "reset"):
            self._record(role, body, 0, kind, auth)
            output = role_output(role, body["messages"], _workspace_tools(body))
            raise _Transport(fault, self._message(body, [(OUTPUT_TOOLS[role], output)]))
        if kind == "invalid_output":
            output: dict = {"unexpected": True}
            self._record(role, body, 200, kind, auth)
            return 200, self._message(body, [(OUTPUT_TOOLS[role], output)]), {}
        if kind == "max_tokens":  # the answer stopped mid tool call: its input is incomplete
            self._record(role, body, 200, kind, auth)
            return 200, self._message(body, [(OUTPUT_TOOLS[role], {})], stop="max_tokens"), {}
        if kind in ("refusal", "text_only"):
            text = REFUSAL_TEXT if kind == "refusal" else "Here is my answer, in prose."
            self._record(role, body, 200, kind, auth)
            return 200, self._message(body, [], stop="refusal" if kind == "refusal" else "end_turn",
                                      text=text), {}
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        tools = _workspace_tools(body)
        calls = None
        original = next((t for t in (_said(m.get("content")) for m in messages
                                     if m.get("role") == "user") if t), "")
        if tools:
            calls = scripted_workspace.next_calls(role, messages, original, tools)
        if calls is None:
            output = role_output(role, messages, tools)
            if tools:
                output = scripted_workspace.final_output(role, messages, output, original)
            if asked and asked != self.model_name:
                output = mark_model(output, asked)
            if kind == "divergent":
                output = divergent_output(role, output)
            calls = [(OUTPUT_TOOLS[role], output)]
            if (tools and role == Role.constructor and "write_file" in tools
                    and scripted_workspace.NO_TOOLS in original):
                # one answer, as without tools, that still writes what it declares: only what
                # the tools write reaches the repository
                calls = [("write_file", {"path": f["path"], "content": f["content"]})
                         for f in output.get("files") or []] + calls
        self._record(role, body, 200, kind, auth)
        if kind == "truncated":
            raise _Transport(fault, self._message(body, calls))  # type: ignore[arg-type]
        return 200, self._message(body, calls), {}

    def _message(self, body: dict, calls: list[tuple[str, dict]], stop: str = "tool_use",
                 text: str | None = None) -> dict:
        n = next(self._ids)
        content = [{"type": "text", "text": text}] if text else []
        content += [{"type": "tool_use", "id": f"toolu_scripted_{n}_{i}", "name": name,
                     "input": args} for i, (name, args) in enumerate(calls)]
        return {
            "id": f"msg_scripted_{n}", "type": "message", "role": "assistant",
            "model": body.get("model") or self.model_name,
            "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {**self.cache.account(body).model_dump(), "output_tokens": _tokens(content)},
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve relay's scripted model locally.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--model-name", default=f"{SCRIPTED_MODEL_PREFIX}-1")
    parser.add_argument("--min-cacheable-tokens", type=int, default=MIN_CACHEABLE_TOKENS)
    args = parser.parse_args(argv)
    with ScriptedModel(args.host, args.port, args.model_name,
                       args.min_cacheable_tokens) as model:
        print(f"Scripted model serving at {model.url} (Ctrl-C to stop)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
