"""structlog setup: JSON in production, readable in a terminal, replay-safe, secret-free.

Every record carries the Temporal context it was emitted in (workflow id, run
id, activity) and whatever the activity bound (spec, role, session). Records
emitted while a workflow replays its history are dropped, so each line appears
once. Anything that looks like an API key is redacted before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from temporalio import activity, workflow

_SECRET = re.compile(r"sk-ant-[A-Za-z0-9_\-]+|(?i:bearer)\s+[A-Za-z0-9_\-\.]{8,}")
_SECRET_KEYS = {"api_key", "anthropic_api_key", "authorization", "x-api-key", "password", "secret"}


def add_temporal_context(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if workflow.in_workflow():
        if workflow.unsafe.is_replaying_history_events():
            raise structlog.DropEvent
        info = workflow.info()
        event.setdefault("spec_id", info.workflow_id)
        event.setdefault("workflow_id", info.workflow_id)
        event.setdefault("run_id", info.run_id)
    elif activity.in_activity():
        info = activity.info()
        event.setdefault("workflow_id", info.workflow_id)
        event.setdefault("activity", info.activity_type)
    return event


def redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in list(event.items()):
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str) and _SECRET.search(value):
            event[key] = _SECRET.sub("[redacted]", value)
    return event


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once per process (CLI, worker). `fmt`: auto | json | console."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (structlog.processors.JSONRenderer() if use_json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_temporal_context,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
