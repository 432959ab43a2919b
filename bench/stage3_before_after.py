"""The full stage-3 train step before and after the accelerator work, on this CPU.

Runs the ``full`` worker of ``bench/train_step.py`` (its "ours, full stage-3 step" row:
``stages.make_train_step`` on a tiny Exo2Ego — CLIP 32 px, STC connector, F; 4 frames ->
[x ; F(x)] = 150 visual tokens — with the 4-layer, d-512 Mistral + LoRA r 16, batch 4 x
(256 text tokens + 150 visual) = 4 x 405 positions, float32) from two checkouts at once:

* before: ``--before`` (default ``/work/wt/pre16``), a checkout of the code before the
  accelerator work (commit ``002f9ae``; make one with ``git worktree add --detach DIR
  002f9ae``), its own ``bench/train_step.py`` with its own package on ``PYTHONPATH``;
* after: this checkout's ``bench/train_step.py``.

Both workers are persistent processes (compiled once, excluded); the parent alternates one
timed step each (first mover rotated) for ``--rounds`` rounds, so load changes on the shared
machine hit both alike. Same weights on both sides (``Exo2Ego.init(key(0))``), same batch:
the first two steps' losses are compared (the attention kernel changed from the hand-written
softmax to ``jax.nn.dot_product_attention``, and the LM head now runs only on the text after
the video, so bitwise equality is not expected; the tolerance is ``--tol``).

    python bench/stage3_before_after.py [--before /work/wt/pre16] [--rounds 7]
        [--threads both|2|1] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import write_section  # bench/results.py (this script's directory)
from train_step import Worker  # bench/train_step.py's worker driver

HERE = Path(__file__).resolve().parent
#: What the ``full`` worker of each checkout is asked to build (bench/train_step.py flags).
WORKER_ARGS = argparse.Namespace(layout="scan", remat="none", quick=False, no_peft=False)


def _commit(tree: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run(args, threads: int) -> dict:
    print(f"--- {threads} thread(s) per side", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="stage3_ba_"))
    trees = {"before": Path(args.before).resolve(), "after": HERE.parent}
    sides: dict[str, Worker] = {}
    load = [os.getloadavg()]
    try:
        for name, tree in trees.items():  # one at a time: no compile overlaps the other
            (tmp / name).mkdir()
            sides[name] = Worker("full", tmp / name, WORKER_ARGS, threads, tree=tree)
            print(f"{name}: ready in {sides[name].info['setup_s']:.0f}s", flush=True)
        times: dict[str, list[tuple[float, float]]] = {n: [] for n in sides}
        order = list(sides)
        for r in range(args.rounds):
            load.append(os.getloadavg())
            for name in order[r % 2 :] + order[: r % 2]:
                out = sides[name].ask("step")
                times[name].append((out["wall"], out["cpu"]))
            print(
                f"round {r}: "
                + ", ".join(f"{n} {v[-1][0]:.2f}s" for n, v in times.items())
                + f"; load {load[-1][0]:.1f}",
                flush=True,
            )
        load.append(os.getloadavg())
    finally:
        for s in sides.values():
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return dict(
        threads=threads,
        trees=trees,
        infos={n: s.info for n, s in sides.items()},
        times=times,
        load=load,
        commits={n: _commit(t) for n, t in trees.items()},
    )


def summarize_pass(args, res: dict) -> list[str]:
    """One ``### n threads`` subsection: table, losses, ratio."""
    infos, times, load, threads = res["infos"], res["times"], res["load"], res["threads"]
    med = {n: statistics.median(w for w, _ in v) for n, v in times.items()}
    lo = {n: min(w for w, _ in v) for n, v in times.items()}
    cores = {n: statistics.median(c / w for w, c in v) for n, v in times.items()}
    ratios = [b / a for (b, _), (a, _) in zip(times["before"], times["after"], strict=True)]
    ratio = statistics.median(ratios)
    checks = {n: [c[0] for c in infos[n]["check"]] for n in infos}
    diffs = [abs(a - b) for a, b in zip(checks["before"], checks["after"], strict=True)]
    gdiffs = [
        abs(a[1] - b[1]) / abs(b[1])
        for a, b in zip(infos["before"]["check"], infos["after"]["check"], strict=True)
    ]
    ok = max(diffs) <= args.tol

    def row(n):
        xla = infos[n].get("xla_unrolled")
        return (
            f"| {n} (`{res['commits'][n]}`, {res['trees'][n]}) | {med[n]:.2f} ({lo[n]:.2f}) | "
            f"{1 / med[n]:.3f} | {cores[n]:.2f} | "
            f"{xla / 1e9:.1f} | {infos[n]['compile_s']:.0f} | "
            f"{', '.join(f'{x:.6f}' for x in checks[n])} |"
        )

    return [
        "",
        f"### {threads} thread{'s' if threads > 1 else ''} per side"
        f"{' (each pinned to the same CPU)' if threads == 1 else ''}: load average "
        f"{load[0][0]:.1f} at start, {statistics.median(x[0] for x in load[1:]):.1f} median "
        f"over the rounds, {load[-1][0]:.1f} at the end",
        "",
        "| code | s/step, median (min) | steps/s | CPU cores busy | XLA GFLOP/step "
        "(unrolled) | compile s | first 2 losses |",
        "|---|---:|---:|---:|---:|---:|---|",
        row("before"),
        row("after"),
        "",
        f"**after / before speed: {ratio:.2f}x** (median of the {len(ratios)} per-round ratios "
        f"{', '.join(f'{r:.2f}' for r in ratios)}; {lo['before'] / lo['after']:.2f}x of the "
        f"minima). Same loss: first-step |diff| {diffs[0]:.1e}, second {diffs[1]:.1e} "
        f"({'within' if ok else 'OUTSIDE'} the stated tolerance {args.tol:g}); pre-clip "
        f"gradient norms {gdiffs[0]:.1e} relative apart at step 1, {gdiffs[1]:.1e} at step 2 "
        "(Adam turns the near-zero, rounding-level gradients of F's biases into full-size "
        "updates of arbitrary sign, so step 2's gradients differ more). Seconds per round: "
        f"{ {n: [round(w, 2) for w, _ in v] for n, v in times.items()} }.",
    ]


def summarize(args, passes: list[dict], total_s: float) -> str:
    infos = passes[0]["infos"]
    cmd = "python bench/stage3_before_after.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write"
    )
    lines = [
        "## Stage-3 train step before / after the accelerator work (CPU, float32)",
        "",
        f"`{cmd}` — {datetime.date.today().isoformat()}, {infos['after']['version']}, "
        f"{os.cpu_count()} CPUs shared with other jobs (load averages below); whole run "
        f"{total_s:.0f}s. Both rows run `bench/train_step.py --worker full` (the 'ours, full "
        "stage-3 step' row of the train_step section: `stages.make_train_step` on a tiny "
        "Exo2Ego — CLIP 32 px, STC connector, F, 4 frames -> [x ; F(x)] = 150 visual tokens — "
        "with the 4-layer d-512 Mistral + LoRA r 16, batch 4 x 405 positions, layers scanned, "
        "no remat, jit, donated) of its own checkout, unchanged; persistent processes "
        f"alternating one timed step each (first mover rotated) for {args.rounds} rounds "
        "after 2 warm-up steps (compile excluded). Bitwise equality is not expected: attention "
        "now runs `jax.nn.dot_product_attention` (XLA) instead of the hand-written softmax, "
        "and the LM head runs only on the text after the video "
        f"({infos['before']['xla_unrolled'] / 1e9:.1f} -> "
        f"{infos['after']['xla_unrolled'] / 1e9:.1f} XLA GFLOP per step, programs with "
        "unrolled layers: the 150 visual positions no longer go through the 32000-way head).",
    ]
    for p in passes:
        lines += summarize_pass(args, p)
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="/work/wt/pre16", help="the 'before' checkout")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per side")
    parser.add_argument(
        "--threads",
        default="both",
        choices=("2", "1", "both"),
        help="threads per side: 2 (XLA's pool), 1 (pinned to one CPU: steadier under other "
        "load) or both (default)",
    )
    parser.add_argument("--tol", type=float, default=1e-4, help="max |loss diff| accepted")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    before = Path(args.before)
    if not (before / "bench/train_step.py").is_file():
        raise SystemExit(
            f"--before {before}: no bench/train_step.py there; make a checkout of the code "
            f"before the accelerator work first: git worktree add --detach {before} 002f9ae"
        )
    t0 = time.perf_counter()
    settings = {"2": (2,), "1": (1,), "both": (2, 1)}[args.threads]
    passes = [run(args, threads) for threads in settings]
    table = summarize(args, passes, time.perf_counter() - t0)
    print(table)
    if not args.no_write:
        write_section("stage3_before_after", table)


if __name__ == "__main__":
    main()
