"""Forge: reinforcement-learning post-training of language models on Monarch actors.

Importing ``forge`` has no side effects: it does not touch the environment, logging
configuration or Monarch's runtime. Those are set up when the first actor or service
is spawned (see ``forge.controller``).
"""

__version__ = "0.1.0"
