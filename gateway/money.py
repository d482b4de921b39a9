"""Exact money: amounts are integers of pico-USD (1e-12 USD), so sums over millions of records add up exactly.

A price per 1M tokens in USD is a price per token in micro-USD, so one token at `p` USD per 1M costs
`p * 1e6` pico-USD: an exact integer for any price with up to six decimals (config rejects finer prices).
Floats appear only at the edges (config input, display in headers and metrics).
"""

from __future__ import annotations

from decimal import Decimal

PICO = 10**12  # pico-USD per USD
PER_TOKEN_PER_1M = 10**6  # pico-USD per token for a price of 1 USD per 1M tokens


def to_pico(usd: float | Decimal | str) -> int:
    """USD (as written in config or a query) to the nearest pico-USD, through its decimal text (no binary drift)."""
    return int((Decimal(str(usd)) * PICO).to_integral_value())


def per_token_pico(usd_per_1m: float) -> int:
    """A price per 1M tokens as pico-USD per token; exact for prices with up to six decimals."""
    return int((Decimal(str(usd_per_1m)) * PER_TOKEN_PER_1M).to_integral_value())


def exact_per_token(usd_per_1m: float) -> bool:
    d = Decimal(str(usd_per_1m)) * PER_TOKEN_PER_1M
    return d == d.to_integral_value()


def usd(pico: int) -> float:
    """For display and float-only sinks (Prometheus): the nearest float to the exact amount."""
    return pico / PICO


def usd_text(pico: int) -> str:
    """Exact decimal text of an amount, e.g. 3100000 -> '0.0000031'."""
    d = Decimal(pico) / PICO
    return format(d.normalize(), "f") if pico else "0"
