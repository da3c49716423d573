"""What model calls cost: a price table per model, and the cost of recorded usage.

Prices are USD per million tokens for the four parts the Messages API bills separately
(plain input, output, cache reads, cache writes). Each entry names its source and date.
A model name matches an entry exactly, or as the entry's name plus a dated snapshot suffix
(`claude-sonnet-4-5-20250929` is priced as `claude-sonnet-4-5`); an unknown model is
*unpriced*: its tokens are counted, its dollars are not, and cost figures name it.

Override or extend the table with the setting RELAY_PRICES: either the JSON itself or the
path of a .json or .toml file holding it, one format in all three cases, a table of model
name to prices:

    {"claude-sonnet-4-5": {"input": 3, "output": 15, "cache_read": 0.3, "cache_write": 3.75,
                           "source": "our contract", "date": "2026-11-01"}}

An entry given there replaces the built-in one of that name as a whole.

What relay does not price: the long-context tier (input over 200K tokens costs more on some
models), 1-hour cache writes (relay writes 5-minute ones), batch discounts, data-residency
multipliers and server tools. Cost figures are what the price table says, not an invoice.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.models import SCRIPTED_MODEL_PREFIX, Cost, SpecCost, is_scripted

MILLION = 1_000_000

# Anthropic's pricing page, as stored in this environment's reference copy (no internet here:
# not re-checked live). Sonnet 4.6 and Haiku 4.5 cache prices are the page's standard
# multipliers (cache read 0.1x input, 5-minute cache write 1.25x input), not read off a row.
_ANTHROPIC = "Anthropic pricing page, platform.claude.com/docs/en/about-claude/pricing"
_DATE = "2026-11 (stored copy, not re-checked live)"


def _p(input: float, output: float, cache_read: float, cache_write: float,  # noqa: A002
       source: str = _ANTHROPIC, date: str = _DATE) -> dict[str, Any]:
    return dict(input=input, output=output, cache_read=cache_read, cache_write=cache_write,
                source=source, date=date)


_DERIVED = _ANTHROPIC + " (input/output); cache prices from its standard multipliers"

DEFAULT_PRICES: dict[str, dict[str, Any]] = {
    # relay's default model (RELAY_MODEL)
    "claude-sonnet-4-5": _p(3, 15, 0.30, 3.75),
    "claude-sonnet-4-6": _p(3, 15, 0.30, 3.75, source=_DERIVED),
    "claude-sonnet-4": _p(3, 15, 0.30, 3.75),
    "claude-sonnet-4-0": _p(3, 15, 0.30, 3.75),
    "claude-sonnet-5": _p(2, 10, 0.20, 2.50),
    "claude-sonnet-5-5": _p(2, 10, 0.20, 2.50),
    "claude-opus-4-5": _p(5, 25, 0.50, 6.25),
    "claude-opus-4-6": _p(5, 25, 0.50, 6.25),
    "claude-opus-4-7": _p(5, 25, 0.50, 6.25),
    "claude-opus-4-8": _p(5, 25, 0.50, 6.25),
    "claude-opus-5": _p(5, 25, 0.50, 6.25),
    "claude-opus-4-1": _p(15, 75, 1.50, 18.75),
    "claude-opus-4": _p(15, 75, 1.50, 18.75),
    "claude-opus-4-0": _p(15, 75, 1.50, 18.75),
    "claude-haiku-4-5": _p(1, 5, 0.10, 1.25, source=_DERIVED),
    "claude-3-5-haiku": _p(0.80, 4, 0.08, 1),
    # relay's scripted model (relay-scripted-1, ...): a local double, it costs nothing
    SCRIPTED_MODEL_PREFIX: _p(0, 0, 0, 0, source="relay's scripted model: not a real LLM, "
                              "no charge", date="-"),
}

_SUFFIX = re.compile(r"^-(\d{8}|latest)$")  # a dated snapshot or the -latest alias


class Price(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, le=1e6, allow_inf_nan=False, description="USD per million")
    output: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    cache_read: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    cache_write: float = Field(ge=0, le=1e6, allow_inf_nan=False)
    source: str = "RELAY_PRICES"
    date: str = "-"

    def cost(self, input_tokens: int, output_tokens: int, cache_read: int,
             cache_write: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output
                + cache_read * self.cache_read + cache_write * self.cache_write) / MILLION


class PriceTable:
    def __init__(self, prices: Mapping[str, Price]) -> None:
        self.prices = dict(prices)

    def price(self, model: str | None) -> Price | None:
        """The entry for `model`: its own, or its base name's (the longest that fits)."""
        if not model:
            return None
        if model in self.prices:
            return self.prices[model]
        if is_scripted(model) and SCRIPTED_MODEL_PREFIX in self.prices:
            return self.prices[SCRIPTED_MODEL_PREFIX]  # relay-scripted-1, relay-scripted-2, ...
        best = max((name for name in self.prices
                    if model.startswith(name) and _SUFFIX.match(model[len(name):])),
                   key=len, default=None)
        return self.prices[best] if best is not None else None

    def describe(self) -> list[dict[str, Any]]:
        return [{"model": name, **p.model_dump()} for name, p in sorted(self.prices.items())]


class PricesInvalid(ValueError):
    pass


def parse_prices(text: str) -> dict[str, Price]:
    """RELAY_PRICES: the JSON itself, or the path of a .json or .toml file holding it."""
    raw = text.strip()
    if raw.startswith("{"):
        try:
            data: Any = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PricesInvalid(f"RELAY_PRICES is not valid JSON: {exc}") from None
    else:
        path = Path(raw).expanduser()
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise PricesInvalid(f"RELAY_PRICES names {raw!r}, which cannot be read: "
                                f"{exc.strerror or exc}") from None
        try:
            data = (tomllib.loads(content.decode("utf-8")) if path.suffix == ".toml"
                    else json.loads(content))
        except (ValueError, UnicodeDecodeError) as exc:
            raise PricesInvalid(f"{raw} is not a valid price table: {exc}") from None
    if not isinstance(data, dict):
        raise PricesInvalid("RELAY_PRICES must be a table of model name to prices")
    prices = {}
    for name, entry in data.items():
        try:
            prices[str(name)] = Price.model_validate(entry)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PricesInvalid(f"RELAY_PRICES entry {name!r}: {where}: {first['msg']}") from None
    return prices


def load_prices(override: str | None = None) -> PriceTable:
    """The built-in table, with RELAY_PRICES' entries replacing or adding models."""
    table = {name: Price.model_validate(p) for name, p in DEFAULT_PRICES.items()}
    if override and override.strip():
        table.update(parse_prices(override))
    return PriceTable(table)


# --- cost of recorded usage ------------------------------------------------------------


def spec_cost(usage_rows: Iterable[tuple[str, str | None, int, int, int, int, int]],
              billed_rows: Iterable[tuple[str, int, float | None]],
              prices: PriceTable) -> SpecCost:
    """The spec's cost from the registry's sums: `usage_rows` are (role, model, answers,
    input, output, cache read, cache write) per session and model; `billed_rows` are the
    possibly-billed calls (role, estimated tokens, estimated USD or None)."""
    by_role: dict[str, Cost] = {}
    for role, model, calls, inp, out, read, write in usage_rows:
        price = prices.price(model)
        part = Cost(tokens=inp + out + read + write, calls=calls,
                    usd=price.cost(inp, out, read, write) if price else 0.0,
                    unpriced_models=[] if price or not (inp + out + read + write)
                    else [model or "(unknown model)"])
        by_role[role] = by_role[role] + part if role in by_role else part
    for role, tokens, usd in billed_rows:
        part = Cost(possibly_billed_calls=1, possibly_billed_tokens=tokens,
                    possibly_billed_usd=usd or 0.0)
        by_role[role] = by_role[role] + part if role in by_role else part
    total = Cost()
    for cost in by_role.values():
        total = total + cost
    return SpecCost(total=total, by_role=by_role)


# --- the estimate a budget is checked against ---------------------------------------------

BYTES_PER_TOKEN = 3  # conservative: Claude averages nearer 4 characters of English per token


def estimate_input_tokens(system: Any, tools: Any, messages: Any) -> int:
    """A request's input tokens, estimated from its size: its JSON bytes / 3. No network call
    (count_tokens would cost a round trip per model call), and on the high side: Claude's
    tokenizer averages about 3.5-4 bytes per token on English and code."""
    size = len(json.dumps([system, tools, messages], ensure_ascii=False).encode("utf-8"))
    return math.ceil(size / BYTES_PER_TOKEN)


def estimate_call(price: Price | None, input_tokens: int, max_tokens: int) -> tuple[int, float | None]:
    """(tokens, USD) one call may cost at most: every input token at the dearer of the input
    and cache-write prices (relay marks cache breakpoints, so input may be written to the
    cache), and max_tokens of output at the output price. USD is None for an unpriced model."""
    tokens = input_tokens + max_tokens
    if price is None:
        return tokens, None
    return tokens, (input_tokens * max(price.input, price.cache_write)
                    + max_tokens * price.output) / MILLION
