"""Rendering the demo's synthetic data before and after a change: a world and a CLIP corpus.

Each side runs in its own process from its own checkout (``--before``: a temporary
``git worktree``), sides alternating for ``--rounds`` rounds: ``generate_world`` of
``--takes`` takes and ``render_corpus`` of ``--corpus-takes`` takes, each with its default
2 worker processes. Per piece: wall seconds and CPU seconds (this process and its workers:
on a shared machine CPU time moves much less with the load than wall time), medians over
the rounds. Section ``render_cost`` of ``bench/RESULTS.md``.

    python bench/render_cost.py --before 0e8f3a0 [--takes 16] [--corpus-takes 40]
        [--rounds 2] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import checkouts  # bench/checkouts.py (this script's directory)
from checkouts import ROOT, worktree
from results import write_section  # bench/results.py


def _cpu_seconds() -> float:
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def worker(takes: int, corpus_takes: int) -> None:
    """In the checkout on ``sys.path``: one JSON line per piece on stdout."""
    from input_pipeline.synthetic import generate_world
    from input_pipeline.synthetic.clip_corpus import render_corpus

    pieces = {
        "world": lambda d: generate_world(Path(d) / "w", num_takes=takes, progress=False),
        "corpus": lambda d: render_corpus(corpus_takes, 0, progress=False),
    }
    for name, fn in pieces.items():
        with tempfile.TemporaryDirectory() as d:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            fn(d)
            wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        print(json.dumps({"piece": name, "wall_s": wall, "cpu_s": cpu}), flush=True)


def run_side(checkout: Path, takes: int, corpus_takes: int) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    cmd += ["--takes", str(takes), "--corpus-takes", str(corpus_takes)]
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker in {checkout} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {r["piece"]: r for r in rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="git revision of the 'before' side")
    parser.add_argument("--takes", type=int, default=16)
    parser.add_argument("--corpus-takes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.takes, args.corpus_takes)
        sys.exit(0)
    if not args.before:
        parser.error("--before REV is required")
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    sides: dict[str, list[dict]] = {"before": [], "after": []}
    with worktree(args.before) as old:
        for _ in range(args.rounds):
            for side, checkout in (("before", old), ("after", ROOT)):
                sides[side].append(run_side(checkout, args.takes, args.corpus_takes))
                loads.append(os.getloadavg()[0])

    def med(side: str, piece: str, key: str) -> float:
        return statistics.median(r[piece][key] for r in sides[side])

    rows = [
        "| piece | CPU s, before | after | speed-up | wall s, before | after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sizes = {"world": f"{args.takes} takes", "corpus": f"{args.corpus_takes} takes"}
    for piece, size in sizes.items():
        b, a = med("before", piece, "cpu_s"), med("after", piece, "cpu_s")
        rows.append(
            f"| {piece} ({size}) | {b:.1f} | {a:.1f} | {b / a:.2f}x | "
            f"{med('before', piece, 'wall_s'):.1f} | {med('after', piece, 'wall_s'):.1f} |"
        )
    text = "\n".join(
        [
            f"## Rendering the synthetic world and CLIP corpus: {args.before} vs "
            f"{checkouts.head()}",
            "",
            f"`python bench/render_cost.py --before {args.before} --takes {args.takes} "
            f"--corpus-takes {args.corpus_takes} --rounds {args.rounds}` — "
            f"{datetime.date.today()}, {os.cpu_count()} CPUs shared with other jobs; load "
            f"average (1 min) at the start and after each side: "
            f"{', '.join(f'{x:.1f}' for x in loads)}; whole run "
            f"{time.perf_counter() - start:.0f}s. 2 render processes each; CPU = this process "
            f"and its workers; medians over the rounds. Same output on both sides "
            f"(tests/test_synthetic_fingerprints.py).",
            "",
            *rows,
        ]
    )
    print(text)
    if not args.no_write:
        write_section("render_cost", text)
