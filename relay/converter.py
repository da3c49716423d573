"""The data converter relay's client and worker share: Temporal's pydantic converter, made
unable to wedge a workflow on a payload it cannot decode.

A workflow entry point that takes `*args` gets its payloads decoded without type hints. The
stock converter raises on an unknown encoding or broken JSON there, which fails the workflow
*task* — retried forever, the spec stuck and unqueryable. Here such a payload decodes to an
`Undecodable` marker instead, and the workflow refuses it in its own code with a reason.
Typed decoding (activity results, typed handles) is unchanged: its errors stay errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.converter import DataConverter


class Undecodable:
    """A payload that could not be decoded; why, on one line."""

    def __init__(self, encoding: str, reason: str) -> None:
        self.encoding = encoding
        self.reason = reason

    def __str__(self) -> str:
        return f"a payload that cannot be decoded (encoding {self.encoding}): {self.reason}"

    __repr__ = __str__


class RelayPayloadConverter(PydanticPayloadConverter):
    def from_payloads(self, payloads: Sequence[Payload],
                      type_hints: list[type] | None = None) -> list[Any]:
        if type_hints:
            return super().from_payloads(payloads, type_hints)
        values: list[Any] = []
        for payload in payloads:
            try:
                values.append(super().from_payloads([payload])[0])
            except Exception as err:  # noqa: BLE001  (any decoding failure becomes the marker)
                encoding = payload.metadata.get("encoding", b"<none>").decode("utf-8", "replace")
                cause = err.__cause__ or err
                values.append(Undecodable(encoding, " ".join(str(cause).split())[:200]))
        return values


data_converter = DataConverter(payload_converter_class=RelayPayloadConverter)
