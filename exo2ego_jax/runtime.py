"""Assembles what every run starts from: the mesh, the model's weights and the tokenizer.

Training, evaluation and chat all begin the same way (design.md principle 2, "a stage is a
view of one model"):

1. the mesh and the sharding rules of ``config.mesh``;
2. the parameters created directly in their shardings (random init), then overwritten by
   pretrained weights (HF CLIP / Mistral, a VideoLLaMA2 projector, or the output of
   ``tools.convert``), then by every earlier stage's checkpoint in order (params only,
   later stages overriding earlier ones);
3. the tokenizer, checked against the model's vocabulary.

This module holds that sequence once; it imports the weight loaders and the stage
checkpoints, never the trainer, so evaluation and chat stay light.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from exo2ego_jax import config_lib
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.config_lib import ConfigError, ResolvedConfig
from exo2ego_jax.models.exo2ego import Exo2Ego, Params
from exo2ego_jax.training import checkpoints
from exo2ego_jax.weights import converted, hf
from exo2ego_jax.weights.mm_projector import load_mm_projector
from input_pipeline.tokenizer import load_tokenizer

Log = Callable[[str], None]
Pretrained = dict[str, tuple[Params, str]]


# ----------------------------------------------------------------------------- mesh


def make_mesh_and_rules(
    resolved: ResolvedConfig, devices: list[jax.Device] | None = None
) -> tuple[jax.sharding.Mesh, Any]:
    """The ``('data', 'fsdp', 'tensor')`` mesh and the rules table of ``config.mesh``."""
    mesh = sharding_lib.make_mesh(resolved.config.mesh.shape, devices)
    return mesh, resolved.rules


# ----------------------------------------------------------------------------- weights


def read_pretrained(init: Any) -> Pretrained:
    """Host copies of the pretrained weights named in ``config.init``.

    Returns ``{subtree: (params, source)}`` for HF CLIP (both towers), HF Mistral and a
    VideoLLaMA2 projector (E_exo). Runs outside any mesh / rules context: the loaders build
    their own modules on the host.
    """
    out: Pretrained = {}
    if init.clip:
        clip = hf.load_clip_vision(init.clip)[1]
        out["ego_encoder/clip"] = out["exo_encoder/clip"] = (clip, init.clip)
    if init.llm:
        out["llm"] = (hf.load_mistral(init.llm)[1], init.llm)
    if init.mm_projector:
        out["exo_encoder/connector"] = (load_mm_projector(init.mm_projector)[1], init.mm_projector)
    return out


def _place(params: Params, subtree: str, loaded: Params, shardings: Params, source: str) -> Params:
    """Puts host arrays ``loaded`` at ``params[subtree...]`` in their target shardings."""
    flat = traverse_util.flatten_dict(params, sep="/")
    shard_flat = traverse_util.flatten_dict(shardings, sep="/")
    for k, v in traverse_util.flatten_dict(loaded, sep="/").items():
        path = f"{subtree}/{k}"
        if path not in flat:
            if k.endswith(("lora_a", "lora_b")):
                continue
            raise checkpoints.HandOffError(
                f"{source}: tensor for {path} has no place in this model"
            )
        if tuple(flat[path].shape) != tuple(v.shape):
            raise checkpoints.HandOffError(
                f"{source}: {path} has shape {tuple(v.shape)} but the model expects "
                f"{tuple(flat[path].shape)}; make config.model match the checkpoint"
            )
        flat[path] = jax.device_put(np.asarray(v).astype(flat[path].dtype), shard_flat[path])
    return traverse_util.unflatten_dict(flat, sep="/")


def place_pretrained(params: Params, shardings: Params, pretrained: Pretrained) -> Params:
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


def restore_stages(resolved: ResolvedConfig, params: Params, *, log: Log = logging.info) -> Params:
    """``params`` with every earlier stage's checkpoint of ``config.init.stages`` restored in
    increasing stage order (params only, later stages overriding earlier ones).

    Any subset is allowed (the ego-only baseline's stage 3 starts from stage 0 alone); a
    training stage only starts from stages before it, evaluation from any.
    """
    config = resolved.config
    last, limit = -1, (4 if resolved.is_inference else resolved.stage.stage)
    for wd in config.init.stages:
        stage_no = checkpoints.read_meta(wd)[1].get("stage")
        if not isinstance(stage_no, int) or not last < stage_no < limit:
            after = f"after stage {last}" if last >= 0 else "first"
            raise checkpoints.HandOffError(
                f"{wd}: holds a stage {stage_no} checkpoint, listed {after} in config.init.stages "
                f"for a stage-{resolved.stage.stage} run. Check the order of config.init.stages "
                "(earlier stages' workdirs, in increasing stage order)"
            )
        params, paths = checkpoints.restore_stage_params(wd, stage_no, params)
        log(f"hand-off: {len(paths)} tensors from stage {stage_no} ({wd})")
        last = stage_no
    return params


def build_params(
    resolved: ResolvedConfig,
    model: Exo2Ego,
    mesh,
    pretrained: Pretrained | None = None,
    *,
    log: Log = logging.info,
) -> tuple[Params, Params]:
    """``(params, shardings)`` of the whole model as a stage (or an evaluation) starts it:
    random init -> pretrained weights (HF loaders, then ``config.init.converted``) -> every
    earlier stage's checkpoint. Call inside the mesh / rules context."""
    config = resolved.config
    if pretrained is None:
        pretrained = read_pretrained(config.init)
    params, shardings = init_params(model, mesh, resolved.rules, config.seed)
    params = place_pretrained(params, shardings, pretrained)
    if config.init.get("converted"):
        # Read by each device straight into its shards; the replaced initial values are
        # freed first (donate) so no device holds two copies of the LLM.
        params, paths = converted.restore_converted(config.init.converted, params, donate=True)
        log(f"converted checkpoint: {len(paths)} tensors from {config.init.converted}")
    return restore_stages(resolved, params, log=log), shardings


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer_checked(config: Any):
    """The tokenizer of ``config.data.tokenizer``; its size must fit the model's vocabulary."""
    path = config.data.tokenizer
    if not path or not Path(path).exists():
        raise ConfigError(
            f"config.data.tokenizer={path!r}: not found. For the demo run "
            "`python -m input_pipeline.prepare --world demo_data/world --out demo_data/prepared`"
        )
    tok = load_tokenizer(path)
    if len(tok) > config.model.vocab_size:
        raise ConfigError(
            f"tokenizer {path} has {len(tok)} tokens but config.model.vocab_size="
            f"{config.model.vocab_size}; raise the vocabulary size"
        )
    return tok


# ----------------------------------------------------------------------------- inference


@dataclasses.dataclass
class Trained:
    """A model ready for inference (stage-3 weights by default), and the mesh it lives on."""

    model: Exo2Ego
    params: Params
    tokenizer: Any
    mesh: jax.sharding.Mesh
    rules: Any

    def context(self):
        """The mesh + logical-rules context every jitted call must be traced in."""
        return sharding_lib.sharding_context(self.mesh, self.rules)

    @property
    def batch_ways(self) -> int:
        """Devices a batch is split over (inference batches are padded to a multiple)."""
        return sharding_lib.batch_ways(self.mesh, self.rules)


def resolve_for_inference(config: Any) -> ResolvedConfig:
    """:func:`config_lib.resolve` for inference: mesh, model fields, stage workdirs, weights.

    The training batch is irrelevant here; it is replaced by one the mesh always splits, so
    only real problems are reported.
    """
    probe = config.copy_and_resolve_references()
    with probe.unlocked():
        probe.optim.batch_size, probe.optim.grad_accum = jax.device_count(), 1
    return config_lib.resolve(probe)


def load_trained(resolved: ResolvedConfig, *, log: Log = print) -> Trained:
    """Builds the model as the stages of ``config.init.stages`` left it (call outside any
    mesh context)."""
    model = Exo2Ego(resolved.model)
    tokenizer = load_tokenizer_checked(resolved.config)
    mesh, rules = make_mesh_and_rules(resolved)
    pretrained = read_pretrained(resolved.config.init)  # host-side loaders: outside the mesh
    with sharding_lib.sharding_context(mesh, rules):
        params, _ = build_params(resolved, model, mesh, pretrained, log=log)
    return Trained(model, params, tokenizer, mesh, rules)
