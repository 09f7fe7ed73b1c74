"""The monitoring files as code: the alert rules pass promtool's own check and unit tests, and
the dashboard JSON is what `monitoring/dashboard.py` builds and loads as Grafana's schema types."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel

from harness.prometheus import INSTALL_HINT
from monitoring import dashboard

pytestmark = pytest.mark.integration
RULES = Path(__file__).resolve().parents[2] / "monitoring" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, f"no promtool: {INSTALL_HINT}"
    return subprocess.run([binary, *args], cwd=RULES, capture_output=True, text=True, timeout=120)


def test_the_alert_rules_are_valid_and_fire_when_they_should():
    checked = promtool("check", "rules", "llamacpp-alerts.yml")
    assert checked.returncode == 0 and "SUCCESS: 6 rules found" in checked.stdout, checked
    tested = promtool("test", "rules", "llamacpp-alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_dashboard_json_is_the_one_the_code_builds():
    assert dashboard.PATH.read_text() == dashboard.render(), (
        "monitoring/grafana/llamacpp-fleet.json is stale: run `uv run python -m monitoring.dashboard`"
    )


def test_the_dashboard_loads_as_grafanas_types():
    register_default_plugins()
    loaded = Dashboard.from_json(json.loads(dashboard.PATH.read_text()))
    panels = [panel for panel in loaded.panels if isinstance(panel, Panel)]
    exprs = [target.expr for panel in panels for target in panel.targets or []]
    assert exprs == dashboard.PANEL_QUERIES
    ids = [panel.id_val for panel in loaded.panels]
    assert len(ids) == len(set(ids))
    assert {panel.datasource.uid for panel in panels} == {"${datasource}"}
