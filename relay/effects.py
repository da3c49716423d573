"""Side effects with compensations: the registry adopters extend.

An effect is a function that makes something true in the world and returns a
small JSON result. It must be safe to run again with the same payload (an
"ensure", not a blind "do"): the ledger makes a completed effect never run
twice, but a worker can die after acting and before the ledger says `done`.
A reversible effect has a compensation, which must also be idempotent and
accept that there is nothing to undo. An optional snapshot captures, before
acting, what the compensation will need (e.g. a file's previous content).

    effects = EffectRegistry()

    @effects.effect("tickets.open", reversible=True)
    def open_ticket(ctx: EffectContext, payload: dict) -> dict:
        return {"ticket": tracker.ensure_open(payload["title"], key=ctx.key)}

    @open_ticket.compensation
    def close_ticket(ctx, payload, undo, result):
        if result:
            tracker.close(result["ticket"])

Workers load extra registries with `relay worker --effects module:attribute`;
specs run them through `hooks` (see relay.models.HookEffect).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Payload = dict[str, Any]


@dataclass(frozen=True)
class EffectContext:
    spec_id: str
    run_id: str
    key: str
    data_dir: Path


Act = Callable[[EffectContext, Payload], Payload]
Snapshot = Callable[[EffectContext, Payload], Payload]
Compensate = Callable[[EffectContext, Payload, Payload | None, Payload | None], None]


class EffectFailed(Exception):
    """An effect that failed in a way the adopter can classify: retryable or not."""

    retryable = True


class EffectDefinition:
    def __init__(self, name: str, act: Act, reversible: bool, destructive: bool = False) -> None:
        self.destructive = destructive  # Gate 2: running it always needs a person
        self.name = name
        self.act = act
        self.reversible = reversible
        self.undo: Compensate | None = None
        self.take_snapshot: Snapshot | None = None

    def compensation(self, fn: Compensate) -> Compensate:
        if not self.reversible:
            raise ValueError(f"effect {self.name!r} is irreversible: it has no compensation")
        self.undo = fn
        return fn

    def snapshot(self, fn: Snapshot) -> Snapshot:
        self.take_snapshot = fn
        return fn

    def __call__(self, ctx: EffectContext, payload: Payload) -> Payload:
        return self.act(ctx, payload)


class UnknownEffect(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class EffectRegistry:
    def __init__(self) -> None:
        self._effects: dict[str, EffectDefinition] = {}

    def effect(self, name: str, *, reversible: bool = True,
               destructive: bool = False) -> Callable[[Act], EffectDefinition]:
        """Register an effect; `destructive=True`: a delivery hook running it always waits for
        a person's approval, whatever the trajectory's trust or auto_approve."""
        def register(fn: Act) -> EffectDefinition:
            if name in self._effects:
                raise ValueError(f"effect {name!r} is already registered")
            definition = EffectDefinition(name, fn, reversible, destructive)
            self._effects[name] = definition
            return definition

        return register

    def get(self, name: str) -> EffectDefinition:
        try:
            definition = self._effects[name]
        except KeyError:
            raise UnknownEffect(f"unknown effect {name!r}; registered: {sorted(self._effects)}") from None
        if definition.reversible and definition.undo is None:
            raise UnknownEffect(f"reversible effect {name!r} has no compensation registered")
        return definition

    def names(self) -> list[str]:
        return sorted(self._effects)

    def merge(self, other: EffectRegistry) -> EffectRegistry:
        merged = EffectRegistry()
        for registry in (self, other):
            for name, definition in registry._effects.items():
                if name in merged._effects:
                    raise ValueError(f"effect {name!r} is registered twice")
                merged._effects[name] = definition
        return merged


def load_registry(spec: str) -> EffectRegistry:
    """Import `module:attribute` naming an EffectRegistry (for `relay worker --effects`)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--effects takes module:attribute, got {spec!r}")
    registry = getattr(importlib.import_module(module_name), attribute)
    if not isinstance(registry, EffectRegistry):
        raise TypeError(f"{spec} is a {type(registry).__name__}, not an EffectRegistry")
    return registry
