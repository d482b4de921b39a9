"""gateway_tenant_spend_usd follows the UTC day and month, also for a tenant gone quiet.

The gauge is set from Redis's answer to a tenant's request. Without the rollover a tenant that spent
95% of its day budget yesterday and sends nothing today kept showing 95% (and its budget alerts
firing) all day. The clock is the one thing injected: the scrape happens "after midnight".
"""

from __future__ import annotations

import asyncio
import calendar

from gateway.metrics import GatewayMetrics, TenantSpend
from tests.conftest import metric_value

SPEND = "gateway_tenant_spend_usd"


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scrape(m: GatewayMetrics, **labels: str) -> float:
    return metric_value(m.render().decode(), SPEND, **labels)


def test_spend_of_a_quiet_tenant_reads_zero_after_the_utc_day_and_month_roll_over() -> None:
    m = GatewayMetrics({"m1"}, {"m1-a"})
    clock = Clock(calendar.timegm((2026, 1, 31, 23, 59, 50)))  # 10 s before a new day and a new month
    m.spend.clock = clock
    m.spend.seen("quiet", "day", 9.5)
    m.spend.seen("quiet", "month", 40.0)
    m.spend.seen("busy", "day", 1.0)
    assert scrape(m, tenant="quiet", period="day") == 9.5
    assert scrape(m, tenant="quiet", period="month") == 40.0

    clock.t += 9  # 23:59:59: still the same day
    assert scrape(m, tenant="quiet", period="day") == 9.5

    clock.t += 2  # 00:00:01 on 1 February: a new day and a new month; nobody sent a request
    assert scrape(m, tenant="quiet", period="day") == 0
    assert scrape(m, tenant="quiet", period="month") == 0
    assert scrape(m, tenant="busy", period="day") == 0

    m.spend.seen("busy", "day", 0.25)  # the first request of the new day: Redis's figure for today
    assert scrape(m, tenant="busy", period="day") == 0.25
    assert scrape(m, tenant="quiet", period="day") == 0


def test_a_new_day_inside_the_month_keeps_the_month_spend() -> None:
    m = GatewayMetrics({"m1"}, {"m1-a"})
    clock = Clock(calendar.timegm((2026, 3, 14, 23, 0, 0)))
    m.spend.clock = clock
    m.spend.seen("t", "day", 3.0)
    m.spend.seen("t", "month", 30.0)
    clock.t += 3600.5  # 00:00:00.5 on 15 March
    assert scrape(m, tenant="t", period="day") == 0
    assert scrape(m, tenant="t", period="month") == 30.0


async def test_every_worker_rolls_its_own_figures_without_a_scrape() -> None:
    """In multiprocess mode a scrape renders the other workers' files: each worker rolls on a timer too."""
    m = GatewayMetrics({"m1"}, {"m1-a"})
    clock = Clock(calendar.timegm((2026, 5, 5, 23, 59, 59)))
    spend = TenantSpend(m.tenant_spend, clock)
    spend.ROLL_EVERY_S = 0.01
    spend.seen("t", "day", 5.0)
    clock.t += 2
    task = asyncio.create_task(spend.keep_rolled())
    try:
        await asyncio.sleep(0.1)
    finally:
        task.cancel()
    assert m.registry.get_sample_value(SPEND, {"tenant": "t", "period": "day"}) == 0
