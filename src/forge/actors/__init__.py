"""Forge's RL actors: Policy (generation); trainer, reference model and replay buffer follow."""
