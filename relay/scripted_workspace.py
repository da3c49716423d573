"""How the scripted model works in a workspace: deterministic tool calls per role.

Offered workspace tools, the constructor looks around, writes a small Python
module with unittest tests, and submits; the validator runs the checks and
judges by their exit code. Request markers steer it for demos and tests:
[no-tools] (answer at once), [declare-only] (the constructor declares files and writes none),
[delete-readme] (the constructor also deletes README.md), [buggy-first] (the first module fails its test), [escape] (the constructor
first tries paths outside the workspace), [overreach] (the auditor tries a
tool it is not allowed), [loop-forever] (the constructor never submits).
"""

from __future__ import annotations

from typing import Any

from relay.models import OUTPUT_TOOLS, Role

BUGGY_FIRST, ESCAPE, OVERREACH, LOOP_FOREVER = "[buggy-first]", "[escape]", "[overreach]", "[loop-forever]"
NO_TOOLS = "[no-tools]"  # answer at once, as without a workspace (for overhead measurements)
DECLARE_ONLY = "[declare-only]"  # the constructor declares files in its answer, writes none
DELETE_README = "[delete-readme]"  # the constructor also deletes README.md (a destructive change)
DEFAULT_CHECK = "python -m unittest"
EXAMPLE_FILES = ("greeting.py", "test_greeting.py")  # what the first construction writes
EXAMPLE = ("greeting.py, greet(name, lang) in English, Spanish or French, with unittest tests "
           "in test_greeting.py")

GREETING = '''"""Greetings in a few languages (written by relay's scripted model)."""

GREETINGS = {"en": "Hello", "es": "%s", "fr": "Bonjour"}


def greet(name: str, lang: str = "en") -> str:
    """Greet `name` in `lang`: en, es or fr."""
    return f"{GREETINGS[lang]}, {name}!"
'''

TESTS = '''import unittest

from greeting import greet


class GreetTest(unittest.TestCase):
    def test_english(self):
        self.assertEqual(greet("Ada"), "Hello, Ada!")

    def test_spanish(self):
        self.assertEqual(greet("Ada", "es"), "Hola, Ada!")

    def test_french(self):
        self.assertEqual(greet("Ada", "fr"), "Bonjour, Ada!")


if __name__ == "__main__":
    unittest.main()
'''

Call = tuple[str, dict[str, Any]]


def _blocks(message: dict) -> list[dict]:
    content = message.get("content")
    return [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []


def _turn_messages(messages: list[dict]) -> list[dict]:
    """The messages of the current turn: from the last user message that carries text."""
    start = 0
    for i, m in enumerate(messages):
        if m.get("role") == "user" and (isinstance(m.get("content"), str) or any(
                b.get("type") == "text" for b in _blocks(m))):
            start = i
    return messages[start:]


def _last_results(messages: list[dict]) -> str:
    last = messages[-1] if messages else {}
    return "\n".join(str(b.get("content", "")) for b in _blocks(last) if b.get("type") == "tool_result")


def next_calls(role: Role, messages: list[dict], original: str, tools: set[str]) -> list[Call] | None:
    """The tool calls to make now, or None when it is time to submit the result."""
    if NO_TOOLS in original or (DECLARE_ONLY in original and role == Role.constructor):
        return None
    turn = _turn_messages(messages)
    step = sum(1 for m in turn if m.get("role") == "assistant")
    submitted = sum(1 for m in messages if m.get("role") == "assistant" and any(
        b.get("type") == "tool_use" and b.get("name") == OUTPUT_TOOLS[role] for b in _blocks(m)))
    if role == Role.constructor and "write_file" in tools:
        return _constructor(step, submitted, original)
    if role == Role.validator and "run_checks" in tools:
        return [("run_checks", {})] if step == 0 else None
    if role == Role.auditor and OVERREACH in original and step == 0:
        return [("write_file", {"path": "audit.txt", "content": "not mine to write"})]
    return None


def _constructor(step: int, submitted: int, original: str) -> list[Call] | None:
    if LOOP_FOREVER in original:
        return [("list_files", {"path": "."})]
    escapes = [("write_file", {"path": "../outside.txt", "content": "x"}),
               ("write_file", {"path": "/tmp/relay-escape.txt", "content": "x"}),
               ("read_file", {"path": ".git/config"}),
               ("read_file", {"path": "escape-link/passwd"})]
    plan: list[list[Call]] = []
    if ESCAPE in original and submitted == 0:
        plan.append(escapes)
    if submitted == 0:
        spanish = "Hello" if BUGGY_FIRST in original else "Hola"
        plan += [[("list_files", {"path": "."})],
                 [("write_file", {"path": "greeting.py", "content": GREETING % spanish}),
                  ("write_file", {"path": "test_greeting.py", "content": TESTS})]]
        if DELETE_README in original:
            plan.append([("delete_file", {"path": "README.md"})])
    else:  # a fix or a later iteration: repair the module and note the change
        plan += [[("read_file", {"path": "greeting.py"})],
                 [("write_file", {"path": "greeting.py", "content": GREETING % "Hola"}),
                  ("write_file", {"path": f"changes/{submitted + 1}.md",
                                  "content": f"Change {submitted + 1} (scripted model)\n"})]]
    return plan[step] if step < len(plan) else None


def validation(messages: list[dict]) -> dict:
    """The validator's verdict from the check output it just received."""
    results = _last_results(_turn_messages(messages))
    if "exit code: 0" in results or "no check command" in results:
        return {"approved": True, "failures": []}
    tail = [line for line in results.splitlines() if line.strip()][-6:]
    return {"approved": False, "failures": ["The checks failed: " + " | ".join(tail)]}


def final_output(role: Role, messages: list[dict], scripted: dict, original: str = "") -> dict:
    """The result to submit once the tools are done; a scripted rejection still stands."""
    if NO_TOOLS in original or (DECLARE_ONLY in original and role == Role.constructor):
        return scripted
    if role == Role.constructor:
        return change_summary(messages)
    if role == Role.validator and scripted.get("approved"):
        return validation(messages)
    return scripted


def change_summary(messages: list[dict]) -> dict:
    written = [b["input"].get("path") for m in _turn_messages(messages) if m.get("role") == "assistant"
               for b in _blocks(m) if b.get("type") == "tool_use" and b.get("name") == "write_file"]
    return {"summary": "Wrote " + (", ".join(p for p in written if p) or "nothing"), "files": []}
