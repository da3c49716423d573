"""docker-compose.yml and the Dockerfile agree with the code (no Docker engine runs here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from sqlalchemy.engine import make_url

from relay.settings import RelaySettings

ROOT = Path(__file__).parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_worker_environment_names_real_settings():
    """Every RELAY_* variable the workers get is a setting relay reads."""
    env = compose()["services"]["worker"]["environment"]
    fields = {f"RELAY_{name.upper()}" for name in RelaySettings.model_fields}
    unknown = [k for k in env if k.startswith("RELAY_") and k not in fields]
    assert not unknown
    settings = RelaySettings(**{k.removeprefix("RELAY_").lower(): v for k, v in env.items()
                                if k.startswith("RELAY_")}, anthropic_api_key="", anthropic_base_url="")
    assert settings.anthropic_api_key is None and settings.anthropic_base_url is None


def test_registry_database_exists_in_the_init_script():
    """The registry URL's database, user and password are the ones the init script creates."""
    url = make_url(compose()["services"]["worker"]["environment"]["RELAY_DATABASE_URL"])
    sql = (ROOT / "deploy" / "init-registry-db.sql").read_text()
    assert f"CREATE DATABASE {url.database} OWNER {url.username}" in sql
    assert f"CREATE ROLE {url.username} LOGIN PASSWORD '{url.password}'" in sql
    assert url.host == "postgresql" and "postgresql" in compose()["services"]
    assert url.drivername == "postgresql+psycopg"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("psycopg") for d in extras["postgres"])


def test_image_carries_every_package():
    """The Dockerfile copies every top-level package pyproject installs, with the postgres extra."""
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    for top in {p.split(".")[0] for p in packages}:
        assert re.search(rf"^COPY {top} \./{top}$", dockerfile, re.M), top
    assert "[postgres]" in dockerfile
    assert re.search(r"apt-get install .*\bgit\b", dockerfile)  # the git effects need it
    assert compose()["services"]["worker"]["environment"]["RELAY_TEMPORAL_ADDRESS"].split(":")[0] in (
        compose()["services"])
