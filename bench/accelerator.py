"""Accelerator benchmark: matmul peak, attention kernels, and the stage-2 / stage-3 train
steps as the trainer builds them, with model FLOPs, MFU and peak memory. Any backend.

Sizes (``--size``):

* ``test``: ``tiny`` with 1 LLM layer, 2 frames of 32 px, text 32 (the test's size);
* ``tiny`` (CPU, < 2 min on 2 cores): the demo preset's model (CLIP 64 px / patch 8, STC
  connector, F / G ngf 8, Mistral 2 layers d 64, LoRA r 8), 4 frames, batch 2, text 64,
  float32;
* ``small`` (CPU): tiny CLIP (32 px / patch 4) with ``bench/train_step.py``'s LLM (Mistral
  4 layers, d 512, 8 / 2 heads, FFN 1536, vocab 32000), 4 frames, batch 4, text 256, float32;
* ``mid`` (one GPU / TPU chip): the paper's CLIP-L/14-336 towers, STC connectors and F / G
  (ngf 256) with Mistral-7B's layer (d 4096, 32 / 8 heads, FFN 14336, vocab 32000) x 8 layers,
  LoRA r 128 / alpha 256 / dropout 0.1 at stage 3, 8 frames at 336 px, batch 2, text 512,
  bfloat16, remat ``full`` (the paper config's); stage-3 sequence 512 - 1 + 2 x 845 = 2201;
* ``paper``: the paper model (32 layers, 16 frames), batch 1, text 512; meant for
  ``--flops-only`` (model FLOPs per example from abstract shapes, nothing allocated) or a
  large accelerator.

What it measures, each part in its own worker process (its own device memory and peak
statistics; ``--isolate no`` / ``--in-process``: all in this one, the default when
``JAX_PLATFORMS=cpu``, where there are no memory statistics and process start-ups would
cost more than the tiny steps):

1. the matmul peak: one large square ``jnp.dot`` in the size's compute dtype, and two
   independent ones in one program (XLA:CPU may run a single dot on one thread), the faster;
   measured by every worker just before its timed steps, the table gives their median;
2. attention alone, forward + backward (``jax.vjp``) of ``models.attention.attend`` per
   implementation this backend has (``xla``, ``cudnn``, ``splash``, ``reference``) at the
   stage-3 sequence length (text + 2 x visual tokens - 1), causal, the second row
   right-padded; FLOPs counted as the full square (12·B·T²·N·H);
3. the full stage-3 and stage-2 train steps: the stage config (``configs/common``) at this
   size, resolved by ``config_lib.resolve``, random init (``runtime.init_params``), trainable
   / frozen split, frozen weights cast to the compute dtype (``cast_frozen``), the trainer's
   ``jit_train_step`` compiled by ``CompiledSteps`` on a one-device mesh, synthetic batches
   (uint8 frames, random text with ``<video>`` after 16 tokens); per attention
   implementation: compile time, step time (median of ``--steps``, each step waited for),
   model FLOPs the trainer's way (``training.perf``: XLA's count of the compiled step x the
   remat ratio) and counted on the same step with unrolled layers, no remat and ``xla``
   attention (XLA counts a scanned layer body once and a kernel's custom call as zero),
   MFU against the measured peak and the chip's nominal one (``perf.PEAK_TFLOPS``), peak
   device memory (``memory_stats()``; "n/a" where the backend has none, as on CPU) and
   XLA's plan (``memory_analysis()``), and the first step's loss, which must agree across
   implementations (tolerance: 1e-4 relative in float32, 1e-2 in bfloat16).

Prints the tables and replaces the section ``accelerator_<size>`` of bench/RESULTS.md.
``--budget-s`` (default 420 s) skips the remaining rows once the next would not fit (a
step row is assumed to take as long as the longest one so far; a worker still running at
the budget + 60 s is stopped), so a run stays under 8 minutes; skipped rows are listed. The
step rows run what ``auto`` picks first, then the other kernels, stage 3 before stage 2.

Budget at ``mid`` (an estimate, not measured: no accelerator here): counted model FLOPs are
54.5 TFLOP per stage-3 step and 66.4 per stage-2 step (``--flops-only``), so 10 steps take
~1.4 s / ~1.7 s on an H100 at 40% MFU (~7 s / ~8 s on a TPU v5e chip); the time goes to
start-up, random init and compilation, assumed <= 90 s per step row. Four step rows, the
attention kernels and start-ups then fit in ~7 minutes; if compilation is slower the last
rows (stage 2's non-default kernel first) are skipped rather than overrunning.

    python bench/accelerator.py [--size tiny|small|mid|paper] [--steps N] [--stages 3,2]
        [--impls xla,cudnn] [--remat full] [--budget-s 420] [--isolate auto|yes|no]
        [--in-process] [--no-write]
    python bench/accelerator.py --size paper --flops-only   # FLOPs per example, any host
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from results import write_section  # bench/results.py (this script's directory)

HERE = Path(__file__).resolve().parent
MARK = "@@ACC@@"  # worker replies on stdout (libraries may print too)
PREFIX = 16  # text tokens before <video>
IMPLS = ("xla", "cudnn", "splash", "reference")


@dataclasses.dataclass(frozen=True)
class Size:
    preset: str  # configs/common preset the size starts from
    overrides: dict
    batch: int
    text: int
    steps: int  # default timed steps
    peak_n: int  # square matmul size of the peak measurement


_TEST = {  # the smallest model the stage configs allow: for tests/test_bench_accelerator.py
    "model.llm.num_layers": 1,
    "model.num_frames": 2,
    "model.image_size": 32,
    "model.mapping.n_blocks": 1,
}
_SMALL_LLM = {
    "model.llm.hidden_size": 512,
    "model.llm.intermediate_size": 1536,
    "model.llm.num_layers": 4,
    "model.llm.num_heads": 8,
    "model.llm.num_kv_heads": 2,
    "model.vocab_size": 32000,
    "model.image_size": 32,
    "model.patch_size": 4,
    "model.lora.rank": 16,
    "model.lora.alpha": 32,
}
SIZES = {
    "test": Size("demo", _TEST, batch=2, text=32, steps=2, peak_n=512),
    "tiny": Size("demo", {}, batch=2, text=64, steps=3, peak_n=1024),
    "small": Size("demo", _SMALL_LLM, batch=4, text=256, steps=5, peak_n=2048),
    "mid": Size(
        "paper",
        {"model.llm.num_layers": 8, "model.num_frames": 8},
        batch=2,
        text=512,
        steps=10,
        peak_n=8192,
    ),
    "paper": Size("paper", {}, batch=1, text=512, steps=5, peak_n=8192),
}


# ----------------------------------------------------------------------------- config

_OVERRIDES: dict[str, int] = {}  # --batch / --text over the size's


def size_of(size: str) -> Size:
    """The size with ``--batch`` / ``--text`` applied."""
    return dataclasses.replace(SIZES[size], **_OVERRIDES)


def stage_config(size: str, stage: int, impl: str, remat: str | None = None):
    """The stage's config at ``size`` on one device, random init, attention ``impl``."""
    from configs import common

    s = size_of(size)
    c = common.base_config(stage, s.preset)
    c.update_from_flattened_dict(dict(s.overrides))
    c.model.attention_impl = impl
    if remat:
        c.model.remat_policy = remat
    c.data.max_text_len = s.text
    c.optim.batch_size = s.batch
    c.optim.grad_accum = 1
    c.mesh.shape = (1, 1, 1)
    c.init.stages = ()
    c.init.llm = c.init.clip = c.init.mm_projector = c.init.converted = ""
    c.init.allow_random = True
    return c


def synthetic_batch(stage, model_cfg, batch: int, text: int, seed: int = 0) -> dict:
    """One host batch as the input pipeline yields it: uint8 frames, right-padded text with
    one ``<video>`` after :data:`PREFIX` tokens, labels on the text after the video."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = model_cfg.llm.vocab_size
    ids = rng.integers(3, vocab, (batch, text)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, PREFIX] = model_cfg.video_token_index
    mask = np.ones_like(ids)
    if batch > 1:  # row 1 right-padded by an eighth
        pad = max(1, text // 8)
        mask[1, -pad:] = 0
        ids[1, -pad:] = 0
    labels = np.where(mask == 1, ids, -100).astype(np.int32)
    labels[:, : PREFIX + 1] = -100
    size = model_cfg.clip.image_size
    shape = (batch, model_cfg.num_frames, size, size, 3)

    def frames():
        return rng.integers(0, 256, shape, dtype=np.uint8)

    out = {}
    for name in stage.batches:
        b = dict(input_ids=ids, labels=labels, attention_mask=mask)
        if name == "pair":
            b.update(ego_frames=frames(), exo_frames=frames())
        else:
            b["frames"] = frames()
        out[name] = b
    return out


def seq_len(size: str) -> int:
    """The stage-3 LLM sequence: text + visual tokens in the prompt - 1 (the sentinel)."""
    from exo2ego_jax import config_lib

    cfg = config_lib.build_model_config(stage_config(size, 3, "xla").model)
    return size_of(size).text + cfg.visual_tokens_in_prompt - 1


# ----------------------------------------------------------------------------- measures


def _median_time(fn, n: int) -> tuple[float, float]:
    import jax

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def matmul_peak(n: int, dtype: str, reps: int = 5) -> dict:
    """FLOP/s of one ``n x n`` dot, and of two independent ones in one program."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in (1, 2))
    one = jax.jit(jnp.dot).lower(a, b).compile()
    two = jax.jit(lambda a, b: (a @ b, b @ a)).lower(a, b).compile()
    jax.block_until_ready((one(a, b), two(a, b)))
    t1, _ = _median_time(lambda: one(a, b), reps)
    t2, _ = _median_time(lambda: two(a, b), reps)
    f1, f2 = 2 * n**3 / t1, 4 * n**3 / t2
    return {"one": f1, "two": f2, "best": max(f1, f2), "n": n, "dtype": dtype}


def device_info() -> dict:
    import jax

    from exo2ego_jax.models.attention import current_backend
    from exo2ego_jax.training.perf import nominal_peak_tflops

    d = jax.devices()[0]
    return {
        "backend": current_backend(),
        "device_kind": d.device_kind,
        "devices": jax.device_count(),
        "nominal_tflops": nominal_peak_tflops(d),
        "jax": jax.__version__,
    }


def peak_memory() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backend without memory stats
        stats = None
    if not stats:
        return None
    return float(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0))) or None


def available_impls(dtype, head_dim: int, q_len: int) -> dict[str, str]:
    """``{impl: kernel or 'n/a: reason'}`` for every named implementation on this backend."""
    from exo2ego_jax.models.attention import (
        AttentionImplError,
        current_backend,
        resolve_attention_impl,
    )

    out = {}
    for impl in ("auto", *IMPLS):
        try:
            out[impl] = resolve_attention_impl(
                impl, current_backend(), dtype=dtype, head_dim=head_dim, q_len=q_len
            )
        except AttentionImplError as e:
            out[impl] = f"n/a: {e}"
    return out


def attention_rows(size: str, steps: int) -> dict:
    """Forward + backward of ``attend`` per available implementation at the stage-3 length."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from exo2ego_jax import config_lib
    from exo2ego_jax.models.attention import MaskSpec, attend

    s = size_of(size)
    cfg = config_lib.build_model_config(stage_config(size, 3, "xla").model).llm
    b, t = s.batch, seq_len(size)
    n, k, h, dtype = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    kk = jax.random.normal(keys[1], (b, t, k, h), dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), dtype)
    do = jax.random.normal(keys[3], (b, t, n, h), dtype)
    valid = np.ones((b, t), bool)
    if b > 1:
        valid[1, t - max(1, s.text // 8) :] = False
    mask = MaskSpec(key_valid=jnp.asarray(valid), causal=True, window=cfg.sliding_window)
    kinds = available_impls(dtype, h, t)
    flops = 12 * b * t * t * n * h  # QKᵀ + PV forward (4·B·T²·N·H) and twice that backward
    rows, ref = [], None
    for impl in IMPLS:
        if kinds[impl].startswith("n/a"):
            rows.append({"impl": impl, "kernel": kinds[impl]})
            continue

        def fwd_bwd(q, k, v, do, impl=impl):
            out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask, impl=impl), q, k, v)
            return (out, *vjp(do))

        t0 = time.perf_counter()
        fn = jax.jit(fwd_bwd).lower(q, kk, v, do).compile()
        compile_s = time.perf_counter() - t0
        out = fn(q, kk, v, do)
        jax.block_until_ready(out)
        med, lo = _median_time(lambda fn=fn: fn(q, kk, v, do), max(steps, 3))
        real = np.asarray(out[0], np.float32)[valid]  # real queries only (pads differ by kernel)
        if ref is None:
            ref = real
        rows.append(
            {
                "impl": impl,
                "kernel": kinds[impl],
                "compile_s": compile_s,
                "s": med,
                "s_min": lo,
                "flops": flops,
                "max_diff": float(np.max(np.abs(real - ref))),
            }
        )
    return {
        "rows": rows,
        "shape": dict(B=b, T=t, N=n, K=k, H=h, dtype=jnp.dtype(dtype).name),
        "auto": kinds["auto"],
        "peak": matmul_peak(s.peak_n, jnp.dtype(dtype).name),
    }


def flops_only(size: str, stage_no: int) -> dict:
    """Model FLOPs per step and per example of ``stage_no`` at ``size`` (abstract shapes)."""
    from exo2ego_jax import config_lib
    from exo2ego_jax.models.exo2ego import Exo2Ego
    from exo2ego_jax.training.optim import make_optimizer
    from exo2ego_jax.training.step import model_flops_per_step

    config = stage_config(size, stage_no, "xla")
    resolved = config_lib.resolve(config, num_devices=1, check_inputs=False)
    s = size_of(size)
    batch = synthetic_batch(resolved.stage, resolved.model, s.batch, s.text)
    t0 = time.perf_counter()
    flops = model_flops_per_step(
        Exo2Ego(resolved.model), resolved.stage, make_optimizer(config.optim, 1000), batch
    )
    return {
        "stage": stage_no,
        "flops_unrolled": flops,
        "per_example": flops / s.batch if flops else None,
        "batch": s.batch,
        "seconds": time.perf_counter() - t0,
    }


def step_row(size: str, stage_no: int, impl: str, steps: int, remat: str | None, count: bool):
    """The stage's train step built as the trainer builds it, timed on one device."""
    import jax

    from exo2ego_jax import config_lib, runtime, stages
    from exo2ego_jax import sharding as sharding_lib
    from exo2ego_jax.models.exo2ego import Exo2Ego
    from exo2ego_jax.training.optim import make_optimizer
    from exo2ego_jax.training.step import (
        CompiledSteps,
        TrainState,
        batch_shardings,
        cast_frozen,
        jit_train_step,
        model_flops_per_step,
        shardings_of,
    )

    config = stage_config(size, stage_no, impl, remat)
    resolved = config_lib.resolve(config, num_devices=1, check_inputs=False)
    model, stage, rules = Exo2Ego(resolved.model), resolved.stage, resolved.rules
    mesh = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    optimizer = make_optimizer(config.optim, 1000)
    s = size_of(size)
    t_start = time.perf_counter()
    with sharding_lib.sharding_context(mesh, rules):
        params, shardings = runtime.init_params(model, mesh, rules, config.seed)
        trainable, frozen = stages.split_params(params, stages.trainable_patterns(stage, model))
        del params
        frozen = cast_frozen(frozen, model.config.llm.dtype)
        n_train, n_frozen = stages.count_params(trainable), stages.count_params(frozen)
        opt_shardings = sharding_lib.optimizer_state_shardings(
            optimizer, shardings_of(trainable), trainable
        )
        state = TrainState(
            trainable, jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
        )
        host = synthetic_batch(stage, model.config, s.batch, s.text)
        jitted = jit_train_step(
            model,
            stage,
            optimizer,
            state_shardings=shardings_of(state),
            frozen_shardings=shardings_of(frozen),
            batch_shardings=batch_shardings(host, mesh, rules),
        )
        rng = jax.random.key(config.seed + 1)
        batch = sharding_lib.shard_batch(host, mesh, rules)
        args = (state, frozen, batch, rng)
        # The trainer's own count (one device here, so per device == per step).
        count_flops = (
            (lambda b: model_flops_per_step(model, stage, optimizer, b)) if count else None
        )
        compiled_steps = CompiledSteps(jitted, count_flops=count_flops)
        executable = compiled_steps.compiled(*args)
        key = CompiledSteps.key(batch)
        compile_s = compiled_steps.seconds[key]
        try:
            mem = executable.memory_analysis()
            plan = sum(
                int(getattr(mem, f, 0))
                for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
            ) - int(getattr(mem, "alias_size_in_bytes", 0))
        except Exception:  # noqa: BLE001 - backend without memory analysis
            plan = None
        state, metrics, flops = compiled_steps(state, frozen, batch, rng)
        first = jax.device_get(metrics)
        peak = matmul_peak(s.peak_n, jax.numpy.dtype(model.config.llm.dtype).name)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics, _ = compiled_steps(state, frozen, batch, jax.random.fold_in(rng, i + 1))
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    del state, frozen, batch
    return {
        "stage": stage_no,
        "impl": impl,
        "kernel": available_impls(
            model.config.llm.dtype,
            model.config.llm.head_dim,
            s.text + model.config.visual_tokens_in_prompt - 1,
        )[impl],
        "remat": model.config.llm.remat_policy,
        "dtype": jax.numpy.dtype(model.config.llm.dtype).name,
        "seq": s.text + model.config.visual_tokens_in_prompt - 1,
        "batch": s.batch,
        "compile_s": compile_s,
        "s": statistics.median(times),
        "s_min": min(times),
        "times": times,
        "flops_unrolled": flops,
        "loss": float(first["loss"]),
        "peak_memory": peak_memory(),
        "plan_bytes": plan,
        "params_trainable": n_train,
        "params_frozen": n_frozen,
        "peak": peak,
        "wall_s": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------- workers


def _reply(obj) -> None:
    print(MARK + json.dumps(obj), flush=True)


def worker(args) -> None:
    """One measurement in this process, answered as one JSON line."""
    kind = args.worker
    if kind == "info":
        _reply(device_info())
    elif kind == "attention":
        _reply(attention_rows(args.size, args.steps))
    elif kind == "step":
        _reply(step_row(args.size, args.stage, args.impl, args.steps, args.remat, args.count))
    elif kind == "flops":
        _reply(flops_only(args.size, args.stage))


def run_worker(argv: list[str], timeout: float | None) -> dict:
    """``argv`` in a fresh process (its own device memory and peak statistics)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p
    )
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or "")[-3000:]
    return {"error": f"worker exited {proc.returncode}: {tail.strip().splitlines()[-1:]}",
            "stderr": tail}  # fmt: skip


def _apply_overrides(ns) -> None:
    _OVERRIDES.clear()
    _OVERRIDES.update({k: v for k, v in (("batch", ns.batch), ("text", ns.text)) if v})


def run_in_process(argv: list[str]) -> dict:
    ns = build_parser().parse_args(argv)
    _apply_overrides(ns)
    try:
        if ns.worker == "info":
            return device_info()
        if ns.worker == "attention":
            return attention_rows(ns.size, ns.steps)
        if ns.worker == "step":
            return step_row(ns.size, ns.stage, ns.impl, ns.steps, ns.remat, ns.count)
        return flops_only(ns.size, ns.stage)
    except Exception as e:  # noqa: BLE001 - a failed row is reported, the others still run
        return {"error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- report


def _t(flops: float | None) -> str:
    return "n/a" if not flops else f"{flops / 1e12:.3g}"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _gib(x: float | None) -> str:
    return "n/a" if not x else f"{x / 2**30:.2f}"


def loss_tolerance(dtype: str) -> float:
    return 1e-4 if dtype == "float32" else 1e-2


def report(args, info: dict, att: dict | None, steps: list[dict], skipped: list[str], load, total):
    size = size_of(args.size)
    peaks = [r["peak"]["best"] for r in steps if "peak" in r]
    if att and "peak" in att:
        peaks.append(att["peak"]["best"])
    measured = statistics.median(peaks) if peaks else None
    nominal = info.get("nominal_tflops")
    peak_desc = ""
    if att and "peak" in att:
        p = att["peak"]
        peak_desc = f"{p['n']}² {p['dtype']} `jnp.dot` (or two independent ones in one program)"
    cmd = "python bench/accelerator.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a not in ("--no-write",)
    )
    lines = [
        f"## Accelerator benchmark, size {args.size}: {info['backend']} ({info['device_kind']})",
        "",
        f"`{cmd}` — {datetime.date.today().isoformat()}, jax {info['jax']}, "
        f"{info['devices']} device(s) of which 1 used, {os.cpu_count()} host CPUs (XLA's "
        f"default threads); load average {load[0]:.1f} at start, {load[1]:.1f} at the end "
        f"(a shared machine: other jobs ran too); whole run {total:.0f}s. Batch "
        f"{size.batch}, text {size.text}, stage-3 sequence {seq_len(args.size)} tokens "
        f"(text + 2 x visual - 1); "
        f"{'all parts in one process' if args.in_process else 'one process per part'}; "
        "timed steps "
        f"{args.steps or size.steps} per row after one untimed first step; random init.",
        "",
        "| device | nominal peak TFLOP/s (perf.PEAK_TFLOPS) | measured matmul peak TFLOP/s | "
        "auto attention |",
        "|---|---:|---:|---|",
        f"| {info['device_kind']} | {nominal if nominal else 'n/a'} | "
        f"{_t(measured)} ({peak_desc}; median of {len(peaks)} measurements, one per part, range "
        f"{_t(min(peaks) if peaks else None)}–{_t(max(peaks) if peaks else None)}) | "
        f"{att['auto'] if att else 'n/a'} |",
    ]
    if att:
        sh = att["shape"]
        lines += [
            "",
            f"### Attention alone: forward + backward, B {sh['B']}, T = S = {sh['T']}, "
            f"{sh['N']} query / {sh['K']} KV heads of {sh['H']}, {sh['dtype']}, causal, "
            "row 2 right-padded",
            "",
            "| implementation | kernel | ms, median (min) | TFLOP/s (12·B·T²·N·H) | "
            "of measured peak | max abs diff vs first (real queries) | compile s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in att["rows"]:
            if "s" not in r:
                lines.append(f"| {r['impl']} | {r['kernel']} | — | — | — | — | — |")
                continue
            rate = r["flops"] / r["s"]
            lines.append(
                f"| {r['impl']} | {r['kernel']} | {r['s'] * 1e3:.2f} ({r['s_min'] * 1e3:.2f}) | "
                f"{_t(rate)} | {_pct(rate / measured if measured else None)} | "
                f"{r['max_diff']:.2e} | {r['compile_s']:.1f} |"
            )
    lines += [
        "",
        "### Train steps (`jit_train_step` + `CompiledSteps`, one device)",
        "",
        "| stage | attention (kernel) | remat | compile s | s/step, median (min) | "
        "model TFLOP/step | model TFLOP/s | MFU vs measured | MFU vs nominal | "
        "peak memory GiB (XLA plan) | first-step loss | |Δ loss| vs first impl |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    counted = {r["stage"]: r["flops_unrolled"] for r in steps if r.get("flops_unrolled")}
    first_loss: dict[int, float] = {}
    loss_ok = True
    for r in steps:
        if "error" in r:
            lines.append(
                f"| {r.get('stage', '?')} | {r.get('impl', '?')} | error: {r['error']} |" + " |" * 9
            )
            continue
        flops = counted.get(r["stage"])
        rate = flops / r["s"] if flops else None
        first_loss.setdefault(r["stage"], r["loss"])
        diff = abs(r["loss"] - first_loss[r["stage"]])
        tol = loss_tolerance(r["dtype"]) * max(1.0, abs(first_loss[r["stage"]]))
        loss_ok &= diff <= tol
        lines.append(
            f"| {r['stage']} | {r['impl']} ({r['kernel']}) | {r['remat']} | "
            f"{r['compile_s']:.1f} | {r['s']:.3f} ({r['s_min']:.3f}) | "
            f"{_t(flops)} | {_t(rate)} | {_pct(rate / measured if rate and measured else None)} | "
            f"{_pct(rate / (nominal * 1e12) if rate and nominal else None)} | "
            f"{_gib(r['peak_memory'])} ({_gib(r['plan_bytes'])}) | {r['loss']:.6f} | "
            f"{diff:.1e}{'' if diff <= tol else ' ✗'} |"
        )
    ok_steps = [r for r in steps if "error" not in r]
    if ok_steps:
        r0 = ok_steps[0]
        lines += [
            "",
            f"Parameters: stage {r0['stage']} {r0['params_trainable']:,} trainable, "
            f"{r0['params_frozen']:,} frozen ({r0['dtype']} compute, frozen weights cast to it). "
            "Model FLOPs: the trainer's own count (`training.step.model_flops_per_step`: XLA's "
            "count of the step lowered with unrolled layers, no remat and `xla` attention, "
            "so full-square attention FLOPs; a compiled scanned body or a kernel's custom "
            "call would be undercounted), counted on the first row of each stage. First-step "
            f"losses {'agree' if loss_ok else 'DO NOT agree'} across implementations within "
            f"{loss_tolerance(r0['dtype']):g} x max(1, loss) ({r0['dtype']}). Peak memory: "
            "`memory_stats()['peak_bytes_in_use']` of the worker process (n/a on CPU), in "
            "brackets XLA's plan of the compiled step (arguments + outputs + temporaries - "
            "aliased).",
        ]
    if skipped:
        lines += ["", f"Skipped (time budget {args.budget_s:.0f}s): {', '.join(skipped)}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=tuple(SIZES))
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--stages", default="3,2", help="train-step stages, in order")
    p.add_argument(
        "--impls",
        default="",
        help="attention implementations of the train-step rows (default: every one this "
        "backend has; 'reference' only on CPU)",
    )
    p.add_argument("--remat", default=None, help="remat policy (default: the size's config)")
    p.add_argument("--batch", type=int, default=None, help="batch over the size's")
    p.add_argument("--text", type=int, default=None, help="text length over the size's")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip rows past this")
    p.add_argument(
        "--isolate",
        default="auto",
        choices=("auto", "yes", "no"),
        help="one worker process per measurement (auto: yes unless JAX_PLATFORMS=cpu)",
    )
    p.add_argument("--in-process", action="store_true", help="= --isolate no")
    p.add_argument("--flops-only", action="store_true", help="model FLOPs per example only")
    p.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    # worker side
    p.add_argument(
        "--worker", choices=("info", "attention", "step", "flops"), help=argparse.SUPPRESS
    )
    p.add_argument("--stage", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--impl", default="xla", help=argparse.SUPPRESS)
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    _apply_overrides(args)
    if args.worker:
        worker(args)
        return
    steps = args.steps or SIZES[args.size].steps
    in_process = args.in_process or args.isolate == "no"
    if args.isolate == "auto" and not args.in_process:
        # The parent must not open an accelerator (a TPU admits one process; JAX
        # preallocates most of a GPU), so only an explicit CPU platform runs in-process.
        in_process = os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
    args.in_process = in_process
    stage_list = [int(x) for x in args.stages.split(",") if x]
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]

    def call(extra: list[str], timeout: float | None = None) -> dict:
        argv_ = ["--size", args.size, "--steps", str(steps), *extra]
        for flag in ("remat", "batch", "text"):
            if getattr(args, flag):
                argv_ += [f"--{flag}", str(getattr(args, flag))]
        return run_in_process(argv_) if in_process else run_worker(argv_, timeout)

    if args.flops_only:
        rows = [call(["--worker", "flops", "--stage", str(s)]) for s in stage_list]
        print(json.dumps(rows, indent=1))
        return

    info = call(["--worker", "info"])
    if "error" in info:
        raise SystemExit(f"cannot start JAX: {info['error']}")
    print(f"device: {info}", flush=True)
    att = call(["--worker", "attention"])
    if "error" in att:
        print(f"attention: {att['error']}", flush=True)
        att = None
    else:
        for r in att["rows"]:
            print(f"attention {r}", flush=True)
    if args.impls:
        impls = [x for x in args.impls.split(",") if x]
    else:
        kinds = {r["impl"]: r["kernel"] for r in att["rows"]} if att else {"xla": "xla"}
        impls = [
            i
            for i in IMPLS
            if not kinds.get(i, "n/a").startswith("n/a")
            and (i != "reference" or info["backend"] == "cpu")
        ]
        auto = att["auto"] if att else "xla"
        impls.sort(key=lambda i: i != auto)  # what `auto` runs first: it is what trains
    rows, skipped, longest = [], [], 0.0
    for stage in stage_list:
        for k, impl in enumerate(impls):
            elapsed = time.perf_counter() - t_start
            if rows and elapsed + longest > args.budget_s:
                skipped.append(f"stage {stage} / {impl}")
                continue
            t0 = time.perf_counter()
            extra = ["--worker", "step", "--stage", str(stage), "--impl", impl]
            timeout = max(120.0, args.budget_s + 60.0 - elapsed)  # a hung compile ends too
            row = call(extra + (["--count"] if k == 0 else []), timeout)
            row.setdefault("stage", stage)
            row.setdefault("impl", impl)
            longest = max(longest, time.perf_counter() - t0)
            print(
                f"stage {stage} {impl}: "
                + json.dumps({k: v for k, v in row.items() if k not in ("times", "stderr")}),
                flush=True,
            )
            rows.append(row)
    table = report(
        args,
        info,
        att,
        rows,
        skipped,
        (load0, os.getloadavg()[0]),
        time.perf_counter() - t_start,
    )
    print(table)
    if not args.no_write:
        write_section(f"accelerator_{args.size}", table)


if __name__ == "__main__":
    main()
