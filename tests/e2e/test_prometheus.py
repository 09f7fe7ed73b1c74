"""Metrics where operators look, end to end: a real Prometheus (Debian's) scrapes the
`llamacpp-exporter` (fed by a real `prefect server start`'s event stream) and a real
Pushgateway, while the health flow checks three real llama-servers (one ready, one busy with a
long generation, one wedged behind a stalling proxy) and a batch runs, each as a process of its
own as a deployment would run them. Prometheus's HTTP API is then asked what it saw: the right
state per server, canary histogram counts equal to the canaries answered, the batch's lines,
the alert rules loaded and the wedged one pending, and every dashboard panel's query answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode
from uuid import uuid4

import httpx
import pytest
from prefect.artifacts import Artifact
from prometheus_client.parser import text_string_to_metric_families

from harness.browser import CHROMIUM_ARGS, INSTALL_HINT, find_chromium
from harness.prefect_server import prefect_server as start_prefect_server
from harness.prefect_server import talking_to
from harness.prometheus import prometheus, pushgateway
from harness.server import free_port
from monitoring.dashboard import PANEL_QUERIES
from prefect_llamacpp.blocks import LlamaCppServer
from tests.servers import long_generation
from tests.stalling_proxy import StallingProxy

# Its own waits add up past the default 300 s on a loaded machine (set-up included).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "monitoring" / "prometheus" / "llamacpp-alerts.yml"
CHECKS = 3  # health runs over the fleet
LINES = 20


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    with start_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server.api


def env_for(api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_exporter(api: str, log: Path, connected: bool = True) -> tuple[subprocess.Popen, str]:
    """The exporter, reading `api`'s events; with `connected`, once it says it is subscribed."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect_llamacpp.flows.exporter", "--port", str(port)],
        cwd=REPO,
        env=env_for(api),
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),
        text=True,
    )
    if connected:
        line = process.stdout.readline()  # printed once subscribed to the events
        assert "serving" in line, f"the exporter did not start: {line!r}; see {log}"
    return process, f"http://127.0.0.1:{port}"


async def run(api: str, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO,
        env=env_for(api),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 240)
    return process.returncode, out.decode(errors="replace")


def eventually(what: str, fetch, want, timeout: float = 60):
    """Poll `fetch()` until it returns `want`; fail with what it returned last."""
    deadline = time.monotonic() + timeout
    while (found := fetch()) != want:
        assert time.monotonic() < deadline, f"{what}: want {want!r}, last seen {found!r}"
        time.sleep(0.5)


async def test_prometheus_sees_each_servers_state_the_canaries_and_the_batch(
    prefect_api, server, busy_server, tmp_path
):
    with (
        pushgateway(tmp_path) as gateway,
        StallingProxy(server.url) as wedged,
    ):
        exporter, exporter_url = start_exporter(prefect_api, tmp_path / "exporter.log")
        try:
            with prometheus(tmp_path, [exporter_url, gateway], rules=RULES) as prom:
                with talking_to(prefect_api):
                    for name, base in (
                        ("e2e-ready", server.openai_base),
                        ("e2e-busy", busy_server.openai_base),
                        ("e2e-wedged", f"{wedged.url}/v1"),
                    ):
                        await LlamaCppServer(base_url=base, timeout=5).save(name, overwrite=True)

                # Some generation first: the server's tokens/s (from its /metrics) is measured
                # only once it has spent 10 ms generating.
                async with httpx.AsyncClient(timeout=60) as http:
                    answer = await http.post(
                        f"{server.openai_base}/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": "Go on."}],
                            "max_tokens": 600,
                            "ignore_eos": True,
                        },
                    )
                    answer.raise_for_status()

                for _ in range(CHECKS):
                    async with long_generation(busy_server):
                        code, out = await run(
                            prefect_api,
                            "-m",
                            "flows.health",
                            "e2e-ready",
                            "e2e-busy",
                            "e2e-wedged",
                            # The ready server answers well within it even on a loaded
                            # machine; the busy one's slot is held far longer.
                            "--first-byte-timeout",
                            "3",
                            "--total-timeout",
                            "8",
                            "--pushgateway",
                            gateway,
                        )
                    assert code == 1, out  # not every server is ready: the run says so
                    await asyncio.sleep(
                        2
                    )  # checks a few scrapes apart, as a schedule would space them

                # The fleet artifact charts each server's first byte over its checks, read
                # back from the events of the runs before (a gap where there was no answer).
                with talking_to(prefect_api):
                    fleet = await Artifact.aget("llamacpp-health-fleet")
                rows = {row.split("|")[1].strip(): row for row in fleet.data.splitlines()[4:]}
                chart = re.search(r"`([▁▂▃▄▅▆▇█·]+)` \d+ ms to \d+ ms", rows["e2e-ready"])
                assert chart and len(chart.group(1)) == CHECKS, fleet.data
                assert "·" not in chart.group(1), fleet.data  # each check had its first byte
                assert "| - |" in rows["e2e-wedged"], fleet.data  # never a first byte: no chart

                inputs = tmp_path / "in.jsonl"
                inputs.write_text(
                    "".join(
                        json.dumps({"custom_id": f"p{i}", "prompt": f"Say {i}"}) + "\n"
                        for i in range(LINES)
                    )
                    + "not json\n"  # one line fails, as some do: counted by kind
                )
                code, out = await run(
                    prefect_api,
                    "-m",
                    "flows.batch",
                    str(inputs),
                    str(tmp_path / "out.jsonl"),
                    "--server",
                    "e2e-ready",
                    "--max-tokens",
                    "4",
                    "--metrics-name",
                    "e2e-batch",
                    "--pushgateway",
                    gateway,
                )
                assert code == 0, out

                expected = {"e2e-ready": "ready", "e2e-busy": "busy", "e2e-wedged": "wedged"}
                for job in ("llamacpp", "llamacpp_health"):  # the exporter's, the gateway's
                    eventually(
                        f"the states {job} reports",
                        lambda job=job: {
                            row["metric"]["server"]: row["metric"]["state"]
                            for row in prom.query(f'llamacpp_server_state{{job="{job}"}} == 1')
                        },
                        expected,
                    )
                # Every check counted; one canary observation per answered canary (ready only:
                # the busy and wedged servers' canaries had no first byte in time).
                eventually(
                    "checks counted",
                    lambda: prom.values('llamacpp_health_checks_total{job="llamacpp"}', "server"),
                    dict.fromkeys(expected, float(CHECKS)),
                )
                counts = prom.values(
                    'llamacpp_canary_first_byte_seconds_count{job="llamacpp"}', "server"
                )
                assert counts == {"e2e-ready": CHECKS}
                assert prom.values(
                    'llamacpp_canary_first_byte_seconds_bucket{job="llamacpp",le="+Inf"}', "server"
                ) == {"e2e-ready": CHECKS}
                # A Pushgateway holds gauges only: no histogram pushed by a short run.
                assert not prom.query('llamacpp_canary_first_byte_seconds_count{job!="llamacpp"}')
                busy = prom.values('llamacpp_server_slots_busy{job="llamacpp"}', "server")
                assert busy["e2e-busy"] == 1

                for job in ("llamacpp", "llamacpp_batch"):
                    eventually(
                        f"the batch's lines from {job}",
                        lambda job=job: prom.values(
                            f'llamacpp_batch_lines{{job="{job}",batch="e2e-batch"}}', "outcome"
                        ),
                        {"succeeded": LINES, "failed": 1, "done_earlier": 0, "pending": 0},
                    )
                    kinds = prom.values(f'llamacpp_batch_failed_lines{{job="{job}"}}', "kind")
                    assert kinds == {"invalid_json": 1}
                    finished = prom.values(f'llamacpp_batch_finished{{job="{job}"}}', "batch")
                    assert finished == {"e2e-batch": 1}

                # The alert rules are loaded and evaluated: the wedged server's alert waits out
                # its 5 minutes (pending), the unhealthy rule does not fire for busy or wedged.
                eventually(
                    "the wedged alert pending",
                    lambda: prom.values(
                        'ALERTS{alertname="LlamaCppServerWedged",alertstate="pending"}', "server"
                    ),
                    {"e2e-wedged": 1.0},
                )
                assert not prom.query('ALERTS{alertname="LlamaCppServerUnhealthy"}')

                # Every panel of the dashboard has data, from the exporter as its source.
                for expr in PANEL_QUERIES:
                    query = concrete(expr, "2m")
                    assert prom.query(query), f"no data for the panel query {query}"
                # What an operator sees: Prometheus's own graph of two of the dashboard's
                # queries in headless Chromium (no Grafana is packaged for this machine).
                shots = await asyncio.to_thread(screenshot, prom.url, tmp_path)
                for path, legend in shots:
                    assert path.stat().st_size > 10_000 and "e2e-ready" in legend, legend
        finally:
            exporter.terminate()
            exporter.wait(10)


def concrete(expr: str, rate_interval: str) -> str:
    """A panel's query as Grafana would send it: every server, the exporter's job as the source."""
    for variable, value in (
        ("$server", ".*"),
        ("$fleet_source", "llamacpp"),
        ("$batch_source", "llamacpp"),
        ("$__rate_interval", rate_interval),
    ):
        expr = expr.replace(variable, value)
    return expr


def screenshot(prometheus_url: str, folder: Path) -> list[tuple[Path, str]]:
    """(PNG, legend text) of Prometheus's graph page for the fleet-state and canary panels."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    assert executable, INSTALL_HINT
    queries = {
        "fleet-state": "llamacpp_server_state == 1",
        "canary-first-byte": concrete(PANEL_QUERIES[2], "1m"),
    }
    shots = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        for name, expr in queries.items():
            url = f"{prometheus_url}/graph?" + urlencode(
                {"g0.expr": expr, "g0.tab": "0", "g0.range_input": "5m"}
            )
            page.goto(url)
            legend = page.locator(".rickshaw_legend").first  # Debian's 2.42 UI
            legend.wait_for(timeout=30_000)
            path = folder / f"prometheus-{name}.png"
            page.screenshot(path=path, full_page=True)
            shots.append((path, legend.inner_text()))
        browser.close()
    return shots


def event(name: str, server: str, payload: dict, occurred: datetime | None = None) -> dict:
    return {
        "id": str(uuid4()),
        "occurred": (occurred or datetime.now(UTC)).isoformat(),
        "event": name,
        "resource": {"prefect.resource.id": f"llamacpp.server.{server}"},
        "payload": payload,
    }


def test_the_exporter_waits_for_the_prefect_api_and_survives_poison_events(tmp_path):
    """Started before its Prefect server, the exporter serves, says it waits, and connects
    when the server comes; events that are malformed, hostile or dated in the future are read
    as nothing (or as now) and it goes on serving the good ones."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "exporter.log"
    exporter, exporter_url = start_exporter(api, log, connected=False)
    metrics_url = f"{exporter_url}/metrics"
    try:
        eventually(
            "the exporter says it waits for the API",
            lambda: "trying again" in log.read_text(),
            True,
        )
        assert exporter.poll() is None and "Traceback" not in log.read_text()
        with start_prefect_server(tmp_path / "late-prefect", port=port):
            assert "serving" in exporter.stdout.readline()
            future = datetime(2100, 1, 1, tzinfo=UTC)
            poison = [
                event("llamacpp.server.ready", "p1", {"model_id": 5, "total_slots": -4}),
                event("llamacpp.server.busy", "p2", {"latency": {"ttfb_s": 1e308}}),
                event("llamacpp.server.ready", "p3", {"latency": "fast", "model_id": "x" * 500}),
                event("llamacpp.batch.progress", "b", {"failed": ["x"], "lines": "many"}),
                event("llamacpp.server.wedged", "p4", {}, occurred=future),
            ]
            response = httpx.post(f"{api}/events", json=poison, timeout=10)
            assert response.status_code < 300, response.text
            eventually("p1 read", lambda: 'server="p1"' in httpx.get(metrics_url).text, True)
            # The next check, a moment later: it must not be masked by the one dated 2100.
            good = event("llamacpp.server.ready", "p4", {"model_id": "qwen", "total_slots": 4})
            response = httpx.post(f"{api}/events", json=[good], timeout=10)
            assert response.status_code < 300, response.text

            def state_of_p4() -> str | None:
                text = httpx.get(metrics_url, timeout=5).text
                for family in text_string_to_metric_families(text):
                    for sample in family.samples:
                        labels = sample.labels
                        if sample.name == "llamacpp_server_state" and sample.value == 1:
                            if labels["server"] == "p4":
                                return labels["state"]
                return None

            # The wedged report dated 2100 is taken as now; the ready one after it wins.
            eventually("p4's state", state_of_p4, "ready")
            text = httpx.get(metrics_url, timeout=5).text
            assert 'server="p1"' in text and 'server="p3"' in text
            assert "x" * 121 not in text
            assert exporter.poll() is None and "Traceback" not in log.read_text()
    finally:
        exporter.terminate()
        exporter.wait(10)
