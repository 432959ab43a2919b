"""Hugging Face CLIP vision checkpoints <-> :class:`~exo2ego_jax.models.clip.CLIPVisionTower`.

Reads a ``CLIPVisionModel`` or ``CLIPModel`` directory (``config.json`` + safetensors,
sharded or not) tensor by tensor, converting layouts (:func:`param_mappings`):

=========================================  ===================  ===========================
HF tensor (under the tower prefix)          HF layout            Flax param (scan layout)
=========================================  ===================  ===========================
``embeddings.patch_embedding.weight``       ``[W, C, p, p]``     ``kernel [p, p, C, W]``
``embeddings.class_embedding``              ``[W]``              same
``embeddings.position_embedding.weight``    ``[1+N, W]``         same
``{pre_layrnorm,post_layernorm}.weight``    ``[W]``              ``scale [W]``
``encoder.layers.{i}.self_attn.q_proj.*``   ``[H·D, W]``, bias   ``kernel [L, W, H, D]``
``encoder.layers.{i}.self_attn.out_proj.*`` ``[W, H·D]``         ``kernel [L, H, D, W]``
``encoder.layers.{i}.mlp.fc{1,2}.weight``   ``[out, in]``        ``kernel [L, in, out]``
=========================================  ===================  ===========================

The tower prefix is found from the checkpoint: ``""`` for ``CLIPVisionModel`` saved by
transformers 5, ``"vision_model."`` for ``CLIPModel`` and for ``CLIPVisionModel`` saved by
transformers 4; the text tower and projections are ignored. :func:`save_clip_vision` writes
``vision_model.``-prefixed names, which both transformers 4 and 5 load.

:func:`open_checkpoint` (config checked, tensors checked, nothing read) is shared by
:func:`load_clip_vision` and the streaming converter.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionTower
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_config import Field, check_divides, check_fields, read_hf_config
from exo2ego_jax.weights.param_map import (
    MappedCheckpoint,
    ParamMapping,
    check_tensors,
    iter_hf_tensors,
    per_layer,
    plain_params,
    read_params,
)
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

#: Prefix written by :func:`save_clip_vision` (what transformers 4 ``CLIPVisionModel`` uses).
SAVE_PREFIX = "vision_model."
_ANCHOR = "embeddings.patch_embedding.weight"
_SUPPORTED_MODEL_TYPES = ("clip", "clip_vision_model")

#: The vision config fields :meth:`CLIPVisionConfig.from_hf_config` reads; absent or null
#: ones take HF's defaults (``save_pretrained`` may drop them).
CONFIG_FIELDS = (
    Field("image_size", "int", nullable=True, low=1, high=2**14),
    Field("patch_size", "int", nullable=True, low=1, high=2**10),
    Field("hidden_size", "int", nullable=True, low=1, high=2**16),
    Field("intermediate_size", "int", nullable=True, low=1, high=2**18),
    Field("num_hidden_layers", "int", nullable=True, low=1, high=2**10),
    Field("num_attention_heads", "int", nullable=True, low=1, high=2**10),
    Field("num_channels", "int", nullable=True, low=1, high=64),
    Field("layer_norm_eps", "number", nullable=True, low=1e-12, high=1.0),
    Field("hidden_act", "str", nullable=True),
)
_DEFAULTS = CLIPVisionConfig.from_hf_config({}).to_hf_config()


def read_config(path: str | os.PathLike, **fields: Any) -> CLIPVisionConfig:
    """The :class:`CLIPVisionConfig` of a HF CLIP directory's ``config.json``, checked.

    ``fields`` override other config fields (``dtype``, ``scan_layers``...). Raises
    :class:`CheckpointError` naming the field for a non-CLIP ``model_type``, a field of the
    wrong type or outside its sane range, or heads / patches that do not divide.
    """
    hf = read_hf_config(path)
    where = str(Path(path) / "config.json")
    model_type = hf.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} (architectures {hf.get('architectures')}) is "
            f"not a CLIP model; load_clip_vision supports model_type "
            f"{list(_SUPPORTED_MODEL_TYPES)}"
        )
    vision = hf
    if "vision_config" in hf or model_type == "clip":
        vision, where = hf.get("vision_config") or {}, f"{where} vision_config"
        if not isinstance(vision, dict):
            raise CheckpointError(f"{where}: must be an object, got {type(vision).__name__}")
    check_fields(vision, CONFIG_FIELDS, where)
    full = {**_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    check_divides(full, "num_attention_heads", "hidden_size", where)
    check_divides(full, "patch_size", "image_size", where)
    try:
        return CLIPVisionConfig.from_hf_config(hf, **fields)
    except (ValueError, TypeError) as e:  # e.g. an unknown hidden_act
        raise CheckpointError(f"{path}: unusable CLIP config ({e})") from e


def param_mappings(config: CLIPVisionConfig, prefix: str = SAVE_PREFIX) -> list[ParamMapping]:
    """Every param of ``CLIPVisionTower(config)`` and its HF tensor(s) (names ``prefix + ...``)."""
    w, m, h, d = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    c, p, n = config.num_channels, config.patch_size, config.num_patches
    t = (1, 0)  # HF Linear [out, in] -> kernel [in, out]
    # (HF name, our path, HF shape, our shape, perm)
    tower = [
        ("embeddings.patch_embedding.weight", "embeddings/patch_embedding/kernel",
         (w, c, p, p), (p, p, c, w), (2, 3, 1, 0)),  # OIHW -> HWIO
        ("embeddings.class_embedding", "embeddings/class_embedding", (w,), (w,), ()),
        ("embeddings.position_embedding.weight", "embeddings/position_embedding",
         (n + 1, w), (n + 1, w), ()),
        ("pre_layrnorm.weight", "pre_layrnorm/scale", (w,), (w,), ()),
        ("pre_layrnorm.bias", "pre_layrnorm/bias", (w,), (w,), ()),
        ("post_layernorm.weight", "post_layernorm/scale", (w,), (w,), ()),
        ("post_layernorm.bias", "post_layernorm/bias", (w,), (w,), ()),
    ]  # fmt: skip
    layer = [
        ("layer_norm1.weight", "layer_norm1/scale", (w,), (w,), ()),
        ("layer_norm1.bias", "layer_norm1/bias", (w,), (w,), ()),
        *[
            entry
            for proj in ("q_proj", "k_proj", "v_proj")
            for entry in (
                (f"self_attn.{proj}.weight", f"self_attn/{proj}/kernel", (h * d, w), (w, h, d), t),
                (f"self_attn.{proj}.bias", f"self_attn/{proj}/bias", (h * d,), (h, d), ()),
            )
        ],
        ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", (w, h * d), (h, d, w), t),
        ("self_attn.out_proj.bias", "self_attn/out_proj/bias", (w,), (w,), ()),
        ("layer_norm2.weight", "layer_norm2/scale", (w,), (w,), ()),
        ("layer_norm2.bias", "layer_norm2/bias", (w,), (w,), ()),
        ("mlp.fc1.weight", "mlp/fc1/kernel", (m, w), (w, m), t),
        ("mlp.fc1.bias", "mlp/fc1/bias", (m,), (m,), ()),
        ("mlp.fc2.weight", "mlp/fc2/kernel", (w, m), (m, w), t),
        ("mlp.fc2.bias", "mlp/fc2/bias", (w,), (w,), ()),
    ]
    return [
        ParamMapping(tuple(path.split("/")), (prefix + hf,), hf_shape, shape, perm)
        for hf, path, hf_shape, shape, perm in tower
    ] + [
        mapping
        for hf, path, hf_shape, shape, perm in layer
        for mapping in per_layer(
            ("encoder",),
            tuple(path.split("/")),
            f"{prefix}encoder.layers.{{i}}.{hf}",
            config.num_layers,
            config.scan_layers,
            hf_shape=hf_shape,
            shape=shape,
            perm=perm,
        )
    ]


def find_prefix(source: TensorSource) -> str:
    """The name prefix of the vision tower's tensors in a checkpoint."""
    prefixes = sorted(
        n[: -len(_ANCHOR)] for n in source.names() if n.endswith(_ANCHOR) and "text_model" not in n
    )
    if not prefixes:
        raise CheckpointError(
            f"{source.where}: no CLIP vision tower found (no tensor named '*{_ANCHOR}')"
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{source.where}: several vision towers {prefixes}; pass prefix= to choose one"
        )
    return prefixes[0]


def open_checkpoint(
    path: str | os.PathLike, *, prefix: str | None = None, **fields: Any
) -> MappedCheckpoint:
    """A HF CLIP directory checked against its config (``fields`` as :func:`read_config`);
    nothing is read yet. Raises :class:`CheckpointError` for a missing, misshapen or
    non-float tensor, or a layer beyond ``num_hidden_layers``."""
    config = read_config(path, **fields)
    source = TensorSource(path)
    prefix = find_prefix(source) if prefix is None else prefix
    extra = f"{prefix}encoder.layers.{config.num_layers}.layer_norm1.weight"
    if extra in source:
        raise CheckpointError(
            f"{source.describe(extra)} lies beyond the config's "
            f"num_hidden_layers={config.num_layers}"
        )
    mappings = param_mappings(config, prefix)
    check_tensors(source, mappings, " from config.json")
    return MappedCheckpoint(config, source, mappings)


def load_clip_vision(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    param_dtype: Any = None,
    prefix: str | None = None,
    **config_overrides: Any,
) -> tuple[CLIPVisionTower, dict[str, Any]]:
    """Loads a HF ``CLIPVisionModel`` / ``CLIPModel`` directory as ``(module, params)``.

    ``dtype`` is the compute dtype and (unless ``param_dtype`` is given) the params dtype;
    ``config_overrides`` set other :class:`CLIPVisionConfig` fields (``scan_layers``,
    ``remat``...). ``module.apply({'params': params}, pixel_values_nhwc)`` then matches the
    HF model. Raises :class:`CheckpointError` for a missing directory or file, a bad
    ``config.json``, a missing tensor, or a tensor whose shape does not fit the config.
    """
    param_dtype = param_dtype if param_dtype is not None else dtype
    ckpt = open_checkpoint(
        path, prefix=prefix, dtype=dtype, param_dtype=param_dtype, **config_overrides
    )
    params = read_params(ckpt.source, ckpt.mappings, ckpt.config.param_dtype)
    return CLIPVisionTower(ckpt.config), params


def save_clip_vision(
    module_or_config: CLIPVisionTower | CLIPVisionConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    prefix: str = SAVE_PREFIX,
) -> Path:
    """Writes ``params`` as a HF ``CLIPVisionModel`` directory (config.json + safetensors).

    Tensors keep the params' dtype and are converted and written one at a time;
    ``transformers.CLIPVisionModel.from_pretrained(out_dir)`` loads the result.
    """
    config = (
        module_or_config.config
        if isinstance(module_or_config, CLIPVisionTower)
        else module_or_config
    )
    leaves = jax.tree.leaves(plain_params(params))
    hf_config = config.to_hf_config()
    if leaves:
        hf_config["dtype"] = np.dtype(leaves[0].dtype).name
    tensors = iter_hf_tensors(param_mappings(config, prefix), params)
    return write_safetensors(out_dir, tensors, config=hf_config)
