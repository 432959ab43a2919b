"""What one demo train step costs, per stage, before and after a change (CPU, float32).

For each stage, ``training.loop.train`` on the ``demo`` preset (random init, batch
``--batch`` (8) of 4 frames at 64 px, fed by ``tests/train_helpers.CountingStream``) runs
``--steps`` steps with a host sync after each; per step we record the wall time and the
process's CPU time (user + system over XLA's threads: on a shared machine the CPU time moves
much less with the load than the wall time does). Medians over the steps after the first
three. Each side runs in its own process from its own checkout (``--before``: a temporary
``git worktree``), sides alternating per round. Section ``stage_step_cost`` of
``bench/RESULTS.md``.

    python bench/stage_step_cost.py --before 0e8f3a0 [--stages 0,1,2,3] [--steps 25] [--batch 8]
        [--rounds 1] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkouts  # bench/checkouts.py (this script's directory)
from checkouts import ROOT, worktree
from results import write_section  # bench/results.py


def bench_config(stage: int, steps: int, batch: int):
    """The stage's ``demo`` config for a step benchmark: random init, ``steps`` steps of
    ``batch``, no checkpoints, logging or FLOP count (not part of the times measured)."""
    c = importlib.import_module(f"configs.stage{stage}").get_config("demo")
    c.init.llm = c.init.clip = ""
    c.init.stages = ()
    c.optim.batch_size = batch
    c.optim.num_steps, c.log_every = steps, 10**6
    c.checkpoint.every_steps, c.checkpoint.async_save = 10**9, False
    c.count_model_flops = False
    c.mesh.shape = (-1, 1, 1)
    return c


def worker(stages: list[int], steps: int, batch: int) -> None:
    """In the checkout on ``sys.path``: one JSON line per stage on stdout."""
    import jax
    from train_helpers import streams_for

    from exo2ego_jax.training import loop
    from exo2ego_jax.training.step import CompiledSteps

    original, record = CompiledSteps.__call__, []

    def timed(self, *a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = original(self, *a, **kw)
        jax.block_until_ready(out[:2])
        record.append((time.perf_counter() - wall, time.process_time() - cpu))
        return out

    CompiledSteps.__call__ = timed
    for stage in stages:
        c = bench_config(stage, steps, batch)
        record.clear()
        with tempfile.TemporaryDirectory() as wd:
            streams = streams_for(stage, batch=batch, n=steps * 16)
            summary = loop.train(c, wd, streams=streams, log=lambda _: None, progress=False)
        kept = record[3:]
        wall = statistics.median(r[0] for r in kept) * 1e3
        cpu = statistics.median(r[1] for r in kept) * 1e3
        compile_s = summary["timing"]["compile_s"]
        print(json.dumps({"stage": stage, "wall_ms": wall, "cpu_ms": cpu, "compile_s": compile_s}))


def run_side(checkout: Path, stages: list[int], steps: int, batch: int) -> dict[int, dict]:
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{checkout / 'tests'}"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(steps)]
    cmd += ["--batch", str(batch)]
    cmd += ["--stages", ",".join(map(str, stages))]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker in {checkout} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["stage"]: r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision of the 'before' side")
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    if args.worker:
        worker(stages, args.steps, args.batch)
        return
    if not args.before:
        parser.error("--before REV is required")
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    sides: dict[str, list[dict[int, dict]]] = {"before": [], "after": []}
    with worktree(args.before) as old:
        for _ in range(args.rounds):
            for side, checkout in (("before", old), ("after", ROOT)):
                sides[side].append(run_side(checkout, stages, args.steps, args.batch))
                loads.append(os.getloadavg()[0])
    head = checkouts.head()

    def med(side: str, stage: int, key: str) -> float:
        return statistics.median(r[stage][key] for r in sides[side])

    rows = [
        "| stage | CPU ms / step, before | after | speed-up | wall ms / step, before | after "
        "| compile s, before | after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stages:
        b, a = med("before", s, "cpu_ms"), med("after", s, "cpu_ms")
        rows.append(
            f"| {s} | {b:.0f} | {a:.0f} | {b / a:.2f}x | {med('before', s, 'wall_ms'):.0f} | "
            f"{med('after', s, 'wall_ms'):.0f} | {med('before', s, 'compile_s'):.1f} | "
            f"{med('after', s, 'compile_s'):.1f} |"
        )
    text = "\n".join(
        [
            f"## Demo train step per stage: {args.before} vs {head} (CPU, float32)",
            "",
            f"`python bench/stage_step_cost.py --before {args.before} --steps {args.steps} "
            f"--batch {args.batch} "
            f"--rounds {args.rounds}` — {datetime.date.today()}, {os.cpu_count()} CPUs shared "
            f"with other jobs; load average (1 min) at the start and after each side: "
            f"{', '.join(f'{x:.1f}' for x in loads)}; whole run "
            f"{time.perf_counter() - start:.0f}s. `configs/stageN.py:demo`, random init, "
            f"batch {args.batch}; a host sync after each step; medians over steps "
            f"4-{args.steps} (and "
            f"over rounds). CPU time is the process's (both of XLA's threads); compile = the "
            f"train step's lowering + compilation for the first batch shape (no persistent "
            f"cache), wall.",
            "",
            *rows,
        ]
    )
    print(text)
    if not args.no_write:
        write_section("stage_step_cost", text)


if __name__ == "__main__":
    main()
