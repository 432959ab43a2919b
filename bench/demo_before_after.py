"""The demo before and after a change, phase by phase, in the same conditions.

Runs ``python main.py --demo [--quick]`` as a user would, once from a checkout of an earlier
revision (a temporary ``git worktree``) and once from this one, alternating for ``--rounds``
rounds so that load changes on a shared machine hit both; every run gets fresh data and work
directories and an empty compilation cache (the first run a user makes). Each run's phases
come from its ``demo_summary.json`` (``runner.Phases``); the table gives the median wall
seconds per phase of each side, the speed-up, and the load average before and after each
run. Section ``demo_before_after`` (``demo_before_after_quick`` with ``--quick``) of
``bench/RESULTS.md``.

    python bench/demo_before_after.py --before 0e8f3a0 [--quick] [--rounds 1] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime
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


def run_demo(checkout: Path, quick: bool, scratch: Path) -> dict:
    """``main.py --demo`` from ``checkout`` with fresh directories: its phases' seconds, the
    whole run's wall seconds and the load averages around it."""
    work, data = scratch / "work", scratch / "data"
    cmd = [sys.executable, "main.py", "--demo", f"--workdir={work}", f"--data_dir={data}"]
    cmd += ["--quick"] if quick else []
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["PYTHONPATH"] = str(checkout)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} in {checkout} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((work / "demo_summary.json").read_text())
    phases = {k: v["seconds"] for k, v in summary["phases"].items()}
    return {"phases": phases, "wall": wall, "load": (load_before, os.getloadavg()[0])}


def table(before: list[dict], after: list[dict]) -> list[str]:
    """One row per phase (in the order the runs met them) and one for the whole run."""
    names = list(dict.fromkeys([k for r in before + after for k in r["phases"]]))
    rows = ["| phase | before s | after s | speed-up |", "|---|---:|---:|---:|"]

    def med(runs: list[dict], name: str) -> float | None:
        values = [r["phases"][name] for r in runs if name in r["phases"]]
        return statistics.median(values) if values else None

    for name in names:
        b, a = med(before, name), med(after, name)
        speed = f"{b / a:.1f}x" if a and b else ""
        cell = lambda v: f"{v:.1f}" if v is not None else "—"  # noqa: E731
        rows.append(f"| {name} | {cell(b)} | {cell(a)} | {speed} |")
    b, a = (statistics.median(r["wall"] for r in side) for side in (before, after))
    rows.append(f"| **whole run (wall)** | **{b:.0f}** | **{a:.0f}** | **{b / a:.1f}x** |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the 'before' side")
    parser.add_argument("--quick", action="store_true", help="python main.py --demo --quick")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with (
        tempfile.TemporaryDirectory(prefix="demo_before_after_") as tmp,
        worktree(args.before) as old,
    ):
        for r in range(args.rounds):
            for side, checkout in (("before", old), ("after", ROOT)):
                scratch = Path(tmp) / f"{side}{r}"
                runs[side].append(run_demo(checkout, args.quick, scratch))
                print(f"round {r + 1} {side}: {runs[side][-1]['wall']:.0f}s", flush=True)
    head = checkouts.head()
    loads = ", ".join(
        f"{side} {r['load'][0]:.1f} -> {r['load'][1]:.1f}" for side in runs for r in runs[side]
    )
    flag = " --quick" if args.quick else ""
    text = "\n".join(
        [
            f"## Demo before / after: `python main.py --demo{flag}`, {args.before} vs {head}",
            "",
            f"`python bench/demo_before_after.py --before {args.before}{flag} --rounds "
            f"{args.rounds}` — {datetime.date.today()}, {os.cpu_count()} CPUs; fresh data, "
            f"work and compilation-cache directories per run; sides alternate, medians over "
            f"{args.rounds} round(s); load average (1 min) before -> after each run: {loads}; "
            f"whole benchmark {time.perf_counter() - start:.0f}s.",
            "",
            *table(runs["before"], runs["after"]),
        ]
    )
    print(text)
    if not args.no_write:
        write_section("demo_before_after" + ("_quick" if args.quick else ""), text)


if __name__ == "__main__":
    main()
