"""Resolves an ml_collections config once, at the entry: every field validated, then the
model / stage / sharding objects the rest of the code takes.

Everything here runs before any compute, so a bad field fails in seconds with a message that
names the field and the fix. Entry points (``main.py``, ``training.loop.train``,
``eval.evaluate``, ``chat``, ``tools.memory_plan``) call :func:`resolve` once and pass the
:class:`ResolvedConfig` down.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections

from exo2ego_jax.models import exo2ego, remat
from exo2ego_jax.models.attention import (
    ATTENTION_IMPLS,
    AttentionImplError,
    check_attention_impl,
    current_backend,
)
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapping import MappingConfig
from exo2ego_jax.sharding import MESH_AXES, LogicalRules, batch_ways, rules_for
from exo2ego_jax.stages import StageConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and what to do."""


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """A validated config and what it resolves to (built once per run)."""

    config: ml_collections.ConfigDict
    model: exo2ego.Exo2EgoConfig
    stage: StageConfig
    rules: LogicalRules

    @property
    def is_inference(self) -> bool:
        """Evaluation or chat (``config.run``), rather than training a stage."""
        return self.config.get("run", "train") != "train"


def _dtype(field: str, name: str):
    if name not in _DTYPES:
        raise ConfigError(f"config.{field}={name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_model_config(m: ml_collections.ConfigDict) -> exo2ego.Exo2EgoConfig:
    """``config.model`` -> :class:`Exo2EgoConfig` (architecture presets + overrides)."""
    dtype = _dtype("model.dtype", m.dtype)
    pdtype = _dtype("model.param_dtype", m.param_dtype)
    if m.size not in ("tiny", "paper"):
        raise ConfigError(f"config.model.size={m.size!r}: use 'tiny' or 'paper'")
    if m.remat_policy not in remat.REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat_policy={m.remat_policy!r}: use one of "
            + ", ".join(remat.REMAT_POLICIES)
        )
    attention_impl = m.get("attention_impl", "auto")
    if attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(
            f"config.model.attention_impl={attention_impl!r}: use one of "
            + ", ".join(ATTENTION_IMPLS)
        )
    lora = None
    if m.lora.enabled:
        lora = LoRAConfig(
            rank=m.lora.rank,
            alpha=m.lora.alpha,
            dropout=m.lora.dropout,
            targets=tuple(m.lora.targets),
        )
    if m.size == "paper":
        base = exo2ego.paper_config()
    else:
        base = exo2ego.tiny_config()
    patch = m.get("patch_size", 0) or base.clip.patch_size
    if m.image_size % patch:
        raise ConfigError(
            f"config.model.image_size={m.image_size} is not a multiple of the CLIP patch size "
            f"{patch}; use e.g. {m.image_size - m.image_size % patch or patch}"
        )
    clip = dataclasses.replace(
        base.clip,
        image_size=m.image_size,
        patch_size=patch,
        dtype=dtype,
        param_dtype=pdtype,
        remat=m.remat_policy,
        attention_impl=attention_impl,
    )
    shape = {k: v for k, v in m.get("llm", {}).items() if v}  # 0 = the preset's
    if "hidden_size" in shape or "num_heads" in shape:
        shape["head_dim"] = None  # recomputed as hidden_size // num_heads
    heads = {k: shape.get(k, getattr(base.llm, k)) for k in ("hidden_size", "num_heads")}
    heads["num_kv_heads"] = shape.get("num_kv_heads", base.llm.num_kv_heads)
    if heads["hidden_size"] % heads["num_heads"] or heads["num_heads"] % heads["num_kv_heads"]:
        raise ConfigError(
            "config.model.llm: LLM heads do not divide: "
            + ", ".join(f"{k}={v}" for k, v in heads.items())
        )
    llm = dataclasses.replace(
        base.llm,
        **shape,
        vocab_size=m.vocab_size,
        dtype=dtype,
        param_dtype=pdtype,
        remat_policy=m.remat_policy,
        attention_impl=attention_impl,
        lora=lora,
    )
    connector = dataclasses.replace(
        base.connector, out_size=llm.hidden_size, dtype=dtype, param_dtype=pdtype
    )
    try:
        mapping = MappingConfig(
            kind=m.mapping.kind,
            ngf=m.mapping.ngf,
            n_blocks=m.mapping.n_blocks,
            norm=m.mapping.norm,
            dtype=dtype,
            param_dtype=pdtype,
        )
        return exo2ego.Exo2EgoConfig(
            clip=clip,
            connector=connector,
            mapping=mapping,
            llm=llm,
            num_frames=m.num_frames,
            select_layer=m.select_layer,
            fusion=m.fusion,
            video_token_index=m.video_token_index,
            with_exo=m.with_exo,
            with_mapping=m.with_mapping,
        )
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from e


def build_stage_config(s: ml_collections.ConfigDict) -> StageConfig:
    try:
        return StageConfig(
            stage=s.stage,
            train_clip=s.train_clip,
            stage0_encoders=tuple(s.stage0_encoders),
            lambda_vtg=s.lambda_vtg,
            lambda_kl=s.lambda_kl,
            lambda_ccl=s.lambda_ccl,
            use_kl=s.use_kl,
            use_ccl=s.use_ccl,
            ccl_forward_only=s.ccl_forward_only,
            kl_temperature=s.kl_temperature,
            train_lora=s.train_lora,
            fusion=s.fusion or None,
        )
    except ValueError as e:
        raise ConfigError(f"config.stage: {e}") from e


def check_backend(m: ml_collections.ConfigDict, backend: str | None = None) -> None:
    """``config.model`` fields that the backend (default: the running one) cannot run: an
    attention kernel it lacks, host offload without a ``pinned_host`` memory space."""
    backend = backend or current_backend()
    try:
        check_attention_impl(m.get("attention_impl", "auto"), backend)
    except AttentionImplError as e:
        raise ConfigError(f"config.model.attention_impl: {e}") from e
    if remat.offloads(m.remat_policy) and not remat.host_offload_supported():
        raise ConfigError(
            f"config.model.remat_policy={m.remat_policy!r} offloads to host memory, which "
            f"the {backend!r} backend lacks (no 'pinned_host' memory space); use "
            f"{m.remat_policy.replace('offload_', 'save_')!r} instead"
        )


def resolve(
    config: ml_collections.ConfigDict, *, num_devices: int | None = None, check_inputs: bool = True
) -> ResolvedConfig:
    """Validates every field and cross-field constraint (and what the backend can run:
    :func:`check_backend`), then builds the model, stage and sharding objects.
    ``num_devices`` defaults to ``jax.device_count()``; ``check_inputs=False`` skips the
    checks of input paths (planning without data)."""
    n = num_devices if num_devices is not None else jax.device_count()
    shape = list(config.mesh.shape)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"config.mesh.shape={tuple(shape)}: give 3 positive sizes, at most one -1"
        )
    known = math.prod(s for s in shape if s != -1)
    if (-1 in shape and n % known) or (-1 not in shape and known != n):
        raise ConfigError(
            f"config.mesh.shape={tuple(shape)} does not match the {n} available devices; "
            f"use e.g. --config.mesh.shape='({n},1,1)' or put -1 on one axis"
        )
    o = config.optim
    if o.batch_size % (o.grad_accum or 1):
        raise ConfigError(
            f"config.optim.batch_size={o.batch_size} must be divisible by "
            f"config.optim.grad_accum={o.grad_accum}"
        )
    filled = dict(zip(MESH_AXES, (n // known if s == -1 else s for s in shape), strict=True))
    try:
        rules = rules_for(config.mesh.rules, config.mesh.get("rule_overrides"))
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from e
    data_ways = batch_ways(filled, rules)  # devices the batch is split over
    micro = o.batch_size // (o.grad_accum or 1)
    if micro % data_ways:
        raise ConfigError(
            f"config.optim.batch_size={o.batch_size} (micro-batch {micro}) is not divisible by "
            f"the {data_ways} data-parallel devices of mesh {tuple(shape)}"
        )
    if config.data.on_bad_video not in ("skip", "raise"):
        raise ConfigError(f"config.data.on_bad_video={config.data.on_bad_video!r}: skip | raise")
    stage = build_stage_config(config.stage)
    model = build_model_config(config.model)
    check_backend(config.model)
    if check_inputs:
        for i, wd in enumerate(config.init.stages):
            if not Path(wd).is_dir():
                raise ConfigError(
                    f"config.init.stages[{i}]={wd!r}: no such workdir. Run that stage first "
                    "(python main.py --config=configs/stageN.py) or point the field at its workdir"
                )
        for field in ("clip", "llm", "mm_projector", "converted"):
            path = config.init.get(field, "")
            if path and not Path(path).exists():
                raise ConfigError(f"config.init.{field}={path!r}: not found")
    return ResolvedConfig(config, model, stage, rules)
