"""relay: a durable multi-agent workflow orchestrator.

    from relay import RelayClient
    client = await RelayClient.connect()
    spec_id = await client.run("Add a health endpoint")

Attributes load lazily so that workflow code importing `relay.models` pulls in
nothing but pydantic.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "RelayClient", "RelaySettings", "RelayError", "InvalidRequest", "InvalidAnswer",
    "InvalidSettings", "PayloadTooLarge", "RegistryUnavailable",
    "SpecNotFound", "SpecAlreadyExists", "SpecAlreadyRunning", "SpecNotRunning", "SpecFailed",
    "TemporalUnreachable",
]
_LAZY = set(__all__) - {"one_line"}

# Lines that libraries append for their developers, not for relay's users: SQLAlchemy's
# statement, parameters and help link, pydantic's help link.
_LIBRARY_NOISE = re.compile(
    r"^\s*(\[SQL: |\[parameters: |\(Background on this error at: |For further information visit )")
_HELP_LINK = re.compile(r"\s*\(Background on this error at: [^)]*\)|\s*For further information visit \S+")
# Where the Rust core's Debug output starts: `tonic::transport::Error(...)`, `Status { code: ...`
_RUST_DEBUG = re.compile(r"\b(?:[A-Za-z_]\w*::)+[A-Za-z_]\w*\s*[({]|\bStatus \{ code: ")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
# gRPC metadata and binary details inside a Status carry headers, not the cause
_RUST_METADATA = re.compile(r"metadata: MetadataMap \{ headers: \{[^}]*\} \}|details: \[[^\]]*\]")
ONE_LINE_MAX = 500


def one_line(text: object, limit: int = ONE_LINE_MAX) -> str:
    """A message on one line for people: transport debug text and library help links dropped,
    the cause kept, lone surrogates (undecodable bytes from the OS) shown escaped.

    The one home of this rule: the CLI, the SDK and the workflows all use it.
    """
    lines = [line for line in str(text).splitlines() if not _LIBRARY_NOISE.match(line)]
    message = _HELP_LINK.sub("", " ".join(lines))
    message = _without_rust_debug(message)
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    message = " ".join(message.split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _without_rust_debug(message: str) -> str:
    """`prefix: tonic::transport::Error(... "tcp connect error" ... message: "refused" ...)`
    becomes `prefix: tcp connect error: refused`: the quoted parts are the cause."""
    found = _RUST_DEBUG.search(message)
    if not found:
        return message
    quoted: list[str] = []
    for part in _QUOTED.findall(_RUST_METADATA.sub("", message[found.start():])):
        part = part.replace('\\"', '"').strip()
        if part and not any(part in seen for seen in quoted):
            quoted.append(part)
    if not quoted:  # nothing readable to keep: the debug text is the only cause there is
        return message
    prefix = message[: found.start()].rstrip(" :")
    return ": ".join([prefix, *quoted] if prefix else quoted)


def __getattr__(name: str) -> Any:
    if name == "RelaySettings":
        from relay.settings import RelaySettings

        return RelaySettings
    if name in _LAZY:
        from relay import client

        return getattr(client, name)
    raise AttributeError(name)
