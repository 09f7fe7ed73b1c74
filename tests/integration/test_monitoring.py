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


def test_a_figure_scraped_from_the_exporter_and_a_lagging_gateway_counts_once(tmp_path):
    """The exporter saw a batch at 60 of 100 lines and a server ready; the gateway still holds
    the push before (10 of 100, wedged). Each panel reads one source: 100 lines, one server."""
    series = {
        'llamacpp_batch_lines{job="exporter",batch="b",shard="",outcome="succeeded"}': 60,
        'llamacpp_batch_lines{job="exporter",batch="b",shard="",outcome="pending"}': 40,
        'llamacpp_batch_lines{job="llamacpp_batch",batch="b",shard="",outcome="succeeded"}': 10,
        'llamacpp_batch_lines{job="llamacpp_batch",batch="b",shard="",outcome="pending"}': 90,
        'llamacpp_server_state{job="exporter",server="g",model="m",state="ready"}': 1,
        'llamacpp_server_state{job="exporter",server="g",model="m",state="wedged"}': 0,
        'llamacpp_server_state{job="llamacpp_health",server="g",model="m",state="ready"}': 0,
        'llamacpp_server_state{job="llamacpp_health",server="g",model="m",state="wedged"}': 1,
    }
    (servers_by_state,) = dashboard.FLEET[0][1]
    (lines_by_outcome,) = dashboard.BATCHES[0][1]
    tests = []
    for fleet, batch, state in (
        ("exporter", "exporter", "ready"),
        ("llamacpp_health", "llamacpp_batch", "wedged"),
    ):
        for expr, want in ((servers_by_state[0], {state: 1}), (lines_by_outcome[0], None)):
            query = (
                expr.replace("$server", ".*")
                .replace("$fleet_source", fleet)
                .replace("$batch_source", batch)
            )
            if want is None:  # the batch's lines add up to its 100, whichever source
                query, samples = f"sum({query})", [{"labels": "{}", "value": 100}]
            else:
                samples = [
                    {"labels": f'{{state="{name}"}}', "value": value}
                    for name, value in want.items()
                ]
                samples.append(
                    {
                        "labels": '{state="ready"}' if state == "wedged" else '{state="wedged"}',
                        "value": 0,
                    }
                )
            tests.append({"expr": query, "eval_time": "0m", "exp_samples": samples})
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": str(v)} for name, v in series.items()],
                "promql_expr_test": tests,
            }
        ],
    }
    (tmp_path / "dedup.test.yml").write_text(json.dumps(spec))  # JSON is YAML
    tested = subprocess.run(
        [shutil.which("promtool") or "promtool", "test", "rules", "dedup.test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
