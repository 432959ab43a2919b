"""Where the demo's time goes: ``python main.py --demo`` profiled phase by phase.

Runs the demo in-process exactly as ``main.py --demo`` does (``exo2ego_jax.demo.runner.run``,
which times its phases: world rendering, dataset preparation, LM pretraining, CLIP-corpus
rendering, CLIP pretraining, stages 0-3, EgoBench, chat check) and reports

* every phase's wall time and share of the run;
* for every stage, its wall time split by the trainer (``train()``'s ``timing``,
  ``training.perf.StageTiming``): setup (streams, parameters, earlier stages' checkpoints),
  compilation, FLOP counting, waiting for data, host-side batch work and logging, device
  compute, checkpointing; the stages run with ``config.profile_timing`` (the host waits for
  the device after every step, so the device's time is all of the steps' compute and
  nothing overlaps);
* each stage's model FLOPs per step (the trainer's count, ``training.step.model_flops_per_step``)
  and the fraction of the measured matmul peak it reaches: over its device time and over the
  stage's wall time. The peak is a 1024 x 1024 float32 ``jnp.dot`` in this process
  (``bench/accelerator.py`` ``matmul_peak``), measured before and after the demo.

Fresh temporary directories by default, so nothing is reused from an earlier run: no world,
no datasets, no stand-ins, no stage checkpoints, an empty persistent compilation cache
(``<workdir>/jax_cache``; one configured through ``JAX_COMPILATION_CACHE_DIR`` is used
instead and reported). The table goes to ``bench/RESULTS.md`` (section ``demo_profile``, or
``demo_profile_quick`` with ``--quick``).

    python bench/demo_profile.py [--quick] [--workdir DIR] [--data-dir DIR] [--no-write]

``--quick``: the sizes of ``python main.py --demo --quick`` (``runner.QUICK``).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import checkouts  # bench/checkouts.py (same directory)
import jax
from accelerator import matmul_peak  # bench/accelerator.py (same directory)
from results import write_section  # bench/results.py

from exo2ego_jax.demo import runner
from input_pipeline import clip_cache

PEAK_N = 1024  # square float32 matmul of the peak measurement
#: The stage timing's parts, as the tables name them (``StageTiming.summary()`` keys).
PARTS = {
    "setup_s": "setup",
    "compile_s": "compile",
    "flop_count_s": "FLOP count",
    "data_s": "data wait",
    "host_s": "host",
    "device_s": "device",
    "checkpoint_s": "checkpoint",
}
UNITS = {"takes": "takes", "steps": "steps", "clips": "clips"}  # a phase's unit of work


def cache_entries(directory: str | Path) -> int:
    """Files in a persistent compilation cache directory (0 if it does not exist)."""
    path = Path(directory)
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def xla_threads() -> str:
    """What XLA's CPU thread pool gets: the cores this process may use, and XLA_FLAGS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return f"XLA's default pool over {cores} cores" + (f" (XLA_FLAGS `{flags}`)" if flags else "")


def profile(quick: bool, workdir: Path, data_dir: Path) -> dict:
    """Runs the demo with every stage's timing; returns its results, phases, the peak and
    the compilation cache's state."""
    commit = checkouts.head()  # before the run: the code this process imported
    runner.use_compilation_cache(workdir)  # what run() does first; here to inspect it
    cache_dir = jax.config.jax_compilation_cache_dir
    cache_before = cache_entries(cache_dir)
    peak_before = matmul_peak(PEAK_N, "float32")["best"]
    phases = runner.Phases()
    t0 = time.perf_counter()
    results = runner.run(
        workdir,
        data_dir,
        quick=quick,
        phases=phases,
        stage_overrides={"profile_timing": True, "count_model_flops": True},
    )
    demo_s = time.perf_counter() - t0
    peak_after = matmul_peak(PEAK_N, "float32")["best"]
    return {
        "results": results,
        "phases": phases,
        "demo_s": demo_s,
        "peak": max(peak_before, peak_after),
        "peaks": (peak_before, peak_after),
        "cache": (str(cache_dir), cache_before, cache_entries(cache_dir)),
        "commit": commit,
        "clip_cache": clip_cache_line(),
    }


def clip_cache_line() -> str:
    """What the process-wide decoded-clip cache did over the run (``data.clip_cache_mb``)."""
    cache = clip_cache.current_cache()
    if cache is None:
        return "off"
    s = cache.stats()
    looked_up = s["hits"] + s["misses"]
    return (
        f"{s['misses']} clips decoded, {s['hits']} of {looked_up} look-ups served from memory "
        f"({s['hits'] / max(looked_up, 1):.0%}), {s['bytes'] / 2**20:.0f} MiB held at the end, "
        f"{s['evictions']} evicted"
    )


def _work(details: dict) -> tuple[str, str]:
    """``("30 steps", unit)`` of a phase's details, or empty strings."""
    for key, unit in UNITS.items():
        if details.get(key):
            return f"{details[key]} {unit}", unit
    return "", ""


def phase_rows(phases: runner.Phases, total: float) -> list[str]:
    """One row per phase: wall seconds, share of ``total``, its work and seconds per unit."""
    rows = []
    for name, seconds in phases.seconds.items():
        work, unit = _work(phases.details.get(name, {}))
        n = phases.details.get(name, {}).get(unit) if unit else None
        # A stage's wall time per step would hide its compilation: see its own tables.
        per = f"{seconds / n:.2f} s/{unit[:-1]}" if n and not name.startswith("stage ") else ""
        rows.append(f"| {name} | {seconds:.1f} | {seconds / total:.0%} | {work} | {per} |")
    return rows


def stage_rows(stages: dict, peak: float) -> tuple[list[str], list[str]]:
    """``(seconds rows, per-step rows)`` of the stages' timings."""
    split, per_step = [], []
    for stage, s in sorted(stages.items(), key=lambda kv: int(kv[0])):
        t = s["timing"]
        n = max(t["steps"], 1)
        cells = " | ".join(f"{t[k]:.1f}" for k in PARTS)
        shapes = s.get("compiled_shapes", "")
        split.append(f"| {stage} | {t['steps']} | {shapes} | {t['wall_s']:.1f} | {cells} |")
        flops = t["model_flops"]
        if flops:
            on_device = flops / max(t["device_s"], 1e-9)
            overall = flops / max(t["wall_s"], 1e-9)
            figures = (
                f"{flops / n / 1e9:.2f} | {on_device / 1e9:.1f} | {on_device / peak:.1%} | "
                f"{overall / peak:.2%}"
            )
        else:
            figures = "n/a | n/a | n/a | n/a"
        ms = " | ".join(f"{t[k] / n * 1e3:.0f}" for k in ("data_s", "host_s", "device_s"))
        loop = sum(t[k] for k in ("data_s", "host_s", "device_s")) / n * 1e3
        per_step.append(f"| {stage} | {ms} | {loop:.0f} | {figures} |")
    return split, per_step


def top_items(phases: runner.Phases, stages: dict, k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` largest items of the run: phases other than stages, and every stage's parts."""
    items = [(name, s) for name, s in phases.seconds.items() if not name.startswith("stage ")]
    for stage, s in stages.items():
        items += [(f"stage {stage} {PARTS[key]}", s["timing"][key]) for key in PARTS]
    return sorted(items, key=lambda kv: -kv[1])[:k]


def report(args, out: dict, load: tuple[float, float], total: float, fresh: str) -> str:
    results, phases = out["results"], out["phases"]
    stages = results["stages"]
    demo_s = out["demo_s"]
    cache_dir, before, after = out["cache"]
    cache = (
        f"empty at the start ({after} entries at the end)"
        if before == 0
        else f"{before} entries at the start, {after} at the end (programs reused)"
    )
    cmd = "python bench/demo_profile.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write"
    )
    demo_cmd = "python main.py --demo" + (" --quick" if args.quick else "")
    split, per_step = stage_rows(stages, out["peak"])
    p0, p1 = out["peaks"]
    timed = sum(phases.seconds.values())
    top = "; ".join(f"{name} {s:.0f}s ({s / demo_s:.0%})" for name, s in top_items(phases, stages))
    title = "quick demo" if args.quick else "demo"
    return "\n".join(
        [
            f"## Demo profile: `{demo_cmd}` phase by phase ({title})",
            "",
            f"`{cmd}` — {datetime.date.today().isoformat()}, jax {jax.__version__}, "
            f"{os.cpu_count()} CPUs, {xla_threads()}; load average "
            f"{load[0]:.1f} at the start, {load[1]:.1f} at the end; whole run {total:.0f}s "
            f"(the demo {demo_s:.0f}s, of which {timed:.0f}s in the phases below). {fresh}; "
            f"persistent compilation cache `{cache_dir}` {cache}. Code at commit "
            f"{out['commit']}; decoded-clip cache: {out['clip_cache']}. Stages with "
            "`config.profile_timing` (the host waits for the device after every step, so "
            "'device' is all of the steps' compute and nothing overlaps).",
            "",
            "| phase | wall s | share of the demo | work | per unit |",
            "|---|---:|---:|---:|---:|",
            *phase_rows(phases, demo_s),
            "",
            "Each stage's wall time, split by the trainer (`train()`'s `timing`; seconds): "
            "setup = streams, parameters, pretrained and earlier stages' weights; compile = "
            "lowering + compiling the train step per batch shape (text padded to a length "
            "bucket per stream, so a new combination of buckets is a new shape, compiled when "
            "it first occurs); FLOP count = one more "
            "lowering of it for the model FLOPs; data wait = the streams' `next` (decoding "
            "and batching on the host); host = padding, placing on the mesh, logging; "
            "checkpoint = Orbax saves and the final wait for them.",
            "",
            "| stage | steps | batch shapes compiled | wall | " + " | ".join(PARTS.values()) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(PARTS),
            *split,
            "",
            f"Per step (ms) and model FLOPs. Measured matmul peak: {out['peak'] / 1e9:.1f} "
            f"GFLOP/s ({PEAK_N}x{PEAK_N} float32 `jnp.dot`, best of before / after the demo: "
            f"{p0 / 1e9:.1f} / {p1 / 1e9:.1f}); model FLOPs per step: "
            "`training.step.model_flops_per_step` (per device; "
            f"{jax.device_count()} {jax.default_backend()} device(s) here).",
            "",
            "| stage | data wait | host | device | step (sum) | model GFLOP / step | "
            "GFLOP/s on the device | of peak, device time | of peak, stage wall |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            *per_step,
            "",
            f"Largest items of the demo's wall time: {top}.",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the --demo --quick sizes")
    parser.add_argument("--workdir", type=Path, help="stage workdirs (default: a fresh temp dir)")
    parser.add_argument("--data-dir", type=Path, help="world + datasets (default: fresh temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--section", help="RESULTS.md section (default demo_profile, or demo_profile_quick)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)  # the trainer's lines, as main.py shows them
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="demo_profile_") as tmp:
        workdir = args.workdir or Path(tmp) / "workdir"
        data_dir = args.data_dir or Path(tmp) / "data"
        given = [
            f"`--{k}`" for k, v in (("workdir", args.workdir), ("data-dir", args.data_dir)) if v
        ]
        fresh = (
            "Fresh temporary work and data directories"
            if not given
            else f"Given {' and '.join(given)} (a phase whose output existed is skipped)"
        )
        out = profile(args.quick, workdir, data_dir)
    load1 = os.getloadavg()[0]
    table = report(args, out, (load0, load1), time.perf_counter() - t0, fresh)
    print(table)
    if not args.no_write:
        default = "demo_profile_quick" if args.quick else "demo_profile"
        write_section(args.section or default, table)


if __name__ == "__main__":
    main()
