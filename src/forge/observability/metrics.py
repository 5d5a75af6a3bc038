"""``record_metric(name, value, reduce)`` from any process, reduced per step on the controller.

Each process accumulates its metrics locally (no message per call). Every Forge actor
has a built-in ``_forge_drain_metrics`` endpoint; once per step the controller drains
every actor and service replica and merges the accumulators with each metric's reduce:
``mean`` (weighted by count), ``sum``, ``max``, ``min`` or ``last``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

Reduce = Literal["mean", "sum", "max", "min", "last"]
_REDUCES = ("mean", "sum", "max", "min", "last")


@dataclass
class MetricAccumulator:
    reduce: str
    total: float = 0.0
    count: int = 0
    maximum: float = float("-inf")
    minimum: float = float("inf")
    last: float = 0.0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1
        self.maximum = max(self.maximum, value)
        self.minimum = min(self.minimum, value)
        self.last = value

    def merge(self, other: "MetricAccumulator") -> None:
        self.total += other.total
        self.count += other.count
        self.maximum = max(self.maximum, other.maximum)
        self.minimum = min(self.minimum, other.minimum)
        self.last = other.last

    def value(self) -> float:
        if self.reduce == "mean":
            return self.total / max(self.count, 1)
        return {"sum": self.total, "max": self.maximum, "min": self.minimum, "last": self.last}[self.reduce]


_lock = threading.Lock()
_local: dict[str, MetricAccumulator] = {}


def record_metric(name: str, value: float, reduce: Reduce = "mean") -> None:
    """Record ``value`` for ``name`` in this process; reduced across processes per step."""
    if reduce not in _REDUCES:
        raise ValueError(f"record_metric reduce {reduce!r} is not one of {_REDUCES}")
    with _lock:
        acc = _local.get(name)
        if acc is None:
            acc = _local[name] = MetricAccumulator(reduce)
        acc.add(float(value))


def drain_local_metrics() -> dict[str, MetricAccumulator]:
    """This process's accumulators since the last drain (and reset them)."""
    global _local
    with _lock:
        drained, _local = _local, {}
    return drained


def merge_metrics(parts: list[dict[str, MetricAccumulator]]) -> dict[str, float]:
    merged: dict[str, MetricAccumulator] = {}
    for part in parts:
        for name, acc in part.items():
            if name in merged:
                merged[name].merge(acc)
            else:
                merged[name] = MetricAccumulator(acc.reduce, acc.total, acc.count, acc.maximum, acc.minimum, acc.last)
    return {name: acc.value() for name, acc in sorted(merged.items())}
