"""Time to target of the main job: ``apps.grpo.main`` on the default config, seeds 0-9.

Each seed is one run of the README's first command (``run.seed=S``), in its own process
tree, one after another: the run stops when the 10-step mean reward reaches 0.9 (or at
its 500-step / 600 s limits). Printed per seed: reached (yes/no), steps, wall seconds
including startup (the run's own ``wall_s``: from ``run()`` to its summary, so it also
holds the final evaluation and export, about a second), the whole process's seconds
(interpreter start and imports too: what a user waits), startup seconds and the final
greedy accuracy; then the medians and the worst. A seed that misses counts with its full
time.

    .venv/bin/python bench/time_to_target.py [--seeds 10] [--first-seed 0] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_seed(seed: int, overrides: list[str], output: Path) -> dict:
    started = time.monotonic()
    env = dict(os.environ, MONARCH_FILE_LOG=os.environ.get("MONARCH_FILE_LOG", "error"))
    proc = subprocess.run([sys.executable, "-m", "apps.grpo.main", f"run.seed={seed}", f"run.output_dir={output}",
                           "metrics=[jsonl]", *overrides], cwd=ROOT, env=env, capture_output=True, text=True)
    summaries = list(output.glob("*/summary.json"))
    if proc.returncode != 0 or not summaries:
        elapsed = time.monotonic() - started
        return {"seed": seed, "reached": False, "error": proc.stderr[-500:], "steps": 0, "wall_s": elapsed,
                "process_s": elapsed, "startup_s": float("nan"), "accuracy": None}
    summary = json.loads(summaries[0].read_text())
    return {"seed": seed, "reached": "reached the target" in summary["reason"], "steps": summary["steps"],
            "wall_s": summary["wall_s"], "process_s": time.monotonic() - started, "startup_s": summary["startup_s"],
            "accuracy": summary["final_eval_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="the first of them")
    parser.add_argument("overrides", nargs="*", help="config overrides passed to every run")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="forge-ttt-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            result = run_seed(seed, args.overrides, Path(tmp) / f"seed-{seed}")
            results.append(result)
            print(json.dumps(result), flush=True)
    print("\n| seed | reached 0.9 | steps | run wall s (incl. startup) | process s | startup s | greedy accuracy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"| {r['seed']} | {'yes' if r['reached'] else 'no'} | {r['steps']} | {r['wall_s']:.0f} | "
              f"{r['process_s']:.0f} | {r['startup_s']:.0f} | {accuracy} |")
    walls, processes = [r["wall_s"] for r in results], [r["process_s"] for r in results]
    print(f"\nreached: {sum(r['reached'] for r in results)} of {len(results)}; run wall time median "
          f"{statistics.median(walls):.0f} s, worst {max(walls):.0f} s; whole process median "
          f"{statistics.median(processes):.0f} s, worst {max(processes):.0f} s")


if __name__ == "__main__":
    main()
