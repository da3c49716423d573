"""Prompt templates, one versioned file per role.

A role file is markdown: the text before the first `## ` heading is the system
prompt; each `## <kind>` section is the template of one kind of user turn,
with `$name` placeholders. The prompt version is the hash of the role file and
the shared file, so a changed prompt is visible in every recorded session.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from string import Template

from relay.models import Role


@dataclass(frozen=True)
class RolePrompt:
    role: Role
    system: str
    templates: dict[str, str]
    version: str

    def render(self, kind: str, variables: dict[str, str]) -> str:
        if kind not in self.templates:
            raise KeyError(f"prompt for {self.role.value} has no '{kind}' section")
        try:
            return Template(self.templates[kind]).substitute(variables).strip()
        except KeyError as missing:
            raise KeyError(f"prompt {self.role.value}/{kind} needs variable {missing}") from None


def _sections(text: str) -> tuple[str, dict[str, str]]:
    head, *rest = text.split("\n## ")
    sections = {}
    for chunk in rest:
        name, _, body = chunk.partition("\n")
        sections[name.strip()] = body.strip()
    return head.strip(), sections


@lru_cache(maxsize=None)
def load(role: Role) -> RolePrompt:
    folder = resources.files(__package__)
    role_text = (folder / f"{role.value}.md").read_text(encoding="utf-8")
    common_text = (folder / "common.md").read_text(encoding="utf-8")
    system, templates = _sections(role_text)
    _, common = _sections(common_text)
    version = hashlib.sha256((role_text + "\0" + common_text).encode()).hexdigest()[:12]
    return RolePrompt(role=Role(role), system=system, templates={**common, **templates},
                      version=f"{role.value}@{version}")
