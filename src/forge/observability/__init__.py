"""Metrics from any actor, aggregated per step on the controller, written to backends."""

from forge.observability.metrics import (
    MetricAccumulator,
    Reduce,
    drain_local_metrics,
    merge_metrics,
    record_metric,
)

__all__ = ["MetricAccumulator", "Reduce", "drain_local_metrics", "merge_metrics", "record_metric"]
