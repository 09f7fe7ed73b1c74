"""The one-line charts in the flows' artifacts: first byte over a server's checks, lines
answered per second over a batch run."""

from __future__ import annotations

from prefect_llamacpp.flows.batch import _throughput_row
from prefect_llamacpp.flows.health import first_byte_chart
from prefect_llamacpp.flows.report import BARS, sparkline
from prefect_llamacpp.flows.telemetry import BatchTelemetry
from prefect_llamacpp.metrics import BatchFigures


def test_the_lowest_value_is_the_lowest_bar_and_a_gap_is_shown():
    assert sparkline([0.1, 0.5, None, 0.9]) == "▁▅·█"
    assert sparkline([0.2, 0.2]) == "▄▄"  # flat: neither all low nor all high
    assert sparkline([None, None]) == "" and sparkline([]) == ""
    assert set(sparkline([3, 1, 4, 1, 5, 9, 2, 6])) <= set(BARS)


def test_a_first_byte_chart_needs_two_checks_and_one_answer():
    assert first_byte_chart([0.012, 0.84]) == "`▁█` 12 ms to 840 ms"
    assert first_byte_chart([None, 0.02, None]) == "`·▄·` 20 ms to 20 ms"
    assert first_byte_chart([0.02]) == ""  # one check: nothing to draw over time
    assert first_byte_chart([None, None]) == ""  # never answered: no chart, not a flat line


def test_throughput_is_lines_per_second_in_equal_spans():
    answered = {"now": 0}

    def figures(_ended: bool) -> BatchFigures:
        return BatchFigures(batch="b", succeeded=answered["now"], failed={"timeout": 0})

    telemetry = BatchTelemetry(figures, None)
    start = telemetry._started
    # 10 lines/s for 10 s, nothing for 10 s (a server down), then 30 lines/s for 10 s
    telemetry._answered += [(10.0, 100), (20.0, 100), (30.0, 400)]
    telemetry._started = start - 30.0  # the run began 30 s ago
    answered["now"] = 400
    rates = telemetry.throughput(points=3)
    assert [round(rate) for rate in rates] == [10, 0, 30]
    assert sparkline(rates) == "▃▁█"


def test_a_short_run_has_at_most_one_point_and_no_chart_row():
    telemetry = BatchTelemetry(lambda _ended: BatchFigures(batch="b", succeeded=5), None)
    assert len(telemetry.throughput()) == 1
    assert _throughput_row(telemetry.throughput()) == []
    (row,) = _throughput_row([1.0, 3.0])
    assert row == ("Lines answered per second over the run", "`▁█` (peak 3, low 1)")
