"""Provider errors mapped to Temporal retry behaviour, in one place.

The anthropic client runs with max_retries=0: Temporal owns retries. Capacity
and transport failures are retryable (and honour the provider's retry-after);
a request the provider refuses (bad request, auth, permission, not found) is
not, so the spec fails at once with a clear reason instead of retrying.
"""

from __future__ import annotations

from datetime import timedelta
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone

import anthropic
from temporalio.exceptions import ApplicationError

RETRYABLE_STATUS = {408, 409, 429}

NON_RETRYABLE_TYPES = ["ModelRequestRejected", "InvalidModelOutput", "SpecConflict"]


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
    return "ModelServerError"


def to_temporal_error(exc: BaseException, *, endpoint: str) -> BaseException:
    """Translate an anthropic exception into the ApplicationError Temporal should see."""
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        message = f"model endpoint {endpoint} answered HTTP {status}: {exc.message}"
        if status in RETRYABLE_STATUS or status >= 500:
            return ApplicationError(message, type=_kind(status),
                                    next_retry_delay=retry_after(exc.response.headers))
        return ApplicationError(message, type="ModelRequestRejected", non_retryable=True)
    if isinstance(exc, anthropic.APITimeoutError):
        return ApplicationError(f"model endpoint {endpoint} timed out", type="ModelTimeout")
    if isinstance(exc, anthropic.APIConnectionError):
        return ApplicationError(f"model endpoint {endpoint} is unreachable: {exc}",
                                type="ModelUnreachable")
    return exc
