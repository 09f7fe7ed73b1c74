"""The Grafana dashboard of a llama.cpp fleet, as code (Grafana's own foundation SDK: its types
are generated from Grafana's dashboard schema). Writes `monitoring/grafana/llamacpp-fleet.json`:

    uv run python -m monitoring.dashboard          # after changing a panel; a test compares

Every query reads the metrics of `prefect_llamacpp/metrics.py` (the exporter's and the
Pushgateway's); `PANEL_QUERIES` lists them for the test that runs each against a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.common import StackingConfig, VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    DatasourceVariable,
    QueryVariable,
    Row,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.statetimeline import Panel as StateTimeline
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, GridPos, VariableRefresh

PATH = Path(__file__).parent / "grafana" / "llamacpp-fleet.json"
UID = "llamacpp-fleet"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# One source at a time: the exporter and a Pushgateway may both be scraped, and the same
# figure from both (one lagging) must never be added up or mixed. A source is a `job`: the
# exporter's scrape job, or the job a flow pushed as (llamacpp_health, llamacpp_batch).
SERVERS = 'server=~"$server",job="$fleet_source"'
BATCH = '{job="$batch_source"}'
# One series per server (or batch shard) before adding up: replicas of one exporter agree.
ONE = "max by "

# (title, [(expr, legend)], unit, kind): the panels, row by row.
FLEET = [
    (
        "Servers by state",
        [
            (
                f"sum by (state) ({ONE}(server, state) (llamacpp_server_state{{{SERVERS}}}))",
                "{{state}}",
            )
        ],
        "short",
        "stacked",
    ),
    (
        "State per server (1 ready, 2 busy, 3 sleeping, 4 loading, 5 wedged, 6 down)",
        [
            (
                "max by (server) ("
                f'llamacpp_server_state{{{SERVERS},state="ready"}} * 1'
                f' or llamacpp_server_state{{{SERVERS},state="busy"}} * 2'
                f' or llamacpp_server_state{{{SERVERS},state="sleeping"}} * 3'
                f' or llamacpp_server_state{{{SERVERS},state="loading"}} * 4'
                f' or llamacpp_server_state{{{SERVERS},state="wedged"}} * 5'
                f' or llamacpp_server_state{{{SERVERS},state=~"unreachable|unauthorized|error"}}'
                " * 6) > 0",
                "{{server}}",
            )
        ],
        "short",
        "timeline",
    ),
    (
        "Canary time to first byte (p50, p95, p99)",
        [
            (
                f"histogram_quantile({q}, sum by (server, le) "
                f"(rate(llamacpp_canary_first_byte_seconds_bucket{{{SERVERS}}}[$__rate_interval])))",
                f"{{{{server}}}} p{int(q * 100)}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        "s",
        "lines",
    ),
    (
        "Canary total time (p95)",
        [
            (
                "histogram_quantile(0.95, sum by (server, le) "
                f"(rate(llamacpp_canary_duration_seconds_bucket{{{SERVERS}}}[$__rate_interval])))",
                "{{server}}",
            )
        ],
        "s",
        "lines",
    ),
    (
        "Slots busy / total",
        [
            (f"{ONE}(server) (llamacpp_server_slots_busy{{{SERVERS}}})", "{{server}} busy"),
            (f"{ONE}(server) (llamacpp_server_slots{{{SERVERS}}})", "{{server}} total"),
        ],
        "short",
        "lines",
    ),
    (
        "Generation tokens/s (server average)",
        [
            (
                f"{ONE}(server, model) (llamacpp_server_generation_tokens_per_second{{{SERVERS}}})",
                "{{server}} {{model}}",
            )
        ],
        "short",
        "lines",
    ),
    (
        "Seconds since the last health check",
        [
            (
                f"time() - {ONE}(server) "
                f"(llamacpp_health_last_check_timestamp_seconds{{{SERVERS}}})",
                "{{server}}",
            )
        ],
        "s",
        "stat",
    ),
]
BATCHES = [
    (
        "Batch lines by outcome",
        [
            (
                f"sum by (batch, outcome) ({ONE}(batch, shard, outcome) (llamacpp_batch_lines{BATCH}))",
                "{{batch}} {{outcome}}",
            )
        ],
        "short",
        "stacked",
    ),
    (
        "Failed lines by kind",
        [
            (
                f"sum by (batch, kind) ({ONE}(batch, shard, kind) (llamacpp_batch_failed_lines{BATCH}))",
                "{{batch}} {{kind}}",
            )
        ],
        "short",
        "stacked",
    ),
    (
        "Requests in flight, servers in and out of rotation",
        [
            (
                f"sum by (batch) ({ONE}(batch, shard) (llamacpp_batch_requests_in_flight{BATCH}))",
                "{{batch}} in flight",
            ),
            (
                f"sum by (batch) ({ONE}(batch, shard) (llamacpp_batch_servers_in_rotation{BATCH}))",
                "{{batch}} servers in",
            ),
            (
                f"sum by (batch) ({ONE}(batch, shard) (llamacpp_batch_servers_out_of_rotation{BATCH}))",
                "{{batch}} servers out",
            ),
        ],
        "short",
        "lines",
    ),
    (
        "Batch completion tokens/s",
        [
            (
                f"sum by (batch) ({ONE}(batch, shard) (llamacpp_batch_completion_tokens_per_second{BATCH}))",
                "{{batch}}",
            )
        ],
        "short",
        "lines",
    ),
]
PANEL_QUERIES: list[str] = [expr for _, queries, _, _ in FLEET + BATCHES for expr, _ in queries]


def _panel(title: str, queries: list[tuple[str, str]], unit: str, kind: str, pos: GridPos):
    if kind == "timeline":
        panel = StateTimeline()
    elif kind == "stat":
        panel = Stat()
    else:
        panel = Timeseries().legend(
            VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        if kind == "stacked":
            panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    panel = panel.title(title).unit(unit).datasource(DATASOURCE).grid_pos(pos)
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(
            Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE)
        )
    return panel


def _source(name: str, label: str, metric: str) -> QueryVariable:
    """A single-choice variable of the scrape jobs that have `metric`: the exporter's job, or
    the job a flow pushed as."""
    return (
        QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, job)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .multi(False)
        .include_all(False)
    )


def build() -> dict:
    dashboard = (
        Dashboard("llama.cpp fleet")
        .uid(UID)
        .description(
            "Health of llama.cpp servers (prefect-llamacpp health flow: state, canary latency, "
            "slots) and the batch runs through them."
        )
        .tags(["llama.cpp", "prefect-llamacpp"])
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
        .with_variable(_source("fleet_source", "Fleet source", "llamacpp_server_state"))
        .with_variable(_source("batch_source", "Batch source", "llamacpp_batch_lines"))
        .with_variable(
            QueryVariable("server")
            .label("Server")
            .datasource(DATASOURCE)
            .query("label_values(llamacpp_server_state, server)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
        )
    )
    y, ids = 0, iter(range(1, 100))  # Grafana wants each panel's id unique
    for title, panels in (("Fleet", FLEET), ("Batches", BATCHES)):
        row = Row(title).id(next(ids)).grid_pos(GridPos(h=1, w=24, x=0, y=y))
        dashboard = dashboard.with_row(row)
        y += 1
        for index, (name, queries, unit, kind) in enumerate(panels):
            pos = GridPos(h=8, w=12, x=12 * (index % 2), y=y + 8 * (index // 2))
            panel = _panel(name, queries, unit, kind, pos).id(next(ids))
            dashboard = dashboard.with_panel(panel)
        y += 8 * ((len(panels) + 1) // 2)
    return json.loads(JSONEncoder(sort_keys=True).encode(dashboard.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    PATH.parent.mkdir(parents=True, exist_ok=True)
    PATH.write_text(render())
    print(f"wrote {PATH}", file=sys.stderr)
