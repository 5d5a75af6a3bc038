"""Data for RL: training batches (and, next, datasets and rewards)."""
