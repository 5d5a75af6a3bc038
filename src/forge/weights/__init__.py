"""Versioned weights from the trainer to the generators (the TorchStore role)."""

from forge.weights.store import WeightStore, WeightStoreFull, default_store_name, sweep_stale_segments

__all__ = ["WeightStore", "WeightStoreFull", "default_store_name", "sweep_stale_segments"]
