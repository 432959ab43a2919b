"""What a per-step host sync costs the training loop: the demo stage-0 loop on this CPU.

``training.loop.train`` on the demo stage-0 config (tiny CLIP 64 px, STC connectors, tiny
Mistral; batch 8 of 4 frames on both the ego and the exo captioning stream; random init) fed
by ``tests/train_helpers.CountingStream`` batches (generated on the host each step: float32
frames, random text), ``--steps`` steps, three ways:

* ``log_every=50`` (the default): losses read once per 50 steps; the next batch is made and
  placed while the device computes;
* ``log_every=50`` + a host sync after every step (``CompiledSteps.__call__`` wrapped to
  ``jax.block_until_ready`` its outputs): the sync alone, nothing else changed;
* ``log_every=1``: the losses read every step (a sync) plus a metrics line per step
  (TensorBoard, metrics.jsonl, progress postfix), as a loop logging every step would.

Time: the loop's wall clock (``loop._loop``, after compilation; it ends with the one final
checkpoint, the same in every variant) / steps. Variants alternate for ``--reps`` rounds
(medians), so load changes on the shared machine hit all of them.

    python bench/host_sync.py [--steps 200] [--reps 3] [--xla-threads 0|1] [--no-write]

With ``--xla-threads 1`` XLA computes on one thread, leaving the host the other core: closer
to an accelerator, where the device computes while the host prepares the next batch.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from results import write_section  # bench/results.py (this script's directory)

HERE = Path(__file__).resolve().parent
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
sys.path.insert(0, str(HERE.parent / "tests"))  # train_helpers.CountingStream

VARIANTS = {
    "no_sync": "`log_every=50`: no host sync between log points (default)",
    "sync": "`log_every=50` + `block_until_ready` after every step",
    "log1": "`log_every=1`: losses read and logged every step",
}


def run_variant(variant: str, steps: int, workdir: Path) -> dict:
    import jax
    from train_helpers import streams_for

    from configs import stage0
    from exo2ego_jax.training import loop
    from exo2ego_jax.training.step import CompiledSteps

    c = stage0.get_config("demo")
    c.init.llm = c.init.clip = ""
    c.init.stages = ()
    c.optim.num_steps = steps
    c.log_every = 1 if variant == "log1" else 50
    c.checkpoint.every_steps = 10**9  # only the final save (the same in every variant)
    c.checkpoint.async_save = False
    c.mesh.shape = (-1, 1, 1)

    timing: dict[str, float] = {}
    original_loop, original_call = loop._loop, CompiledSteps.__call__

    def timed_loop(*a, **kw):
        t0 = time.perf_counter()
        try:
            return original_loop(*a, **kw)
        finally:
            timing["loop_s"] = time.perf_counter() - t0

    step_s: list[float] = []

    def synced_call(self, *a, **kw):
        t0 = time.perf_counter()
        out = original_call(self, *a, **kw)
        jax.block_until_ready(out[:2])
        step_s.append(time.perf_counter() - t0)
        return out

    loop._loop = timed_loop
    if variant == "sync":
        CompiledSteps.__call__ = synced_call
    try:
        summary = loop.train(
            c, workdir, streams=streams_for(0, n=steps * 8), log=lambda _: None, progress=False
        )
    finally:
        loop._loop, CompiledSteps.__call__ = original_loop, original_call
    return {
        "variant": variant,
        "loop_s": timing["loop_s"],
        "steps_per_s": steps / timing["loop_s"],
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "step_s": statistics.median(step_s) if step_s else None,
    }


def host_batch_s(n: int = 50) -> float:
    """Median host time to make one step's input as the loop does: the next batch of each
    stream, padded to its bucket (``trim_to_buckets``) and placed (``shard_batch``)."""
    import jax
    from train_helpers import streams_for

    from configs import stage0
    from exo2ego_jax import sharding as sharding_lib
    from exo2ego_jax.training.streams import length_buckets, trim_to_buckets

    c = stage0.get_config("demo")
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    buckets = length_buckets(c)
    its = {k: s.iterator for k, s in streams_for(0, n=n * 8).items()}
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        host = trim_to_buckets({k: next(it) for k, it in its.items()}, buckets)
        jax.block_until_ready(sharding_lib.shard_batch(host, mesh))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(
    args, runs: dict[str, list[dict]], load: list[float], total: float, host_s: float
) -> str:
    import jax

    step_s = statistics.median(r["step_s"] for r in runs["sync"] if r["step_s"])
    med = {v: statistics.median(r["steps_per_s"] for r in rs) for v, rs in runs.items()}
    base = med["no_sync"]
    rows = []
    for v, rs in runs.items():
        each = ", ".join(f"{r['steps_per_s']:.2f}" for r in rs)
        paired = statistics.median(
            a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["no_sync"], rs, strict=True)
        )
        rows.append(
            f"| {VARIANTS[v]} | {med[v]:.2f} | {1e3 / med[v]:.1f} | {base / med[v]:.2f}x "
            f"({paired:.2f}x) | {each} | {rs[0]['last_loss']:.6f} |"
        )
    lasts = {round(r["last_loss"], 6) for rs in runs.values() for r in rs}
    cmd = "python bench/host_sync.py" + "".join(f" {a}" for a in sys.argv[1:] if a != "--no-write")
    title = " (XLA on one thread)" if args.xla_threads == 1 else ""
    return "\n".join(
        [
            "## Host sync: the demo stage-0 training loop with and without a per-step sync" + title,
            "",
            f"`{cmd}` — {datetime.date.today().isoformat()}, jax {jax.__version__}, "
            f"{os.cpu_count()} CPUs shared with other jobs ("
            + (
                "XLA on one thread: the step runs on one core, the host has the other"
                if args.xla_threads == 1
                else "XLA's default threads: the step and the host share both cores"
            )
            + "); load "
            f"average {load[0]:.1f} at start, {statistics.median(load[1:-1] or load):.1f} "
            f"median over the rounds, {load[-1]:.1f} at the end; whole run {total:.0f}s. "
            f"`training.loop.train` on `configs/stage0.py:demo` (random init, batch 8 x 4 "
            "frames x 64 px on each of the ego / exo captioning streams, text 48) fed by "
            f"`tests/train_helpers.CountingStream` (batches made on the host every step), "
            f"{args.steps} steps per run, {args.reps} rounds with the variants alternating; "
            "time = the loop's wall clock after compilation (it includes the one final "
            "checkpoint, the same in every variant) / steps.",
            "",
            "| loop | steps/s, median | ms/step | slowdown vs no sync (median of the rounds' "
            "ratios) | runs (steps/s) | "
            "last loss |",
            "|---|---:|---:|---:|---|---:|",
            *rows,
            "",
            f"Same training in every run: last losses {sorted(lasts)} (the sync changes when "
            "the host waits, not what is computed). With the per-step sync the host makes the "
            "next batch only after the device finished the step; without it the two overlap. "
            f"What overlaps, measured apart: the host's input work per step (next batch of both "
            f"streams, `trim_to_buckets`, `shard_batch`) takes {host_s * 1e3:.0f} ms (median "
            f"of 50), the step itself {step_s * 1e3:.0f} ms (dispatch to ready, median over "
            "the synced runs). Here the 'device' is the same two CPU cores that make the "
            "batches, so hiding one behind the other gains little; on an accelerator the "
            f"host work ({host_s * 1e3:.0f} ms here, more with real decoding) is hidden "
            "entirely as long as it is shorter than the step, and a per-step sync adds it "
            "to every step.",
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per run")
    parser.add_argument("--reps", type=int, default=3, help="rounds of every variant")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--xla-threads",
        type=int,
        choices=(0, 1),
        default=0,
        help="1: XLA on one thread, so the 'device' is one core and the host has the other "
        "(an accelerator's separation, roughly); 0: XLA's default pool (section host_sync_xla1 "
        "vs host_sync)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.xla_threads == 1:  # before JAX starts (it is imported lazily below)
        os.environ["XLA_FLAGS"] = SINGLE_THREAD_XLA
    t0 = time.perf_counter()
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="host_sync_") as tmp:
        for rep in range(args.reps):
            for v in VARIANTS:
                out = run_variant(v, args.steps, Path(tmp) / f"{v}_{rep}")
                runs[v].append(out)
                load.append(os.getloadavg()[0])
                print(out, f"load {load[-1]:.1f}", flush=True)
    host_s = host_batch_s()
    table = report(args, runs, load, time.perf_counter() - t0, host_s)
    print(table)
    if not args.no_write:
        write_section("host_sync_xla1" if args.xla_threads == 1 else "host_sync", table)


if __name__ == "__main__":
    main()
