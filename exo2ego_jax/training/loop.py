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
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from exo2ego_jax import config_lib, runtime, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.config_lib import ConfigError, ResolvedConfig
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.optim import make_optimizer, make_schedule
from exo2ego_jax.training.step import (
    TrainState,
    abstract_of,
    batch_shardings,
    jit_train_step,
    shardings_of,
)
from exo2ego_jax.training.streams import Stream, make_streams

Log = Callable[[str], None]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class _Run:
    """Everything the loop reads but never changes."""

    resolved: ResolvedConfig
    workdir: Path
    step_fn: Any  # the compiled train step
    frozen: Any
    iterators: dict[str, Any]
    mesh: jax.sharding.Mesh
    ckpt: checkpoints.StageCheckpointer
    total_steps: int
    schedule: Callable[[int], float]
    rng: jax.Array
    log: Log
    progress: bool


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
    """Trains one stage; returns a summary (first / last loss, steps, timings).

    ``streams`` overrides the input pipeline (tests); by default it is built from
    ``config.data`` (see ``input_pipeline.pipeline``).
    """
    workdir = Path(workdir)
    resolved = config_lib.resolve(config)
    stage = resolved.stage
    model = Exo2Ego(resolved.model)
    mesh, rules = runtime.make_mesh_and_rules(resolved)
    log(
        f"jax {jax.__version__}; {jax.device_count()} devices ({jax.default_backend()}); "
        f"{jax.process_count()} processes; mesh {dict(mesh.shape)}; stage {stage.stage}"
    )
    if streams is None:
        streams = make_streams(config, stage)
    missing = set(stage.batches) - set(streams)
    if missing:
        raise ConfigError(f"stage {stage.stage} needs input streams {sorted(missing)}")
    streams = {k: streams[k] for k in stage.batches}
    updates, steps_per_epoch = _steps(config, streams)
    optimizer = make_optimizer(config.optim, updates)
    accum = config.optim.grad_accum or 1
    schedule = lambda step: make_schedule(config.optim, updates)(step // accum)  # noqa: E731
    # The loop counts micro-steps (one micro-batch each): `accum` of them per update.
    total_steps = updates * accum

    pretrained = runtime.read_pretrained(config.init)
    with sharding_lib.sharding_context(mesh, rules):
        params, _ = runtime.build_params(resolved, model, mesh, pretrained, log=log)
        del pretrained
        trainable, frozen = stages.split_params(params, stages.trainable_patterns(stage, model))
        del params
        n_train = stages.count_params(trainable)
        log(f"parameters: {stages.count_params(frozen) + n_train:,} total, {n_train:,} trainable")
        # Moments are created sharded like their parameters (left alone, jit would put them
        # all on one device or replicate them: they do not depend on parameter values).
        opt_shardings = sharding_lib.optimizer_state_shardings(
            optimizer, shardings_of(trainable), trainable
        )
        state = TrainState(
            trainable, jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)
        )

        ckpt = checkpoints.StageCheckpointer(
            workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
        )
        iterators = {k: s.iterator for k, s in streams.items()}
        start_step = ckpt.latest_step() or 0
        if start_step:
            params, opt_state, _ = ckpt.restore(
                start_step, abstract_of(state.params), abstract_of(state.opt_state), iterators
            )
            state = TrainState(params, opt_state)
            log(f"resumed from {ckpt.directory}/{start_step}")
        if start_step >= total_steps:
            ckpt.close()
            log(f"stage {stage.stage} already finished ({start_step} of {total_steps} steps)")
            return {
                "first_loss": None,
                "last_loss": None,
                "steps": start_step,
                "losses": [],
                "start_step": start_step,
                "total_steps": total_steps,
            }

        host_batch = {k: next(it) for k, it in iterators.items()}
        jitted = jit_train_step(
            model,
            stage,
            optimizer,
            state_shardings=shardings_of(state),
            frozen_shardings=shardings_of(frozen),
            batch_shardings=batch_shardings(host_batch, mesh, rules),
        )
        rng = jax.random.key(config.seed + 1)
        t0 = time.time()
        batch = sharding_lib.shard_batch(host_batch, mesh, rules)
        compiled = jitted.lower(state, frozen, batch, rng).compile()
        log(f"compiled the train step in {time.time() - t0:.1f}s")
        memory = _log_memory(compiled, log)

        run = _Run(
            resolved=resolved,
            workdir=workdir,
            step_fn=compiled,
            frozen=frozen,
            iterators=iterators,
            mesh=mesh,
            ckpt=ckpt,
            total_steps=total_steps,
            schedule=schedule,
            rng=rng,
            log=log,
            progress=progress,
        )
        summary = _loop(run, state, host_batch, start_step)
        summary.update(memory=memory, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return summary


def _tokens_in(batch: Mapping[str, Any]) -> int:
    return int(sum(np.asarray(b["attention_mask"]).sum() for b in batch.values()))


def _checkpoint_meta(resolved: ResolvedConfig) -> dict[str, Any]:
    return {
        "stage": resolved.stage.stage,
        "model": checkpoints.dump_json(dataclasses.asdict(resolved.model)),
    }


def _loop(run: _Run, state: TrainState, host_batch: dict, start_step: int) -> dict[str, Any]:
    """Steps from ``start_step`` to ``run.total_steps``; ``host_batch`` is the first batch."""
    config, stage_no = run.resolved.config, run.resolved.stage.stage
    primary = jax.process_index() == 0
    writer = SummaryWriter(str(run.workdir / "tensorboard")) if primary else None
    meta_base = _checkpoint_meta(run.resolved)
    config_json = checkpoints.dump_json(config.to_dict())
    first_loss = last_loss = None
    losses: list[float] = []
    bar = tqdm(
        total=run.total_steps,
        initial=start_step,
        disable=not (run.progress and primary),
        desc=f"stage {stage_no}",
        dynamic_ncols=True,
    )
    rules = run.resolved.rules
    window_t, window_steps, window_tokens = time.time(), 0, 0
    step = start_step
    try:
        while step < run.total_steps:
            if step > start_step:
                host_batch = {k: next(it) for k, it in run.iterators.items()}
            batch = sharding_lib.shard_batch(host_batch, run.mesh, rules)
            # This host's tokens x hosts (equal per-host batches): the global rate, estimated
            # without a cross-host reduction.
            window_tokens += _tokens_in(host_batch) * jax.process_count()
            state, metrics = run.step_fn(
                state, run.frozen, batch, jax.random.fold_in(run.rng, step)
            )
            step += 1
            window_steps += 1
            loss = float(metrics["loss"])  # one scalar per step: cheap, and catches NaN at once
            if not math.isfinite(loss):
                last_good = run.ckpt.latest_step()
                raise TrainingDivergedError(
                    f"stage {stage_no}: loss is {loss} at step {step}. The last good checkpoint "
                    f"({run.ckpt.directory}/{last_good}) is kept; lower config.optim.lr, check "
                    "the data, or resume from it"
                )
            losses.append(loss)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            if step % config.log_every == 0 or step == run.total_steps:
                dt = max(time.time() - window_t, 1e-9)
                scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                scalars.update(
                    lr=float(run.schedule(step - 1)),
                    steps_per_s=window_steps / dt,
                    tokens_per_s=window_tokens / dt,
                )
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    with open(run.workdir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **scalars}) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{scalars['steps_per_s']:.2f}")
                window_t, window_steps, window_tokens = time.time(), 0, 0
            bar.update(1)
            if step % config.checkpoint.every_steps == 0 or step == run.total_steps:
                meta = {
                    **meta_base,
                    **checkpoints.param_meta(state.params),
                    "finished": step == run.total_steps,
                }
                run.ckpt.save(
                    step,
                    state.params,
                    state.opt_state,
                    meta,
                    config_json,
                    run.iterators,
                    force=step == run.total_steps,
                )
    finally:
        bar.close()
        run.ckpt.close()
        if writer is not None:
            writer.close()
    return {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "steps": step,
        "losses": losses,
        "start_step": start_step,
    }
