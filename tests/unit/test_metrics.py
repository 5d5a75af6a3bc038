"""record_metric accumulates per process; the controller merges with each metric's reduce."""

import json

import pytest

from forge.observability import drain_local_metrics, merge_metrics, record_metric
from forge.observability.logger import RunLogger, plot_curves


def test_metrics_from_several_processes_reduce_as_declared():
    drain_local_metrics()
    for value in (1.0, 0.0, 0.0):
        record_metric("reward/mean", value, "mean")
    record_metric("tokens", 10, "sum")
    record_metric("peak", 3, "max")
    first = drain_local_metrics()
    assert drain_local_metrics() == {}  # drained means reset
    record_metric("reward/mean", 1.0, "mean")
    record_metric("tokens", 5, "sum")
    record_metric("peak", 7, "max")
    second = drain_local_metrics()
    merged = merge_metrics([first, second])
    assert merged == {"peak": 7.0, "reward/mean": 0.5, "tokens": 15.0}


def test_unknown_reduce_is_refused():
    with pytest.raises(ValueError, match="reduce"):
        record_metric("x", 1, "median")


def test_run_logger_writes_jsonl_and_the_plot(tmp_path):
    log = RunLogger(tmp_path, ["jsonl"], total_steps=3, log_every=1)
    for step in (1, 2, 3):
        log.log(step, {"reward/mean": step / 3, **({"eval/accuracy": 0.5} if step == 2 else {})})
    log.close()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert plot_curves(log.history, tmp_path / "curves.png").stat().st_size > 1000
