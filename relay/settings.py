"""Settings from the environment (RELAY_*), read once by the process that needs them.

Nothing reads settings at import time; the CLI and the worker build a
`RelaySettings` and pass it down. The API key is a SecretStr so it never
renders in logs, reprs or workflow inputs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay.models import Limits


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="ignore")

    data_dir: Path = Path(".relay")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the registry; default sqlite in data_dir"
    )
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    task_queue: str = "relay"

    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "RELAY_ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "RELAY_ANTHROPIC_BASE_URL")
    )
    model: str = "claude-sonnet-4-5"
    max_tokens: int = 4096

    max_request_bytes: int = 200_000
    max_clarify_rounds: int = 3
    max_audit_rounds: int = 3
    max_fix_rounds: int = 3
    answer_timeout_s: float | None = None
    model_max_attempts: int = 6
    turn_timeout_s: float = 600
    heartbeat_timeout_s: float = 60
    max_tool_steps: int = 25
    check_timeout_s: float = 300
    effect_max_attempts: int = 5
    compensation_max_attempts: int = 3

    max_cached_workflows: int = Field(default=1000, ge=0, description="worker's sticky cache")
    max_concurrent_activities: int = Field(default=100, ge=1)

    effects: str | None = Field(default=None, description="module:attribute of an EffectRegistry")
    failpoints: str = Field(default="", description="test only: crash the worker at these points")

    log_format: str = Field(default="auto", description="auto | json | console")
    log_level: str = "info"

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
        )
