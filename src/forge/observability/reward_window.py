"""``RewardWindow``: the per-step mean rewards a run needs, in bounded memory.

The stop criterion looks only at the last ``reward_window`` steps, so keeping every
step's reward (in memory and in each checkpoint) would grow with the run for nothing.
The window keeps those last values, the number of steps seen and the best mean over any
full window, for the summary. It reads like the list it replaces: ``append``, ``len``
and slicing (``rewards[-n:]``) work unchanged.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator


class RewardWindow:
    """The last ``size`` rewards, their count and the best full-window mean so far."""

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"RewardWindow size must be an int >= 1, got {size!r}")
        self.size = size
        self.values: collections.deque[float] = collections.deque(maxlen=size)
        self.count = 0
        self.best_mean: float | None = None  # None until a full window was seen

    def append(self, value: float) -> None:
        self.values.append(float(value))
        self.count += 1
        if len(self.values) == self.size:
            mean = self.mean()
            self.best_mean = mean if self.best_mean is None else max(self.best_mean, mean)

    def mean(self) -> float:
        """Mean of the kept values; 0.0 before the first one (as the summary always did)."""
        return sum(self.values) / max(len(self.values), 1)

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[float]:
        return iter(self.values)

    def __getitem__(self, key: int | slice) -> Any:
        """Indexes and slices as a list of the kept values would (a deque cannot slice)."""
        return list(self.values)[key] if isinstance(key, slice) else self.values[key]

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so a checkpoint loads without this class and stays small."""
        return {"values": list(self.values), "count": self.count, "best_mean": self.best_mean}

    @classmethod
    def from_state(cls, size: int, state: dict[str, Any] | list[float]) -> RewardWindow:
        """From ``state_dict``, or from an older checkpoint's list of every step's reward
        (replayed, so the best window over the whole list is found)."""
        window = cls(size)
        if isinstance(state, dict):
            window._load(state)
        else:
            for value in state:
                window.append(value)
        return window

    def _load(self, state: dict[str, Any]) -> None:
        self.values.extend(float(v) for v in state["values"])  # a smaller size keeps the latest
        self.count = state["count"]
        self.best_mean = state["best_mean"]
