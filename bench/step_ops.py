"""Where one demo train step's device time goes, op by op, grouped by the model part.

``training.loop.train`` runs ``--steps`` steps of a stage's ``demo`` preset (random init, batch
``--batch``, fed by ``tests/train_helpers.CountingStream``, a host sync after each step);
steps 5-9 are traced (``jax.profiler``, perfetto JSON). Each XLA op of the trace is matched
to its HLO instruction in the compiled step (``--xla_dump_to``) and charged to the module path
in its ``op_name`` metadata, as forward or backward (``transpose(jvp(...))``), cut to
``--depth`` path parts. The tables give milliseconds per step and the share of all op time, by
model part and by XLA op kind (``copy_*`` / ``transpose_*`` are layout changes, ``ynn_fusion``
the matmul / convolution library's fused calls). Section ``step_ops`` of
``bench/RESULTS.md``.

    python bench/step_ops.py [--stages 0,3] [--batch 8] [--depth 3] [--top 20] [--no-write]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

_DUMP = tempfile.mkdtemp(prefix="step_ops_hlo_")
# Before JAX is imported: XLA reads its flags once.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_dump_to={_DUMP} --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step.*"
)
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import jax  # noqa: E402
from results import write_section  # noqa: E402  (bench/results.py)
from stage_step_cost import bench_config  # noqa: E402
from train_helpers import streams_for  # noqa: E402

from exo2ego_jax.training import loop  # noqa: E402
from exo2ego_jax.training.step import CompiledSteps  # noqa: E402

TRACED = range(5, 10)  # the steps traced (1-based calls of the compiled step)
_SKIP = ("jvp(", "transpose(", "pjit", "jit(", "remat", "checkpoint", "while", "body", "cond")


def trace_stage(stage: int, batch: int, trace_dir: Path) -> Path:
    """Trains ``max(TRACED) + 2`` steps of the stage, tracing :data:`TRACED`; returns the
    perfetto trace file."""
    original, calls = CompiledSteps.__call__, [0]

    def traced(self, *a, **kw):
        calls[0] += 1
        if calls[0] == TRACED.start:
            jax.profiler.start_trace(str(trace_dir), create_perfetto_trace=True)
        out = original(self, *a, **kw)
        jax.block_until_ready(out[:2])
        if calls[0] == TRACED.stop - 1:
            jax.profiler.stop_trace()
        return out

    c = bench_config(stage, TRACED.stop + 2, batch)
    CompiledSteps.__call__ = traced
    try:
        with tempfile.TemporaryDirectory() as wd:
            streams = streams_for(stage, batch=batch, n=16 * TRACED.stop)
            loop.train(c, wd, streams=streams, log=lambda _: None, progress=False)
    finally:
        CompiledSteps.__call__ = original
    return sorted(trace_dir.glob("**/perfetto_trace.json.gz"))[-1]


def op_names() -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata, from the compiled train step."""
    path = sorted(glob.glob(f"{_DUMP}/*jit_step.cpu_after_optimizations.txt"))[-1]
    names = {}
    for m in re.finditer(
        r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", Path(path).read_text(), re.M
    ):
        names[m.group(1)] = m.group(2)
    return names


def part(op_name: str, depth: int) -> str:
    """``jit(step)/transpose(jvp(MistralLM))/while/body/.../layers/mlp/...`` -> ``bwd
    layers/mlp``: direction and the first ``depth`` module path parts."""
    direction = "bwd" if "transpose(" in op_name else "fwd"
    parts = [p for p in op_name.split("/") if p and not p.startswith(_SKIP)]
    return f"{direction} {'/'.join(parts[:depth]) or '(step)'}"


def component(op_name: str) -> str:
    """The outermost Flax module of ``op_name`` (``CLIPVisionTower``, ``STCConnector``,
    ``MappingNetwork``, ``MistralLM``), or ``loss / optimizer / glue`` outside them."""
    m = re.search(r"jvp\((\w+)\)", op_name)
    return m.group(1) if m else "loss / optimizer / glue"


def attribute(trace: Path, depth: int) -> dict[str, collections.Counter]:
    """ms per step by component, by model part and by op kind; ``total`` under ``all``."""
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names, steps = op_names(), len(TRACED)
    counts = {k: collections.Counter() for k in ("component", "part", "kind", "all")}
    for e in events:
        op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
        if op is None:
            continue
        ms = e["dur"] / 1e3 / steps
        name = names.get(op)
        counts["all"]["total"] += ms
        counts["component"][component(name) if name else "(no metadata: layout copies)"] += ms
        counts["part"][part(name, depth) if name else "(no metadata)"] += ms
        counts["kind"][re.sub(r"\.\d+$", "", op)] += ms
    return counts


def table(title: str, counts: collections.Counter, total: float, top: int) -> list[str]:
    rows = [f"| {title} | ms / step | share |", "|---|---:|---:|"]
    for name, ms in counts.most_common(top):
        rows.append(f"| `{name}` | {ms:.1f} | {100 * ms / total:.0f} % |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="0,3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()[0]
    out = [
        f"## One demo train step, op by op (CPU, float32, batch {args.batch})",
        "",
        f"`python bench/step_ops.py --stages {args.stages} --batch {args.batch} --depth "
        f"{args.depth}` — {datetime.date.today()}, {os.cpu_count()} CPUs, load average "
        f"(1 min) {load:.1f} at the start; {{end}}. Random init, a host sync per step, steps "
        f"{TRACED.start}-{TRACED.stop - 1} traced; op times as the trace gives them (the "
        "profiler slows ops a little; two XLA threads may overlap, so the sum can pass the "
        "wall time).",
    ]
    for stage in (int(s) for s in args.stages.split(",")):
        shutil.rmtree(_DUMP)  # keep this stage's compiled step only
        os.mkdir(_DUMP)
        with tempfile.TemporaryDirectory() as trace_dir:
            counts = attribute(trace_stage(stage, args.batch, Path(trace_dir)), args.depth)
        total = counts["all"]["total"]
        out += ["", f"### Stage {stage}: {total:.0f} ms of ops per step", ""]
        out += table("component", counts["component"], total, 10)
        out += [""] + table("model part (fwd / bwd, module path)", counts["part"], total, args.top)
        out += [""] + table("XLA op kind", counts["kind"], total, 10)
    seconds = time.perf_counter() - start
    end = f"load average {os.getloadavg()[0]:.1f} at the end; whole run {seconds:.0f}s"
    text = "\n".join(out).replace("{end}", end)
    print(text)
    if not args.no_write:
        write_section("step_ops", text)


if __name__ == "__main__":
    main()
