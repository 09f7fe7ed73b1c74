"""A real Prometheus and Pushgateway on 127.0.0.1 for the tests: Debian's packages
(`prometheus`, `prometheus-pushgateway`, installed by `make setup`), each in a process of its own
with its data in a temporary directory, scraping every second.

    with pushgateway(log_dir) as gateway, prometheus(log_dir, [exporter, gateway]) as prom:
        prom.query('llamacpp_server_state{state="ready"}')
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from harness.server import free_port

SCRAPE_INTERVAL_S = 1
INSTALL_HINT = "apt-get install prometheus prometheus-pushgateway (make setup does it)"


def _binary(name: str, env: str) -> str:
    found = os.environ.get(env) or shutil.which(name) or shutil.which(name, path="/usr/bin")
    if not found:
        raise FileNotFoundError(f"no {name} binary: {INSTALL_HINT}, or set {env}")
    return found


@contextmanager
def _process(cmd: list[str], log_path: Path, ready_url: str, what: str) -> Iterator[None]:
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(ready_url, timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, f"{what} exited; see {log_path}"
                assert time.monotonic() < deadline, f"{what} was not ready in 60 s; see {log_path}"
                time.sleep(0.2)
            yield
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@contextmanager
def pushgateway(log_dir: Path) -> Iterator[str]:
    """The URL of a Pushgateway started for the block (http://127.0.0.1:PORT)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        _binary("prometheus-pushgateway", "PUSHGATEWAY_BIN"),
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with _process(cmd, log_dir / "pushgateway.log", f"{url}/-/ready", "the Pushgateway"):
        yield url


@dataclass
class Prometheus:
    url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (each: {"metric": {...}, "value": [t, "v"]})."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expr: str, by: str) -> dict[str, float]:
        """{label `by`: value} of an instant query."""
        return {row["metric"].get(by, ""): float(row["value"][1]) for row in self.query(expr)}

    def targets_up(self) -> dict[str, str]:
        """{scrape URL: health} of the active targets."""
        answer = httpx.get(f"{self.url}/api/v1/targets", timeout=10).json()
        return {t["scrapeUrl"]: t["health"] for t in answer["data"]["activeTargets"]}


@contextmanager
def prometheus(
    log_dir: Path, targets: list[str], rules: Path | None = None
) -> Iterator[Prometheus]:
    """A Prometheus scraping `targets` (http://host:port) every second; stopped after the
    block. Pushgateway targets keep their pushed labels (honor_labels). `rules`: a rule file
    to load (the repository's alert rules)."""
    port = free_port()
    data = log_dir / "prometheus-data"
    data.mkdir(exist_ok=True)
    hosts = ", ".join(f'"{target.split("://", 1)[1]}"' for target in targets)
    config = log_dir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n"
        f"  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        + (f"rule_files: ['{rules}']\n" if rules else "")
        + "scrape_configs:\n"
        "  - job_name: llamacpp\n"
        "    honor_labels: true\n"
        f"    static_configs: [{{targets: [{hosts}]}}]\n"
    )
    cmd = [
        _binary("prometheus", "PROMETHEUS_BIN"),
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    url = f"http://127.0.0.1:{port}"
    with _process(cmd, log_dir / "prometheus.log", f"{url}/-/ready", "Prometheus"):
        yield Prometheus(url)
