"""The metrics' names, labels and values (prefect_llamacpp/metrics.py), read back through
prometheus_client's own exposition and parser, as Prometheus would read them."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prefect_llamacpp.batch.records import ERROR_KINDS
from prefect_llamacpp.config import MetricsSettings, check_pushgateway_url
from prefect_llamacpp.exceptions import ConfigurationError
from prefect_llamacpp.flows.telemetry import pushgateway
from prefect_llamacpp.metrics import (
    CANARY_BUCKETS,
    LABEL_CHARS,
    MAX_MEASURE,
    MAX_SERIES,
    STATES,
    BatchFigures,
    FleetMetrics,
    ServerCheck,
    label,
)


def samples(metrics: FleetMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def report(state: str, ttfb: float | None = None, total: float | None = None, **extra) -> dict:
    return {
        "state": state,
        "model_id": "qwen",
        "total_slots": 4,
        "busy_slots": 1,
        "latency": {"ttfb_s": ttfb, "total_s": total, "predicted_tokens_per_s": 42.0},
        # what an event also carries, and a metric must never show
        "error": "cannot reach http://admin:hunter2@gpu-1:8080",
        **extra,
    }


def test_state_is_one_hot_and_the_histograms_count_each_canary():
    metrics = FleetMetrics()
    now = time.time()
    for at, ttfb in ((now - 3, 0.02), (now - 2, 0.3), (now - 1, 7.0)):
        metrics.observe_check(ServerCheck.from_report("gpu-1", report("ready", ttfb, ttfb), at))
    metrics.observe_check(ServerCheck.from_report("gpu-2", report("wedged"), now))
    found = samples(metrics)
    for state in STATES:
        assert value(found, "llamacpp_server_state", server="gpu-1", model="qwen", state=state) == (
            state == "ready"
        )
        assert value(found, "llamacpp_server_state", server="gpu-2", model="qwen", state=state) == (
            state == "wedged"
        )
    first = dict(server="gpu-1", model="qwen")
    assert value(found, "llamacpp_canary_first_byte_seconds_count", **first) == 3
    assert value(found, "llamacpp_canary_first_byte_seconds_sum", **first) == pytest.approx(7.32)
    assert value(found, "llamacpp_canary_first_byte_seconds_bucket", **first, le="0.025") == 1
    assert value(found, "llamacpp_canary_first_byte_seconds_bucket", **first, le="0.5") == 2
    assert value(found, "llamacpp_canary_first_byte_seconds_bucket", **first, le="5.0") == 2
    assert value(found, "llamacpp_canary_first_byte_seconds_bucket", **first, le="+Inf") == 3
    assert value(found, "llamacpp_canary_last_first_byte_seconds", **first) == 7.0
    assert value(found, "llamacpp_health_checks_total", server="gpu-1", state="ready") == 3
    assert value(found, "llamacpp_server_slots", **first) == 4
    assert value(found, "llamacpp_server_generation_tokens_per_second", **first) == 42.0
    # A wedged server's canary had no first byte: no observation, not a zero.
    assert (
        "llamacpp_canary_first_byte_seconds_count",
        (("model", "qwen"), ("server", "gpu-2")),
    ) not in found
    assert value(found, "llamacpp_health_last_check_timestamp_seconds", **first) == pytest.approx(
        now - 1
    )


def test_no_url_error_or_key_reaches_a_label_or_value():
    metrics = FleetMetrics()
    metrics.observe_check(ServerCheck.from_report("gpu-1", report("unreachable"), time.time()))
    text = generate_latest(metrics.registry()).decode()
    assert "hunter2" not in text and "http" not in text and "cannot reach" not in text


def test_a_late_older_check_counts_but_does_not_replace_the_newer_state():
    metrics = FleetMetrics()
    now = time.time()
    metrics.observe_check(ServerCheck.from_report("gpu-1", report("ready", 0.1), now))
    metrics.observe_check(ServerCheck.from_report("gpu-1", report("wedged"), now - 60))
    found = samples(metrics)
    assert value(found, "llamacpp_server_state", server="gpu-1", model="qwen", state="ready") == 1
    assert value(found, "llamacpp_health_checks_total", server="gpu-1", state="wedged") == 1


def test_a_new_model_replaces_the_old_series_and_unknown_model_is_empty():
    metrics = FleetMetrics()
    now = time.time()
    metrics.observe_check(ServerCheck.from_report("gpu-1", report("ready", 0.1), now - 1))
    metrics.observe_check(
        ServerCheck.from_report("gpu-1", {"state": "unreachable", "model_id": None}, now)
    )
    found = samples(metrics)
    states = {key for key in found if key[0] == "llamacpp_server_state"}
    assert {dict(labels)["model"] for _, labels in states} == {""}


def test_push_mode_leaves_the_cumulative_series_out():
    metrics = FleetMetrics(histograms=False)
    metrics.observe_check(ServerCheck.from_report("gpu-1", report("ready", 0.1, 0.2), time.time()))
    names = {name for name, _ in samples(metrics)}
    assert "llamacpp_server_state" in names and "llamacpp_canary_last_first_byte_seconds" in names
    assert not any("bucket" in name or name.endswith("_total") for name in names)


def test_servers_and_batches_not_heard_of_are_forgotten():
    metrics = FleetMetrics(forget_after=60)
    now = time.time()
    metrics.observe_check(ServerCheck.from_report("old", report("ready", 0.1), now - 120))
    metrics.observe_check(ServerCheck.from_report("new", report("ready", 0.1), now))
    metrics.observe_batch(BatchFigures(batch="done-long-ago", at=now - 120))
    found = samples(metrics)
    assert not any(dict(labels).get("server") == "old" for _, labels in found)
    assert not any(dict(labels).get("batch") == "done-long-ago" for _, labels in found)
    assert any(dict(labels).get("server") == "new" for _, labels in found)


def test_batch_figures_by_outcome_and_kind_with_unknown_kinds_bounded():
    payload = BatchFigures(
        batch="out.jsonl",
        shard="2/3",
        lines=100,
        succeeded=60,
        failed={"timeout": 3, "invalid_json": 2},
        done_earlier=10,
        in_flight=5,
        servers_in=2,
        servers_out=1,
        completion_tokens=900,
        completion_tokens_per_s=12.5,
    ).payload()
    payload["failed"]["made up by someone"] = 4
    figures = BatchFigures.from_payload(payload, time.time())
    metrics = FleetMetrics()
    metrics.observe_batch(figures)
    found = samples(metrics)
    batch = dict(batch="out.jsonl", shard="2/3")
    assert value(found, "llamacpp_batch_lines", **batch, outcome="succeeded") == 60
    assert value(found, "llamacpp_batch_lines", **batch, outcome="failed") == 9
    assert value(found, "llamacpp_batch_lines", **batch, outcome="done_earlier") == 10
    assert value(found, "llamacpp_batch_lines", **batch, outcome="pending") == 21
    assert value(found, "llamacpp_batch_failed_lines", **batch, kind="other") == 4
    assert value(found, "llamacpp_batch_failed_lines", **batch, kind="timeout") == 3
    assert value(found, "llamacpp_batch_servers_out_of_rotation", **batch) == 1
    assert value(found, "llamacpp_batch_finished", **batch) == 0


def test_names_follow_the_conventions():
    metrics = FleetMetrics()
    metrics.observe_check(ServerCheck.from_report("a", report("ready", 0.1, 0.2), time.time()))
    metrics.observe_batch(BatchFigures(batch="b"))
    text = generate_latest(metrics.registry()).decode()
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("llamacpp_")
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples)
        if family.type == "gauge":
            assert not family.name.endswith("_total")
    assert list(CANARY_BUCKETS) == sorted(CANARY_BUCKETS)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("gateway:9091", "looks like http://host:9091"),
        ("ftp://gw:9091", "looks like http://host:9091"),
        ("http://user:s3cret@gw:9091", "holds credentials"),
        ("http://gw:9091/?x=1", "no ?query"),
        ("http://gw:9091?", "no ?query"),
        ("http://gw:9091#", "no ?query"),
        ("http://gw:99999", "looks like http://host:9091"),
        ("http://gw:port", "looks like http://host:9091"),
        ("http://gw:0", "looks like http://host:9091"),
        ("http://g w:9091", "no spaces"),
        ("http://gw:9091/\x1b[2J", "no spaces or control"),
        ("http://gw:9091/metrics", "without /metrics"),
    ],
)
def test_a_bad_pushgateway_address_names_the_fix_and_never_its_password(monkeypatch, given, says):
    with pytest.raises(ValueError, match=says.replace("?", r"\?")) as refused:
        check_pushgateway_url(given)
    assert "s3cret" not in str(refused.value)
    monkeypatch.setenv("LLAMACPP_PUSHGATEWAY_URL", given)
    with pytest.raises(ValueError) as from_env:
        MetricsSettings()
    assert "s3cret" not in str(from_env.value)


def test_the_pushgateway_setting(monkeypatch):
    monkeypatch.delenv("LLAMACPP_PUSHGATEWAY_URL", raising=False)
    assert MetricsSettings().pushgateway_url == ""
    monkeypatch.setenv("LLAMACPP_PUSHGATEWAY_URL", " http://gw:9091/ ")
    assert MetricsSettings().pushgateway_url == "http://gw:9091"


def test_a_bad_pushgateway_setting_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LLAMACPP_PUSHGATEWAY_URL", "http://user:s3cret@gw:9091")
    with pytest.raises(ConfigurationError) as refused:
        pushgateway(None)
    message = str(refused.value)
    assert message.startswith("LLAMACPP_PUSHGATEWAY_URL: ") and "\n" not in message
    assert "s3cret" not in message
    # Given, it wins over the setting (and "" means no push at all).
    assert pushgateway("http://gw:9091/") == "http://gw:9091"
    assert pushgateway("") is None


# What a hostile or broken event may carry: none of it may break /metrics or the exporter.
POISON_REPORTS = [
    {"model_id": 5},
    {"model_id": ["a"]},
    {"model_id": "x" * 10_000},
    {"model_id": "evil\n# HELP fake"},
    {"total_slots": 10**400},
    {"total_slots": -4, "busy_slots": "2"},
    {"latency": {"ttfb_s": 1e308, "total_s": 10**400}},
    {"latency": {"ttfb_s": -3.0, "total_s": float("nan")}},
    {"latency": "fast"},
    {"latency": ["0.1"]},
    {"state": ["ready"]},
]


@pytest.mark.parametrize("poison", POISON_REPORTS)
def test_a_poison_check_report_reads_as_nothing_and_metrics_still_render(poison):
    metrics = FleetMetrics()
    now = time.time()
    for _ in range(3):  # summed, a huge value would overflow; it is never taken in
        metrics.observe_check(ServerCheck.from_report("gpu-1", {**report("ready"), **poison}, now))
    found = samples(metrics)
    (model,) = {dict(key[1])["model"] for key in found if key[0] == "llamacpp_server_state"}
    assert len(model) <= LABEL_CHARS and "\n" not in model
    for (name, _), number in found.items():
        assert math.isfinite(number) and number >= 0, name
    histogram_sum = [v for (name, _), v in found.items() if name.endswith("_seconds_sum")]
    assert all(total <= 3 * MAX_MEASURE for total in histogram_sum)


@pytest.mark.parametrize(
    "poison",
    [
        {"failed": ["timeout"]},
        {"failed": {"timeout": "3"}},
        {"failed": {"timeout": -5, "http_500": 10**400}},
        {"failed": {("tuple",): 1}},
        {"lines": "12", "succeeded": -1, "in_flight": 10**400},
        {"completion_tokens_per_s": float("inf"), "completion_tokens": 2.5},
        {"batch": {"x": 1}, "shard": 7},
        {"batch": "b" * 10_000},
        {"finished": "no"},
    ],
)
def test_a_poison_batch_payload_reads_as_nothing_and_metrics_still_render(poison):
    good = BatchFigures(batch="nightly", lines=10, succeeded=4, failed={"timeout": 1}).payload()
    figures = BatchFigures.from_payload({**good, **poison}, time.time())
    assert figures.finished in (False, True) and "no" != figures.finished
    metrics = FleetMetrics()
    metrics.observe_batch(figures)
    found = samples(metrics)
    for (name, labels), number in found.items():
        assert math.isfinite(number) and number >= 0, name
        assert all(len(label) <= LABEL_CHARS for _, label in labels)
    assert set(figures.failed) <= {*ERROR_KINDS, "other"}


def test_series_are_capped_and_the_cap_is_said_once(caplog):
    metrics = FleetMetrics()
    now = time.time()
    for index in range(MAX_SERIES + 5):
        metrics.observe_check(ServerCheck(server=f"s{index}", state="ready", at=now))
    assert not metrics.observe_check(ServerCheck(server="one-more", state="ready", at=now))
    assert metrics.observe_check(ServerCheck(server="s0", state="busy", at=now))  # known: kept
    states = {k for k in samples(metrics) if k[0] == "llamacpp_server_slots" or "state" in k[0]}
    servers = {dict(labels)["server"] for _, labels in states}
    assert len(servers) == MAX_SERIES and "one-more" not in servers
    assert sum("held already" in record.message for record in caplog.records) == 1


def test_a_server_changing_models_keeps_one_models_histograms():
    metrics = FleetMetrics()
    now = time.time()
    for index in range(50):
        metrics.observe_check(
            ServerCheck("gpu-1", "ready", model=f"m{index}", at=now + index, ttfb_s=0.1)
        )
    # an outage (no model seen) does not end the current model's histograms
    metrics.observe_check(ServerCheck("gpu-1", "unreachable", at=now + 60))
    found = samples(metrics)
    models = {
        dict(k[1])["model"] for k in found if k[0] == "llamacpp_canary_first_byte_seconds_count"
    }
    assert models == {"m49"}


def test_changed_label_values_stay_apart():
    long_a, long_b = "x" * 200 + "a", "x" * 200 + "b"
    labels = {label(value) for value in (long_a, long_b, "gpu\t1", "gpu\n1", "gpu-1")}
    assert len(labels) == 5 and all(len(value) <= LABEL_CHARS for value in labels)
    assert label("gpu-1") == "gpu-1"  # an ordinary name is left as it is


async def test_a_gateway_that_never_answers_costs_a_bounded_wait():
    """It accepts the connection and says nothing (a trickle would do the same to each
    socket read): the push gives up at its deadline, not at the socket's."""
    import asyncio

    async def silent(reader, writer):
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await FleetMetrics().push_within(0.5, f"http://127.0.0.1:{port}", "job", {"a": "b"})
    assert time.monotonic() - started < 3
    server.close()


@pytest.mark.parametrize(
    "given", ["http://admin:[S3CRET]@gw:9091", "http://[S3CRET@gw:9091", "http://[::1"]
)
def test_a_broken_gateway_address_is_refused_without_quoting_it(given):
    with pytest.raises(ValueError) as refused:
        check_pushgateway_url(given)
    assert "S3CRET" not in str(refused.value) and "Pushgateway address" in str(refused.value)
