"""Settings from the environment (RELAY_*), read once by the process that needs them.

Nothing reads settings at import time; the CLI and the worker build a
`RelaySettings` and pass it down. The API key is a SecretStr so it never
renders in logs, reprs or workflow inputs.
"""

from __future__ import annotations

from copy import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay import one_line
from relay.models import Limits, Role, SpecInput

SECRET_SETTINGS = {"anthropic_api_key", "database_url"}  # never echoed in an error


def like_spec(name: str) -> FieldInfo:
    """The default and bounds of `SpecInput.<name>` (the budget a spec may set itself)."""
    return copy(SpecInput.model_fields[name])


def like_limits(name: str) -> FieldInfo:
    """The default and bounds of `Limits.<name>`, so a setting accepts exactly what a run's
    limits accept: a bad RELAY_* value is refused when settings load, not when a spec starts."""
    return copy(Limits.model_fields[name])


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

    data_dir: Path = Path(".relay")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; default sqlite in data_dir"
    )
    temporal_address: str = Field(default="127.0.0.1:7233", min_length=1)
    namespace: str = Field(default="default", min_length=1)
    task_queue: str = Field(default="relay", min_length=1)

    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "RELAY_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "RELAY_ANTHROPIC_BASE_URL")
    )
    model: str = Field(default="claude-sonnet-4-5", min_length=1)
    max_tokens: int = Field(default=4096, ge=1, le=1_000_000)

    max_request_bytes: int = like_limits("max_request_bytes")
    max_clarify_rounds: int = like_limits("max_clarify_rounds")
    max_audit_rounds: int = like_limits("max_audit_rounds")
    max_fix_rounds: int = like_limits("max_fix_rounds")
    answer_timeout_s: float | None = like_limits("answer_timeout_s")
    model_max_attempts: int = like_limits("model_max_attempts")
    turn_timeout_s: float = like_limits("turn_timeout_s")
    heartbeat_timeout_s: float = like_limits("heartbeat_timeout_s")
    max_tool_steps: int = like_limits("max_tool_steps")
    check_timeout_s: float = like_limits("check_timeout_s")
    effect_max_attempts: int = like_limits("effect_max_attempts")
    compensation_max_attempts: int = like_limits("compensation_max_attempts")
    capacity_attempts: int = like_limits("capacity_attempts")
    max_retry_after_s: float = like_limits("max_retry_after_s")
    model_wait_s: float = like_limits("model_wait_s")
    model_wait_max_s: float = like_limits("model_wait_max_s")
    model_call_timeout_s: float | None = like_limits("model_call_timeout_s")
    destructive_share: float = like_limits("destructive_share")

    # Gate 1: models that answer when the primary is out of capacity, comma-separated, in
    # order; RELAY_FALLBACK_MODELS_<ROLE> (e.g. RELAY_FALLBACK_MODELS_PLANNER) overrides it.
    fallback_models: str = ""
    fallback_models_clarifier: str | None = None
    fallback_models_planner: str | None = None
    fallback_models_auditor: str | None = None
    fallback_models_constructor: str | None = None
    fallback_models_validator: str | None = None

    # One budget per spec (all agents, all iterations); unset: no limit. A spec may set its own.
    budget_usd: float | None = like_spec("budget_usd")
    budget_tokens: int | None = like_spec("budget_tokens")
    prices: str | None = Field(
        default=None, description="price table overrides: JSON, or a .json/.toml file path")

    max_cached_workflows: int = Field(default=1000, ge=0, description="worker's sticky cache")
    max_concurrent_activities: int = Field(default=100, ge=1)

    effects: str | None = Field(default=None, description="module:attribute of an EffectRegistry")
    failpoints: str = Field(default="", description="test only: crash the worker at these points")

    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto (JSON unless a terminal) | json | console")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("budget_usd", "budget_tokens", "prices", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("prices")
    @classmethod
    def _prices_parse(cls, value: str | None) -> str | None:
        if value is not None:
            from relay.pricing import parse_prices

            parse_prices(value)  # a bad table is refused when settings load (PricesInvalid)
        return value

    def price_table(self) -> Any:
        from relay.pricing import load_prices

        return load_prices(self.prices)

    @field_validator("anthropic_api_key", "anthropic_base_url", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # docker compose passes `${VAR:-}` through as an empty string
        return None if isinstance(value, str) and not value.strip() else value

    def registry_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'registry.db').resolve()}"

    def limits(self) -> Limits:
        return Limits(
            max_request_bytes=self.max_request_bytes,
            max_clarify_rounds=self.max_clarify_rounds,
            max_audit_rounds=self.max_audit_rounds,
            max_fix_rounds=self.max_fix_rounds,
            answer_timeout_s=self.answer_timeout_s,
            model_max_attempts=self.model_max_attempts,
            turn_timeout_s=self.turn_timeout_s,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            max_tool_steps=self.max_tool_steps,
            check_timeout_s=self.check_timeout_s,
            effect_max_attempts=self.effect_max_attempts,
            compensation_max_attempts=self.compensation_max_attempts,
            capacity_attempts=self.capacity_attempts,
            max_retry_after_s=self.max_retry_after_s,
            model_wait_s=self.model_wait_s,
            model_wait_max_s=self.model_wait_max_s,
            model_call_timeout_s=self.model_call_timeout_s,
            destructive_share=self.destructive_share,
        )

    def fallback_chains(self) -> tuple[list[str], dict[Role, list[str]]]:
        """(the fallback models of every role, the per-role overrides) from the settings."""
        def names(text: str) -> list[str]:
            return [n.strip() for n in text.split(",") if n.strip()]

        by_role = {role: names(value) for role in Role
                   if (value := getattr(self, f"fallback_models_{role.value}")) is not None}
        return names(self.fallback_models), by_role


def setting_problem(exc: ValidationError, settings: type[BaseSettings] = RelaySettings) -> str:
    """`invalid setting RELAY_X: why (got V)` for the first invalid value, on one line."""
    error = exc.errors(include_url=False)[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    prefix = settings.model_config.get("env_prefix", "")
    name = (prefix + field).upper() if field else "(settings)"
    got = "" if field in SECRET_SETTINGS or "input" not in error else (
        f" (got {one_line(repr(error['input']), 80)})")
    return f"invalid setting {name}: {one_line(error['msg'])}{got}"


def load_settings(**values: Any) -> RelaySettings:
    """RelaySettings from the environment (and `values`); InvalidSettings in one line if any
    value is out of bounds, so no run ever starts with limits it cannot keep."""
    from relay.client import InvalidSettings

    try:
        return RelaySettings(**values)
    except ValidationError as exc:
        raise InvalidSettings(setting_problem(exc)) from None
