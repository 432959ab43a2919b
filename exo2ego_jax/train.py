"""Sharded training of one Exo2Ego stage: config in, checkpoints and TensorBoard logs out.

``train(config, workdir)`` runs one stage (method.md §4) on a ``('data', 'fsdp', 'tensor')``
mesh:

1. validate the config (before any compute) and build the mesh and the model;
2. create the parameters directly sharded, load pretrained weights (HF CLIP / Mistral,
   VideoLLaMA2 projector) and the earlier stages' checkpoints (params only);
3. split them into the stage's trainable subtree and the frozen rest;
4. compile the train step ahead of time with explicit in / out shardings and donation,
   logging ``memory_analysis()``;
5. loop: host batches -> global arrays -> step; TensorBoard (and ``metrics.jsonl``) +
   progress bar; NaN/Inf stops
   with a clear error; Orbax checkpoints (trainable params, optimizer state, step, Grain
   iterator state, config) every N steps; a restarted run resumes from the latest one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from exo2ego_jax import checkpointing, config_lib, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.models.exo2ego import Exo2Ego, Params


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class Stream:
    """One named input stream of a stage (e.g. ``ego_caption``).

    ``iterator`` yields host-local numpy batches (dicts of arrays with the per-host batch as
    leading axis); if it has ``get_state`` / ``set_state`` (a Grain iterator) its position
    is checkpointed. ``num_examples`` sizes an epoch.
    """

    iterator: Iterator[dict[str, np.ndarray]]
    num_examples: int


# ----------------------------------------------------------------------------- optimizer


def make_schedule(o: ml_collections.ConfigDict, total_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``warmup_ratio`` of the optimizer steps, then cosine decay to 0."""
    warmup = int(round(o.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(warmup, 1), max(total_steps, warmup + 1), 0.0
    )


def make_optimizer(o: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW + warmup-cosine + global-norm clipping (VideoLLaMA2 defaults).

    ``total_steps`` counts optimizer updates. With ``grad_accum = k > 1`` the returned
    transformation is ``optax.MultiSteps``: each call takes one micro-batch and the update is
    applied every k calls with the mean of the k gradients (so each micro-batch's VTG is
    normalised by its own supervised-token count, then averaged).
    """
    chain = []
    if o.grad_clip and o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(
        optax.adamw(
            make_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay
        )
    )
    opt = optax.chain(*chain)
    if (o.grad_accum or 1) > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=o.grad_accum)
    return opt


# ----------------------------------------------------------------------------- parameters


def _flat(tree: Params) -> dict[str, Any]:
    from flax import traverse_util  # noqa: PLC0415

    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict[str, Any]) -> Params:
    from flax import traverse_util  # noqa: PLC0415

    return traverse_util.unflatten_dict(flat, sep="/")


def _place(params: Params, subtree: str, loaded: Params, shardings: Params, source: str) -> Params:
    """Puts host arrays ``loaded`` at ``params[subtree...]`` in their target shardings."""
    flat = _flat(params)
    shard_flat = _flat(shardings)
    for k, v in _flat(loaded).items():
        path = f"{subtree}/{k}"
        if path not in flat:
            if k.endswith(("lora_a", "lora_b")):
                continue
            raise checkpointing.HandOffError(
                f"{source}: tensor for {path} has no place in this model"
            )
        if tuple(flat[path].shape) != tuple(v.shape):
            raise checkpointing.HandOffError(
                f"{source}: {path} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(flat[path].shape)}; make config.model match the checkpoint"
            )
        flat[path] = jax.device_put(np.asarray(v).astype(flat[path].dtype), shard_flat[path])
    return _unflat(flat)


def read_pretrained(init: ml_collections.ConfigDict) -> dict[str, tuple[Params, str]]:
    """Host copies of the pretrained weights named in ``config.init``.

    Returns ``{subtree: (params, source)}`` for HF CLIP (both towers), HF Mistral and a
    VideoLLaMA2 projector (E_exo). Runs outside any mesh / rules context: the loaders build
    their own modules on the host.
    """
    from exo2ego_jax.weights import hf  # noqa: PLC0415
    from exo2ego_jax.weights.mm_projector import load_mm_projector  # noqa: PLC0415

    out: dict[str, tuple[Params, str]] = {}
    if init.clip:
        clip = hf.load_clip_vision(init.clip)[1]
        out["ego_encoder/clip"] = out["exo_encoder/clip"] = (clip, init.clip)
    if init.llm:
        out["llm"] = (hf.load_mistral(init.llm)[1], init.llm)
    if init.mm_projector:
        out["exo_encoder/connector"] = (load_mm_projector(init.mm_projector)[1], init.mm_projector)
    return out


def place_pretrained(
    params: Params, shardings: Params, pretrained: dict[str, tuple[Params, str]]
) -> Params:
    """Puts the host weights of :func:`read_pretrained` into ``params``, sharded."""
    for subtree, (loaded, source) in pretrained.items():
        if subtree.split("/")[0] in params:
            params = _place(params, subtree, loaded, shardings, source)
    return params


def init_params(model: Exo2Ego, mesh, rules, seed: int) -> tuple[Params, Params]:
    """``(params, shardings)``: parameters created directly in their shardings
    (``sharding.shard_init``; dimensions a mesh axis does not divide are replicated)."""
    params = sharding_lib.shard_init(model, jax.random.key(seed), mesh, rules)
    return params, jax.tree.map(lambda a: a.sharding, params)


def build_params(
    config: ml_collections.ConfigDict,
    model: Exo2Ego,
    mesh,
    rules,
    pretrained: dict[str, tuple[Params, str]] | None = None,
    *,
    log: Callable[[str], None] = logging.info,
) -> tuple[Params, Params]:
    """``(params, shardings)`` of the whole model as a stage (or an evaluation) starts it:
    random init -> pretrained weights (HF loaders, then ``config.init.converted``) -> every
    earlier stage's checkpoint (params only, in order, later stages overriding earlier
    ones). Call inside the mesh / rules context."""
    if pretrained is None:
        pretrained = read_pretrained(config.init)
    params, shardings = init_params(model, mesh, rules, config.seed)
    params = place_pretrained(params, shardings, pretrained)
    if config.init.get("converted"):
        from exo2ego_jax.weights import converted  # noqa: PLC0415

        # Read by each device straight into its shards; the replaced initial values are
        # freed first (donate) so no device holds two copies of the LLM.
        params, paths = converted.restore_converted(config.init.converted, params, donate=True)
        log(f"converted checkpoint: {len(paths)} tensors from {config.init.converted}")
    # Earlier stages in increasing order; any subset (the ego-only baseline's stage 3 starts
    # from stage 0 alone). A training stage only starts from stages before it.
    last, limit = -1, (4 if config.get("run") else config.stage.stage)
    for wd in config.init.stages:
        stage_no = checkpointing.read_meta(wd)[1].get("stage")
        if not isinstance(stage_no, int) or not last < stage_no < limit:
            after = f"after stage {last}" if last >= 0 else "first"
            raise checkpointing.HandOffError(
                f"{wd}: holds a stage {stage_no} checkpoint, listed {after} in config.init.stages "
                f"for a stage-{config.stage.stage} run. Check the order of config.init.stages "
                "(earlier stages' workdirs, in increasing stage order)"
            )
        params, paths = checkpointing.restore_stage_params(wd, stage_no, params)
        log(f"hand-off: {len(paths)} tensors from stage {stage_no} ({wd})")
        last = stage_no
    return params, shardings


# ----------------------------------------------------------------------------- batches


def batch_shardings(example: Mapping[str, Any], mesh, rules) -> Any:
    """One ``sharding.batch_sharding`` per leaf: batch axis split, the rest replicated."""
    return jax.tree.map(lambda _: sharding_lib.batch_sharding(mesh, rules), example)


def to_global(host_batch: Mapping[str, Any], shardings: Any) -> Any:
    """Host-local numpy batches -> global ``jax.Array``s (multi-host safe)."""
    return jax.tree.map(
        lambda s, a: jax.make_array_from_process_local_data(s, np.asarray(a)), shardings, host_batch
    )


# ----------------------------------------------------------------------------- train


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _log_memory(compiled, log: Callable[[str], None]) -> dict[str, float]:
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


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    streams: Mapping[str, Stream] | None = None,
    log: Callable[[str], None] = logging.info,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains one stage; returns a summary (first / last loss, steps, timings).

    ``streams`` overrides the input pipeline (tests); by default it is built from
    ``config.data`` (see ``input_pipeline.pipeline``).
    """
    workdir = Path(workdir)
    config_lib.validate(config)
    model_cfg = config_lib.build_model_config(config.model)
    stage = config_lib.build_stage_config(config.stage)
    model = Exo2Ego(model_cfg)
    mesh = sharding_lib.make_mesh(config.mesh.shape)
    rules = sharding_lib.rules_for(config.mesh.rules)
    log(
        f"jax {jax.__version__}; {jax.device_count()} devices ({jax.default_backend()}); "
        f"{jax.process_count()} processes; mesh {dict(mesh.shape)}; stage {stage.stage}"
    )

    if streams is None:
        from exo2ego_jax import data as data_lib  # noqa: PLC0415

        streams = data_lib.make_streams(config, stage)
    missing = set(stage.batches) - set(streams)
    if missing:
        raise config_lib.ConfigError(f"stage {stage.stage} needs input streams {sorted(missing)}")
    streams = {k: streams[k] for k in stage.batches}
    o = config.optim
    steps_per_epoch = max(
        1, math.ceil(max(s.num_examples for s in streams.values()) / o.batch_size)
    )
    updates = o.num_steps if o.num_steps > 0 else o.num_epochs * steps_per_epoch
    optimizer = make_optimizer(o, updates)
    accum = o.grad_accum or 1
    schedule = lambda step: make_schedule(o, updates)(step // accum)  # noqa: E731
    # The loop counts micro-steps (one micro-batch each): `accum` of them per update.
    total_steps = updates * accum

    pretrained = read_pretrained(config.init)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params, _ = build_params(config, model, mesh, rules, pretrained, log=log)
        del pretrained
        patterns = stages.trainable_patterns(stage, model)
        trainable, frozen = stages.split_params(params, patterns)
        del params
        n_train = stages.count_params(trainable)
        log(f"parameters: {stages.count_params(frozen) + n_train:,} total, {n_train:,} trainable")
        # Moments are created sharded like their parameters (left alone, jit would put them
        # all on one device or replicate them: they do not depend on parameter values).
        opt_shardings = sharding_lib.optimizer_state_shardings(
            optimizer, jax.tree.map(lambda a: a.sharding, trainable), trainable
        )
        opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(trainable)

        ckpt = checkpointing.StageCheckpointer(
            workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
        )
        iterators = {k: s.iterator for k, s in streams.items()}
        start_step = ckpt.latest_step() or 0
        if start_step:
            trainable, opt_state, _ = ckpt.restore(
                start_step, _abstract(trainable), _abstract(opt_state), iterators
            )
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
        b_shard = batch_shardings(host_batch, mesh, rules)
        t_shard = jax.tree.map(lambda a: a.sharding, trainable)
        f_shard = jax.tree.map(lambda a: a.sharding, frozen)
        o_shard = jax.tree.map(lambda a: a.sharding, opt_state)
        step_fn = stages.make_train_step(model, stage, optimizer)
        use_rng = model_cfg.llm.lora is not None and model_cfg.llm.lora.dropout > 0
        jitted = jax.jit(
            step_fn if use_rng else (lambda t, s, f, b, r: step_fn(t, s, f, b)),
            in_shardings=(t_shard, o_shard, f_shard, b_shard, None),
            out_shardings=(t_shard, o_shard, None),
            donate_argnums=(0, 1),
        )
        rng = jax.random.key(config.seed + 1)
        t0 = time.time()
        compiled = jitted.lower(
            trainable, opt_state, frozen, to_global(host_batch, b_shard), rng
        ).compile()
        log(f"compiled the train step in {time.time() - t0:.1f}s")
        memory = _log_memory(compiled, log)

        summary = _loop(
            config,
            workdir,
            compiled,
            trainable,
            opt_state,
            frozen,
            iterators,
            host_batch,
            b_shard,
            ckpt,
            start_step,
            total_steps,
            schedule,
            rng,
            stage,
            model_cfg,
            log,
            progress,
        )
        summary.update(memory=memory, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return summary


def _tokens_in(batch: Mapping[str, Any]) -> int:
    return int(sum(np.asarray(b["attention_mask"]).sum() for b in batch.values()))


def _loop(
    config,
    workdir,
    compiled,
    trainable,
    opt_state,
    frozen,
    iterators,
    host_batch,
    b_shard,
    ckpt,
    start_step,
    total_steps,
    schedule,
    rng,
    stage,
    model_cfg,
    log,
    progress,
):
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    primary = jax.process_index() == 0
    writer = SummaryWriter(str(Path(workdir) / "tensorboard")) if primary else None
    meta_base = {
        "stage": stage.stage,
        "model": checkpointing.dump_json(dataclasses.asdict(model_cfg)),
    }
    config_json = checkpointing.dump_json(config.to_dict())
    first_loss = last_loss = None
    losses: list[float] = []
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not (progress and primary),
        desc=f"stage {stage.stage}",
        dynamic_ncols=True,
    )
    window_t, window_steps, window_tokens = time.time(), 0, 0
    step = start_step
    try:
        while step < total_steps:
            if step > start_step:
                host_batch = {k: next(it) for k, it in iterators.items()}
            batch = to_global(host_batch, b_shard)
            # This host's tokens x hosts (equal per-host batches): the global rate, estimated
            # without a cross-host reduction.
            window_tokens += _tokens_in(host_batch) * jax.process_count()
            trainable, opt_state, metrics = compiled(
                trainable, opt_state, frozen, batch, jax.random.fold_in(rng, step)
            )
            step += 1
            window_steps += 1
            loss = float(metrics["loss"])  # one scalar per step: cheap, and catches NaN at once
            if not math.isfinite(loss):
                last_good = ckpt.latest_step()
                raise TrainingDivergedError(
                    f"stage {stage.stage}: loss is {loss} at step {step}. The last good checkpoint "
                    f"({ckpt.directory}/{last_good}) is kept; lower config.optim.lr, check the "
                    "data, or resume from it"
                )
            losses.append(loss)
            first_loss = loss if first_loss is None else first_loss
            last_loss = loss
            if step % config.log_every == 0 or step == total_steps:
                dt = max(time.time() - window_t, 1e-9)
                scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                scalars.update(
                    lr=float(schedule(step - 1)),
                    steps_per_s=window_steps / dt,
                    tokens_per_s=window_tokens / dt,
                )
                if writer is not None:
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", v, step)
                    with open(Path(workdir) / "metrics.jsonl", "a") as f:
                        f.write(json.dumps({"step": step, **scalars}) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", steps_s=f"{scalars['steps_per_s']:.2f}")
                window_t, window_steps, window_tokens = time.time(), 0, 0
            bar.update(1)
            if step % config.checkpoint.every_steps == 0 or step == total_steps:
                meta = {
                    **meta_base,
                    **checkpointing.param_meta(trainable),
                    "finished": step == total_steps,
                }
                ckpt.save(
                    step,
                    trainable,
                    opt_state,
                    meta,
                    config_json,
                    iterators,
                    force=step == total_steps,
                )
    finally:
        bar.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    return {
        "first_loss": first_loss,
        "last_loss": last_loss,
        "steps": step,
        "losses": losses,
        "start_step": start_step,
    }
