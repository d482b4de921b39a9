"""The generated dashboards against Grafana's own typed schema (grafana-foundation-sdk).

Each dashboard is loaded into the SDK's models and written back; a field that does not survive the
round trip is not part of Grafana's dashboard schema (a typo, a field of another panel type, an
option of an old Grafana version), so the dashboard would not behave as written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from grafana_foundation_sdk.cog import encoder
from grafana_foundation_sdk.models import dashboard

DASHBOARDS = sorted((Path(__file__).resolve().parent.parent / "dashboards").glob("*.json"))
# Known to Grafana's query-variable editor (it shows the query) but absent from the SDK's variable model.
OUTSIDE_SDK = {"/templating/list[]/definition"}


def _paths(value: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            out.add(f"{prefix}/{k}")
            out |= _paths(v, f"{prefix}/{k}")
    elif isinstance(value, list):
        for v in value:
            out |= _paths(v, prefix + "[]")
    return out


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_field_is_in_grafanas_schema(path: Path) -> None:
    raw = json.loads(path.read_text())
    typed = dashboard.Dashboard.from_json(raw)
    assert typed.panels, "no panels"
    back = json.loads(json.dumps(typed, cls=encoder.JSONEncoder))
    assert _paths(raw) - _paths(back) <= OUTSIDE_SDK


def test_a_misspelt_field_is_caught() -> None:
    raw = json.loads(DASHBOARDS[0].read_text())
    raw["panels"][0]["fieldConfg"] = raw["panels"][0].get("fieldConfig", {})
    back = json.loads(json.dumps(dashboard.Dashboard.from_json(raw), cls=encoder.JSONEncoder))
    assert "/panels[]/fieldConfg" in _paths(raw) - _paths(back)
