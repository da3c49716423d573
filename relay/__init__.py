"""relay: a durable multi-agent workflow orchestrator.

    from relay import RelayClient
    client = await RelayClient.connect()
    spec_id = await client.run("Add a health endpoint")

Attributes load lazily so that workflow code importing `relay.models` pulls in
nothing but pydantic.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "RelayClient", "RelaySettings", "RelayError", "InvalidRequest", "InvalidAnswer",
    "SpecNotFound", "SpecAlreadyExists", "SpecAlreadyRunning", "SpecNotRunning", "SpecFailed",
    "TemporalUnreachable",
]


def __getattr__(name: str) -> Any:
    if name == "RelaySettings":
        from relay.settings import RelaySettings

        return RelaySettings
    if name in __all__:
        from relay import client

        return getattr(client, name)
    raise AttributeError(name)
