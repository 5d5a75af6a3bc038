"""Tool-using RL on the embedded tiny model: GRPO over multi-turn calculator episodes.

    python -m apps.tool_use.main                     # the CPU demo (apps/tool_use/default.yaml)
    python -m apps.tool_use.main run.max_steps=50    # overrides as in apps.grpo.main

It is the GRPO app (apps.grpo.main: services, metrics, checkpoints, plots) with an
environment (``env.factory``, see apps/tool_use/env.py): each episode is a conversation
of model turns and calculator results, the results carry no gradient, and each
episode's turns share a policy session, so the generator's prefix cache prefills only
what is new in a turn.
"""

from __future__ import annotations

import sys
from pathlib import Path

from apps.grpo.main import main as grpo_main

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")


def main(argv: list[str] | None = None) -> int:
    return grpo_main(argv, default_config=DEFAULT_CONFIG, app="apps.tool_use.main")


if __name__ == "__main__":
    sys.exit(main())
