"""Provider and registry errors mapped to Temporal retry behaviour, in one place.

The anthropic client runs with max_retries=0: Temporal owns retries. Capacity
and transport failures are retryable (and honour the provider's retry-after),
and so is an answer that arrives truncated or unreadable; a request the
provider refuses (bad request, auth, permission, not found, too large) is not,
so the spec fails at once with the status and the provider's reason instead of
retrying. A registry outage is retryable and never the failure of the work it
was recording.

Messages are one line: the cause, without transport debug dumps or library help links.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from http import HTTPStatus

import anthropic
from temporalio.exceptions import ApplicationError

from relay.registry import registry_outage

RETRYABLE_STATUS = {408, 409, 429}

NON_RETRYABLE_TYPES = ["ModelRequestRejected", "InvalidModelOutput", "ModelRefused", "SpecConflict"]

# When an attempt gave up on a registry outage: the next one waits at least this long, so an
# outage does not burn the activity's attempts in quick succession.
REGISTRY_RETRY_DELAY = timedelta(seconds=10)


def retry_after(headers: object) -> timedelta | None:
    """The provider's requested delay (retry-after-ms, retry-after seconds or HTTP date)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    if (ms := get("retry-after-ms")) is not None:
        try:
            return timedelta(milliseconds=max(0.0, float(ms)))
        except ValueError:
            pass
    value = get("retry-after")
    if value is None:
        return None
    try:
        return timedelta(seconds=max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(timedelta(0), when - datetime.now(timezone.utc))


def _kind(status: int) -> str:
    if status == 429:
        return "ModelRateLimited"
    if status == 529:
        return "ModelOverloaded"
    if status in (408, 504):
        return "ModelTimeout"
    if status == 409:
        return "ModelConflict"
    return "ModelServerError"


def _phrase(status: int) -> str:
    if status == 529:
        return "Overloaded"
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


_RUST_MESSAGE = re.compile(r'message: "([^"]*)"')
_HELP = re.compile(r"\s*(\(Background on this error at: [^)]*\)|See https?://\S+ for more details\.?)")


def clean(text: str) -> str:
    """One line of an error's text: Rust/transport debug structs reduced to their message,
    help links dropped."""
    if found := _RUST_MESSAGE.findall(text):
        text = found[-1]
    text = _HELP.sub("", text)
    return " ".join(text.split())[:300]


def _root_cause(exc: BaseException) -> str:
    """The most specific non-empty message along the cause chain (the socket error, not
    'Connection error.')."""
    best = ""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = clean(str(current))
        if text and not isinstance(current, anthropic.AnthropicError):
            best = text
        current = current.__cause__ or current.__context__
    return best


def _connect_failed(exc: BaseException) -> bool:
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, ConnectionRefusedError) or type(current).__name__ in (
                "ConnectError", "ConnectTimeout"):  # httpx's: the request never left
            return True
        current = current.__cause__ or current.__context__
    return False


def bad_response(endpoint: str, why: str) -> ApplicationError:
    """A 200 whose body is truncated or not a Messages API answer: the provider's fault and
    transient, so retried."""
    return ApplicationError(f"model endpoint {endpoint} sent an unreadable answer ({why}); "
                            "retrying", type="ModelBadResponse")


def to_temporal_error(exc: BaseException, *, endpoint: str) -> BaseException:
    """Translate an exception from a model call into the ApplicationError Temporal should see."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        provider = getattr(exc, "type", None) or ""
        reason = clean(getattr(exc, "api_message", None) or exc.message or "")
        message = f"model endpoint {endpoint} answered HTTP {status} {_phrase(status)}".rstrip()
        if provider:
            message += f" ({provider})"
        if reason:
            message += f": {reason}"
        if getattr(exc, "request_id", None):
            message += f" [request {exc.request_id}]"
        if status in RETRYABLE_STATUS or status >= 500:
            return ApplicationError(message, type=_kind(status),
                                    next_retry_delay=retry_after(exc.response.headers))
        return ApplicationError(message, type="ModelRequestRejected", non_retryable=True)
    if isinstance(exc, anthropic.APITimeoutError):
        return ApplicationError(f"model endpoint {endpoint} did not answer in time (the client's "
                                "timeout, RELAY_TURN_TIMEOUT_S)", type="ModelTimeout")
    if isinstance(exc, anthropic.APIConnectionError):
        why = _root_cause(exc) or "connection error"
        if _connect_failed(exc):
            return ApplicationError(f"model endpoint {endpoint} is unreachable: {why}",
                                    type="ModelUnreachable")
        return ApplicationError(f"the connection to model endpoint {endpoint} broke during the "
                                f"request: {why}", type="ModelUnreachable")
    if isinstance(exc, anthropic.APIResponseValidationError):
        return bad_response(endpoint, clean(str(exc)) or "not a Messages API answer")
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return bad_response(endpoint, f"truncated or not JSON: {clean(str(exc))}")
    return exc


def registry_error(exc: BaseException) -> ApplicationError | None:
    """A registry outage as a retryable error (it waits REGISTRY_RETRY_DELAY at least), or None
    for any other error."""
    outage = registry_outage(exc)
    if outage is None:
        return None
    return ApplicationError(str(outage), type="RegistryUnavailable",
                            next_retry_delay=REGISTRY_RETRY_DELAY)
