"""Sharded training of one Exo2Ego stage: config in, checkpoints and TensorBoard logs out.

``train(config, workdir)`` runs one stage (method.md §4) on a ``('data', 'fsdp', 'tensor')``
mesh:

1. resolve the config (every field validated before any compute), build the mesh and the
   model;
2. assemble the parameters (``runtime.build_params``: random init sharded, pretrained
   weights, earlier stages' checkpoints) and split them into the stage's trainable subtree
   and the frozen rest;
3. compile the train step (``training.step.jit_train_step``) ahead of time, logging
   ``memory_analysis()``;
4. loop: host batches -> global arrays -> step; TensorBoard (and ``metrics.jsonl``) +
   progress bar; NaN/Inf stops with a clear error; Orbax checkpoints (trainable params,
   optimizer state, step, Grain iterator state, config) every N steps; a restarted run
   resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from exo2ego_jax import config_lib, runtime, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.config_lib import ConfigError, ResolvedConfig
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.optim import make_optimizer, make_schedule
from exo2ego_jax.training.perf import Profiler, StageTiming, nominal_peak_tflops, perf_scalars
from exo2ego_jax.training.step import (
    CompiledSteps,
    TrainState,
    abstract_of,
    cast_frozen,
    jit_train_step,
    model_flops_per_device,
    shardings_of,
)
from exo2ego_jax.training.streams import Stream, length_buckets, make_streams, trim_to_buckets
from input_pipeline import atomic
from input_pipeline.progress import bar as progress_bar

Log = Callable[[str], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


class BadDataError(RuntimeError):
    """More of a stream's examples were unreadable than ``config.data.max_bad_fraction``."""


@dataclasses.dataclass
class _Run:
    """Everything the loop reads but never changes."""

    resolved: ResolvedConfig
    workdir: Path
    step_fn: CompiledSteps  # the train step, compiled per batch shape
    trim: Callable[[dict], dict]  # pads a host batch's text to its bucket
    frozen: Any
    iterators: dict[str, Any]
    mesh: jax.sharding.Mesh
    ckpt: checkpoints.StageCheckpointer
    total_steps: int
    schedule: Callable[[int], float]
    rng: jax.Array
    log: Log
    progress: bool
    peak_tflops: float | None
    profiler: Profiler
    timing: StageTiming  # where the stage's wall time goes (the loop's laps)


def _log_memory(compiled, log: Log) -> dict[str, float]:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 — not every backend implements it
        mem = None
    if mem is None:
        return {}
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f: float(getattr(mem, f, 0)) for f in fields}
    log(
        "train step memory per device: "
        + ", ".join(
            f"{k.replace('_size_in_bytes', '')}={v / 2**20:.1f} MiB" for k, v in out.items()
        )
    )
    return out


def _steps(config: Any, streams: Mapping[str, Stream]) -> tuple[int, int]:
    """``(optimizer updates, steps per epoch)`` of ``config.optim`` over the streams."""
    o = config.optim
    steps_per_epoch = max(
        1, math.ceil(max(s.num_examples for s in streams.values()) / o.batch_size)
    )
    updates = o.num_steps if o.num_steps > 0 else o.num_epochs * steps_per_epoch
    return updates, steps_per_epoch


def train(
    config: Any,
    workdir: str | Path,
    *,
    streams: Mapping[str, Stream] | None = None,
    log: Log = logging.info,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains one stage; returns a summary (first / last loss, steps, the batch shapes
    compiled, ...) with ``timing``:
    where the stage's wall time went (``perf.StageTiming.summary()``: setup, compilation,
    data, host, device, checkpoints, in seconds; ``config.profile_timing`` waits for the
    device after every step so that ``device_s`` is all of its compute).

    ``streams`` overrides the input pipeline (tests); by default it is built from
    ``config.data`` (see ``input_pipeline.pipeline``).
    """
    timing = StageTiming(sync_each_step=bool(config.get("profile_timing", False)))
    summary = _train_stage(config, Path(workdir), streams, log, progress, timing)
    # Charged after _train_stage returned, so freeing its state, executables and
    # checkpointer is part of the stage's wall time too.
    timing.lap("host")
    summary["timing"] = timing.summary()
    return summary


def _train_stage(
    config: Any,
    workdir: Path,
    streams: Mapping[str, Stream] | None,
    log: Log,
    progress: bool,
    timing: StageTiming,
) -> dict[str, Any]:
    """:func:`train`'s body; charges its time to ``timing``."""
    resolved = config_lib.resolve(config)
    stage = resolved.stage
    model = Exo2Ego(resolved.model)
    mesh, rules = runtime.make_mesh_and_rules(resolved)
    log(
        f"jax {jax.__version__}; {jax.device_count()} devices ({jax.default_backend()}); "
        f"{jax.process_count()} processes; mesh {dict(mesh.shape)}; stage {stage.stage}"
    )
    streams = _stage_streams(config, stage, streams)
    updates, steps_per_epoch = _steps(config, streams)
    optimizer = make_optimizer(config.optim, updates)
    accum = config.optim.grad_accum or 1
    # The loop counts micro-steps (one micro-batch each): `accum` of them per update.
    total_steps = updates * accum

    pretrained = runtime.read_pretrained(config.init)
    with sharding_lib.sharding_context(mesh, rules):
        state, frozen = _initial_state(resolved, model, mesh, optimizer, pretrained, log)
        del pretrained
        ckpt = checkpoints.StageCheckpointer(
            workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
        )
        iterators = {k: s.iterator for k, s in streams.items()}
        state, start_step = _resume(ckpt, state, iterators, log)
        if start_step >= total_steps:
            ckpt.close()
            log(f"stage {stage.stage} already finished ({start_step} of {total_steps} steps)")
            timing.lap("setup")
            return {
                "first_loss": None,
                "last_loss": None,
                "steps": start_step,
                "losses": [],
                "start_step": start_step,
                "total_steps": total_steps,
            }
        buckets = length_buckets(config) if config.data.get("dynamic_length") else None
        trim = (lambda b: trim_to_buckets(b, buckets)) if buckets else (lambda b: b)  # noqa: E731
        timing.lap("setup")
        host_batch = _next_host_batch(iterators, trim, timing)
        # The dropout masks' keys (LoRA dropout): `rbg` / `unsafe_rbg` are much cheaper than
        # the default threefry on TPU and GPU (as MaxText offers).
        rng = jax.random.key(config.seed + 1, impl=config.get("prng_impl") or None)
        batch = sharding_lib.shard_batch(host_batch, mesh, rules)
        timing.lap("host")
        args = (state, frozen, batch, rng)
        count = config.get("count_model_flops", True)
        steps, memory = _compile(model, stage, optimizer, args, log, count_flops=count)
        timing.lap("compile")
        timing.move(steps.total_seconds()[1], "compile", "flop_count")
        run = _Run(
            resolved=resolved,
            workdir=workdir,
            step_fn=steps,
            trim=trim,
            frozen=frozen,
            iterators=iterators,
            mesh=mesh,
            ckpt=ckpt,
            total_steps=total_steps,
            schedule=lambda step: make_schedule(config.optim, updates)(step // accum),
            rng=rng,
            log=log,
            progress=progress,
            peak_tflops=config.get("peak_tflops", 0.0) or nominal_peak_tflops(),
            profiler=Profiler(workdir, config.get("profile_steps")),
            timing=timing,
        )
        summary = _loop(run, state, host_batch, start_step)
        summary.update(
            memory=memory,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            compiled_shapes=len(steps.seconds),  # batch shapes the step was compiled for
        )
    timing.lap("host")  # leaving the mesh context
    return summary


def _stage_streams(config, stage, streams: Mapping[str, Stream] | None) -> dict[str, Stream]:
    """The stage's input streams (built from ``config.data`` unless given), in its order."""
    if streams is None:
        streams = make_streams(config, stage)
    missing = set(stage.batches) - set(streams)
    if missing:
        raise ConfigError(f"stage {stage.stage} needs input streams {sorted(missing)}")
    return {k: streams[k] for k in stage.batches}


def _initial_state(resolved, model, mesh, optimizer, pretrained, log) -> tuple[TrainState, Any]:
    """``(TrainState, frozen)``: the assembled parameters split into the stage's trainable
    part (with fresh optimizer state) and the frozen rest (in the compute dtype). Call
    inside the mesh / rules context."""
    params, _ = runtime.build_params(resolved, model, mesh, pretrained, log=log)
    trainable, frozen = stages.split_params(
        params, stages.trainable_patterns(resolved.stage, model)
    )
    del params
    frozen = cast_frozen(frozen, model.config.llm.dtype)  # read only in the compute dtype
    n_train = stages.count_params(trainable)
    log(f"parameters: {stages.count_params(frozen) + n_train:,} total, {n_train:,} trainable")
    # Moments are created sharded like their parameters (left alone, jit would put them
    # all on one device or replicate them: they do not depend on parameter values).
    opt_shardings = sharding_lib.optimizer_state_shardings(
        optimizer, shardings_of(trainable), trainable
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
    return TrainState(trainable, opt_state), frozen


def _resume(ckpt, state: TrainState, iterators, log) -> tuple[TrainState, int]:
    """The state of the latest checkpoint (iterators restored in place), and its step."""
    start_step = ckpt.latest_step() or 0
    if not start_step:
        return state, 0
    params, opt_state, _ = ckpt.restore(
        start_step, abstract_of(state.params), abstract_of(state.opt_state), iterators
    )
    log(f"resumed from {ckpt.directory}/{start_step}")
    return TrainState(params, opt_state), start_step


def _compile(
    model, stage, optimizer, args, log, count_flops: bool = True
) -> tuple[CompiledSteps, dict[str, float]]:
    """``(CompiledSteps, memory)``: the jitted step compiled for the shapes of ``args =
    (state, frozen, batch, rng)`` (a batch already on the mesh), and its per-device memory
    (logged); ``count_flops``: count each batch shape's model FLOPs (logged MFU)."""
    state, frozen, batch, _ = args
    jitted = jit_train_step(
        model,
        stage,
        optimizer,
        state_shardings=shardings_of(state),
        frozen_shardings=shardings_of(frozen),
        batch_shardings=shardings_of(batch),
    )

    def count(batch):
        return model_flops_per_device(model, stage, optimizer, batch)

    steps = CompiledSteps(jitted, log=log, count_flops=count if count_flops else None)
    return steps, _log_memory(steps.compiled(*args), log)


def _next_host_batch(iterators: Mapping[str, Any], trim, timing: StageTiming) -> dict:
    """The next batch of every stream, its text padded to its bucket (``trim``). Time: the
    host's work since the last lap and the padding to ``host``, reading the streams to
    ``data``."""
    timing.lap("host")
    raw = {k: next(it) for k, it in iterators.items()}
    timing.lap("data")
    out = trim(raw)
    timing.lap("host")
    return out


def _dispatch_step(run: _Run, state: TrainState, batch: Any, step: int):
    """Step ``step + 1`` (compiled first for a new batch shape): ``(state, metrics, model
    FLOPs per device or None)``. Time: compilation and FLOP counting to theirs, the rest to
    ``device`` (the dispatch only, unless ``config.profile_timing`` waits for the results)."""
    timing, steps = run.timing, run.step_fn
    timing.lap("host")
    compiled, counted = steps.total_seconds()
    state, metrics, flops = steps(state, run.frozen, batch, jax.random.fold_in(run.rng, step))
    if timing.sync_each_step:
        jax.block_until_ready((state, metrics))
    timing.lap("device")
    compiled_after, counted_after = steps.total_seconds()
    timing.move(compiled_after - compiled, "device", "compile")
    timing.move(counted_after - counted, "device", "flop_count")
    timing.add_step(flops)
    return state, metrics, flops


def _tokens_in(batch: Mapping[str, Any]) -> int:
    return int(sum(np.asarray(b["attention_mask"]).sum() for b in batch.values()))


def _checkpoint_meta(resolved: ResolvedConfig) -> dict[str, Any]:
    return {
        "stage": resolved.stage.stage,
        "model": checkpoints.dump_json(dataclasses.asdict(resolved.model)),
    }


def _metrics_file_truncated(path: Path, last_step: int) -> None:
    """``metrics.jsonl`` keeps only the lines of steps <= ``last_step`` (the restored step):
    a resumed run re-runs the steps after it, and each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line cut by a kill: drop it
            continue
        if step <= last_step:
            kept.append(line)
    atomic.write_text(path, "".join(f"{line}\n" for line in kept))


class _Preemption:
    """SIGTERM (preemptible TPU VMs, spot GPUs) asks the loop to save and stop at the next
    step. Multi-process runs agree on the step through JAX's preemption sync point."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:  # every process sees the notice at the same step
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # no preemption service (jax.distributed not set up)
                return self.requested
        return self.requested


@dataclasses.dataclass
class _Window:
    """Device-side metrics of the steps since the last host read (read all at once)."""

    steps: list[int] = dataclasses.field(default_factory=list)
    metrics: list[dict] = dataclasses.field(default_factory=list)
    tokens: int = 0
    flops: float | None = 0.0  # model FLOPs per device of the window (None: unknown)
    start: float = dataclasses.field(default_factory=time.time)

    def add(self, step: int, metrics: dict, tokens: int, flops: float | None) -> None:
        self.steps.append(step)
        self.metrics.append(metrics)
        self.tokens += tokens
        self.flops = None if flops is None or self.flops is None else self.flops + flops

    def read(self) -> tuple[list[float], dict[str, float]]:
        """One host transfer: every step's loss and the last step's scalar metrics."""
        losses, last = jax.device_get(([m["loss"] for m in self.metrics], self.metrics[-1]))
        return [float(x) for x in losses], {k: float(v) for k, v in last.items() if np.ndim(v) == 0}


def _skip_counts(iterators: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{stream: (skipped, read)}`` of the iterators that count unreadable examples."""
    out = {}
    for name, it in iterators.items():
        if hasattr(it, "num_skipped"):
            out[name] = (int(it.num_skipped), int(getattr(it, "num_read", 0)))
    return out


def _check_bad_fraction(run: _Run) -> dict[str, int]:
    """Skipped examples per stream; raises :class:`BadDataError` above the ceiling."""
    ceiling = run.resolved.config.data.get("max_bad_fraction", 1.0)
    skipped = {}
    for name, (bad, read) in _skip_counts(run.iterators).items():
        skipped[name] = bad
        if read and bad / read > ceiling:
            reasons = list(getattr(run.iterators[name], "skip_reasons", []))[:3]
            raise BadDataError(
                f"stream {name!r}: {bad} of {read} examples ({bad / read:.1%}) could not be "
                f"read, above config.data.max_bad_fraction={ceiling}; first: "
                + ("; ".join(reasons) or "(no message)")
                + ". Fix the data (paths, video files) or raise the ceiling"
            )
    return skipped


def _diverged(run: _Run, step: int, loss: float) -> TrainingDivergedError:
    """The error for a non-finite loss at ``step``, after dropping every checkpoint that may
    hold the weights that produced it (the one saved after step ``step - 1`` and later)."""
    ckpt = run.ckpt
    ckpt.wait()
    for saved in sorted(ckpt.all_steps()):
        if saved >= step - 1:
            ckpt.delete(saved)
    good = ckpt.latest_step()
    where = (
        f"The last good checkpoint ({ckpt.directory / str(good)}, step {good}) is kept and "
        "the next run resumes from it; lower config.optim.lr or check the data first"
        if good is not None
        else "No checkpoint before it is known good, so none is kept: lower config.optim.lr "
        "or check the data, then start the stage again"
    )
    stage = run.resolved.stage.stage
    return TrainingDivergedError(f"stage {stage}: loss is {loss} at step {step}. {where}")


def _log_line(run: _Run, step: int, scalars: dict[str, float], writer) -> None:
    for k, v in scalars.items():
        writer.add_scalar(f"train/{k}", v, step)
    with open(run.workdir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **scalars}) + "\n")


def _read_window(run: _Run, window: _Window, step: int) -> tuple[list[float], dict[str, float]]:
    """The window's losses (raising :class:`TrainingDivergedError` at the first non-finite
    one) and the scalars to log at ``step``: metrics, lr, throughput, MFU, skipped counts."""
    run.timing.lap("host")
    step_losses, scalars = window.read()  # waits for the window's last step
    run.timing.lap("device")
    bad = [i for i, x in enumerate(step_losses) if not math.isfinite(x)]
    if bad:
        raise _diverged(run, window.steps[bad[0]], step_losses[bad[0]])
    skipped = _check_bad_fraction(run)
    dt = max(time.time() - window.start, 1e-9)
    scalars.update(
        lr=float(run.schedule(step - 1)),
        steps_per_s=len(window.steps) / dt,
        tokens_per_s=window.tokens / dt,
        **perf_scalars(window.flops, dt, run.peak_tflops),
        **{f"skipped_{k}": float(v) for k, v in skipped.items()},
    )
    return step_losses, scalars


def _loop(run: _Run, state: TrainState, host_batch: dict, start_step: int) -> dict[str, Any]:
    """Steps from ``start_step`` to ``run.total_steps``; ``host_batch`` is the first batch.

    The host never waits for the device between log points: step ``s`` is dispatched, then
    batch ``s + 1`` is read and placed on the mesh while the device computes, and the
    window's losses are read at once every ``log_every`` steps (and before each checkpoint,
    so a saved checkpoint is never past a non-finite loss).
    """
    config, stage_no = run.resolved.config, run.resolved.stage.stage
    primary = jax.process_index() == 0
    writer = SummaryWriter(str(run.workdir / "tensorboard")) if primary else None
    if primary:
        _metrics_file_truncated(run.workdir / "metrics.jsonl", start_step)
    meta_base = _checkpoint_meta(run.resolved)
    config_json = checkpoints.dump_json(config.to_dict())
    losses: list[float] = []
    bar = progress_bar(
        total=run.total_steps,
        initial=start_step,
        disable=not (run.progress and primary),
        desc=f"stage {stage_no}",
        dynamic_ncols=True,
    )
    rules = run.resolved.rules
    every = config.checkpoint.every_steps
    window, step, preempted = _Window(), start_step, False
    run.timing.lap("setup")
    batch = sharding_lib.shard_batch(host_batch, run.mesh, rules)
    tokens = _tokens_in(host_batch) * jax.process_count()  # global, without a reduction
    with _Preemption() as preemption:
        try:
            while step < run.total_steps:
                state, metrics, flops = _dispatch_step(run, state, batch, step)
                step += 1
                window.add(step, metrics, tokens, flops)
                bar.update(1)
                last = step == run.total_steps
                preempted = preemption.reached(step)
                save = step % every == 0 or last or preempted
                if save or step % config.log_every == 0:
                    step_losses, scalars = _read_window(run, window, step)
                    losses += step_losses
                    if writer is not None:
                        _log_line(run, step, scalars, writer)
                    bar.set_postfix(
                        loss=f"{step_losses[-1]:.4f}", steps_s=f"{scalars['steps_per_s']:.2f}"
                    )
                    window = _Window()
                if save:  # before the next batch is read: the iterators' state is this step's
                    meta = {**meta_base, **checkpoints.param_meta(state.params), "finished": last}
                    run.timing.lap("host")
                    run.ckpt.save(
                        step, state.params, state.opt_state, meta, config_json, run.iterators,
                        force=last or preempted,
                    )  # fmt: skip
                    run.timing.lap("checkpoint")
                if preempted:
                    run.log(
                        f"stage {stage_no}: stop requested (SIGTERM) at step {step}; checkpoint "
                        f"saved in {run.ckpt.directory}; rerun the same command to resume"
                    )
                    break
                if not last:
                    run.profiler.step(step)
                    host_batch = _next_host_batch(run.iterators, run.trim, run.timing)
                    batch = sharding_lib.shard_batch(host_batch, run.mesh, rules)
                    tokens = _tokens_in(host_batch) * jax.process_count()
        finally:
            run.profiler.stop()
            bar.close()
            run.timing.lap("host")
            run.ckpt.close()  # waits for asynchronous saves
            run.timing.lap("checkpoint")
            if writer is not None:
                writer.close()
    skipped = {k: v for k, (v, _) in _skip_counts(run.iterators).items()}
    if skipped:
        run.log(f"stage {stage_no}: skipped unreadable examples per stream: {skipped}")
    run.timing.lap("host")
    return {
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "steps": step,
        "losses": losses,
        "start_step": start_step,
        "preempted": preempted,
        "skipped": skipped,
    }
