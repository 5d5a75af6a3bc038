"""``drain_metrics``: collect the ``record_metric`` accumulators of a service or an actor.

Every Forge actor has a built-in endpoint that returns its process's accumulated
metrics and resets them. An application drains each part once per logged step. A
service replica that dies during the drain is not an error: its metrics for that step
are simply missing (the replica is rebuilt and reports again from the next drain).
"""

from __future__ import annotations

import asyncio
from typing import Any

from forge.controller.endpoints import DRAIN
from forge.controller.service.handle import ServiceHandle
from forge.controller.service.types import ReplicaFailure


async def drain_metrics(part: Any, timeout_s: float = 60.0) -> list[dict]:
    """One metrics dict per process of ``part`` (a service handle or an ``as_actor`` mesh).

    For a service, replicas that fail during the drain are left out. Raises
    ``TimeoutError`` naming ``part`` when it does not answer within ``timeout_s``.
    """
    try:
        return await asyncio.wait_for(_drain(part), timeout_s)
    except asyncio.TimeoutError:
        raise TimeoutError(f"draining the metrics of {part!r} took more than {timeout_s} s") from None


async def _drain(part: Any) -> list[dict]:
    if isinstance(part, ServiceHandle):
        results = await part._client().fanout(DRAIN, (), {}, partial=True)
        return [r for result in results if not isinstance(result, ReplicaFailure) for r in _ranks(result)]
    values = await getattr(part, DRAIN).call()
    return [v for _, v in values.items()]


def _ranks(result: Any) -> list[dict]:
    """A replica's drain result: one dict (rank 0) or, with ``all_ranks``, one per rank."""
    return result if isinstance(result, list) else [result]
