"""Losses with and without per-batch text padding (``config.data.dynamic_length``).

Trains the demo preset's stage 0 and stage 3 for ``--steps`` steps on a tiny synthetic world
twice, padding every batch's text to ``max_text_len`` (off) or to its longest row rounded
up to a bucket (on), from the same random initialisation; prints the largest loss
difference and the step times, and writes the table to bench/RESULTS.md.

    python bench/dynamic_length.py [--steps 20] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from results import write_section  # noqa: E402  (bench/results.py)

from configs import demo as demo_configs  # noqa: E402
from exo2ego_jax.training.loop import train  # noqa: E402
from input_pipeline.prepare import prepare  # noqa: E402
from input_pipeline.synthetic import generate_world  # noqa: E402


def run(root: Path, data: Path, dynamic: bool, steps: int, stage: int, parents: Path) -> tuple:
    """Trains ``stage`` for ``steps`` steps from the checkpoints of stages ``< stage`` in
    ``parents``; returns ``(losses, steps/s of the last log window)``."""
    c = demo_configs.stage_config(stage, root, data)
    c.init.llm = c.init.clip = ""  # random init: no stand-in pretraining needed
    c.init.stages = tuple(str(parents / f"stage{i}") for i in range(stage))
    c.data.dynamic_length = dynamic
    c.optim.num_steps = steps
    c.checkpoint.async_save = False
    c.log_every = 5
    s = train(c, c.workdir, progress=False, log=lambda m: None)
    lines = (Path(c.workdir) / "metrics.jsonl").read_text().splitlines()
    return s["losses"], json.loads(lines[-1])["steps_per_s"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="dynlen-"))
    rows = []
    try:
        data = tmp / "data"
        generate_world(data / "world", seed=0, num_takes=8, progress=False)
        prepare(data / "world", data / "prepared", progress=False)
        # Stages 0-2 once (the hand-offs); each compared stage starts from the same ones.
        for stage in (0, 1, 2):
            run(tmp / "parents", data, True, 2 if stage else args.steps, stage, tmp / "parents")
        for stage in (0, 3):
            a, sps_off = run(tmp / "off", data, False, args.steps, stage, tmp / "parents")
            b, sps_on = run(tmp / "on", data, True, args.steps, stage, tmp / "parents")
            diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
            rel = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
            rows.append(
                f"| {stage} | {len(a)} | {a[0]:.6f} → {a[-1]:.6f} | {b[0]:.6f} → {b[-1]:.6f} | "
                f"{diff:.2e} | {rel:.2e} | {sps_off:.2f} | {sps_on:.2f} |"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()[0]
    table = "\n".join(
        [
            "## Per-batch text padding: same losses (demo preset, CPU float32)",
            "",
            f"`python bench/dynamic_length.py --steps {args.steps}` — {time.strftime('%Y-%m-%d')},"
            f" jax {jax.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}. Demo "
            "preset with random initialisation (no stand-in LM / CLIP), an 8-take world; both "
            "runs of a stage start from the same stage checkpoints. off: every batch padded "
            "to max_text_len; on: to its longest row rounded up to a bucket (powers of two "
            "from 16). steps/s: the last log window (5 steps), after compilation.",
            "",
            "| stage | steps | losses, padded to max | losses, per-batch length | max abs diff | "
            "max rel diff | steps/s off | steps/s on |",
            "|---|---:|---|---|---:|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    if not args.no_write:
        write_section("dynamic_length", table)


if __name__ == "__main__":
    sys.exit(main())
