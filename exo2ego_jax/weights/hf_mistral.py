"""Hugging Face ``MistralForCausalLM`` checkpoints <-> :class:`MistralLM` parameters.

Loading checks ``config.json`` (:func:`read_config`) and every tensor's presence, shape
and dtype (:func:`open_checkpoint`, shared with the streaming converter) before reading
anything, then reads the ``*.safetensors`` files (single or sharded + index) tensor by
tensor: each parameter is assembled in one host buffer (a layer-stacked kernel is filled
one layer at a time), moved to the device and released before the next one, so peak host
memory is one model copy plus one stacked tensor, never two copies of the model.

Every HF linear weight ``[out, in]`` is our kernel ``[in, out]`` transposed; embeddings and
norm weights are copied as they are (:func:`param_mappings`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.lora import LoRAConfig, lora_param_filter, merge_lora
from exo2ego_jax.models.mistral import MistralConfig, MistralLM, from_hf_config, to_hf_config
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_config import Field, check_divides, check_fields, read_hf_config
from exo2ego_jax.weights.param_map import (
    MappedCheckpoint,
    ParamMapping,
    check_tensors,
    get_param,
    per_layer,
    plain_params,
    read_params,
    set_param,
)
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM",)

#: The fields :func:`~exo2ego_jax.models.mistral.from_hf_config` reads.
CONFIG_FIELDS = (
    Field("vocab_size", "int", required=True, low=1, high=2**20),
    Field("hidden_size", "int", required=True, low=1, high=2**16),
    Field("intermediate_size", "int", required=True, low=1, high=2**18),
    Field("num_hidden_layers", "int", required=True, low=1, high=2**10),
    Field("num_attention_heads", "int", required=True, low=1, high=2**10),
    Field("num_key_value_heads", "int", nullable=True, low=1, high=2**10),
    Field("head_dim", "int", nullable=True, low=2, high=2**12),
    Field("max_position_embeddings", "int", low=1, high=2**24),
    Field("sliding_window", "int", nullable=True, low=1, high=2**24),
    Field("rope_theta", "number", low=1.0, high=1e12),
    Field("rms_norm_eps", "number", low=1e-12, high=1.0),
    Field("initializer_range", "number", low=0.0, high=10.0),
    Field("tie_word_embeddings", "bool"),
    Field("hidden_act", "str"),
    Field("rope_scaling", "object", nullable=True),
    Field("rope_parameters", "object", nullable=True),
    Field("architectures", "str_list", nullable=True),
)


def read_config(path: str | os.PathLike, **fields: Any) -> MistralConfig:
    """The :class:`MistralConfig` of a HF Mistral directory's ``config.json``, checked.

    ``fields`` override config fields (``dtype``, ``lora``, ``scan_layers``...). Raises
    :class:`CheckpointError` naming the field for another architecture, a missing field, a
    field of the wrong type or outside its sane range, or heads that do not divide.
    """
    hf = read_hf_config(path)
    where = str(Path(path) / "config.json")
    model_type = hf.get("model_type")
    if model_type != "mistral":
        raise CheckpointError(
            f"{path}: model_type={model_type!r} is not supported by load_mistral "
            "(expected 'mistral')"
        )
    check_fields(hf, CONFIG_FIELDS, where)
    archs = hf.get("architectures") or list(SUPPORTED_ARCHITECTURES)
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(
            f"{path}: architectures={archs} not supported "
            f"(expected one of {SUPPORTED_ARCHITECTURES})"
        )
    if hf.get("head_dim") is None:
        check_divides(hf, "num_attention_heads", "hidden_size", where)
    kv_heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    sizes = {**hf, "num_key_value_heads": kv_heads}
    check_divides(sizes, "num_key_value_heads", "num_attention_heads", where)
    try:
        return from_hf_config(hf, **fields)
    except (ValueError, TypeError) as e:  # unsupported settings, odd rope_parameters
        raise CheckpointError(f"{path}: unsupported or incomplete config.json ({e!r})") from e


def param_mappings(config: MistralConfig) -> list[ParamMapping]:
    """All base (non-LoRA) parameters of ``MistralLM(config)`` in HF checkpoint order."""
    v, d, f = config.vocab_size, config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    t = (1, 0)  # HF Linear [out, in] -> kernel [in, out]
    # (HF name inside ``model.layers.{i}.``, our path inside one block, HF shape, perm)
    layer = (
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (q, d), t),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (kv, d), t),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (kv, d), t),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, q), t),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), t),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), t),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), t),
        ("input_layernorm.weight", ("input_layernorm", "scale"), (d,), ()),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,), ()),
    )
    maps = [
        ParamMapping(("embed_tokens", "embedding"), ("model.embed_tokens.weight",), (v, d), (v, d))
    ]
    for hf_suffix, sub, hf_shape, perm in layer:
        shape = tuple(hf_shape[p] for p in perm) if perm else hf_shape
        maps += per_layer(
            (),
            sub,
            f"model.layers.{{i}}.{hf_suffix}",
            config.num_layers,
            config.scan_layers,
            hf_shape=hf_shape,
            shape=shape,
            perm=perm,
        )
    maps.append(ParamMapping(("norm", "scale"), ("model.norm.weight",), (d,), (d,)))
    if not config.tie_word_embeddings:
        maps.append(ParamMapping(("lm_head", "kernel"), ("lm_head.weight",), (v, d), (d, v), t))
    return maps


def unused_tensors(names: Iterable[str], used: set[str], config: MistralConfig) -> list[str]:
    """Checkpoint tensors a ``MistralForCausalLM`` with ``config`` has no place for.

    Rotary ``inv_freq`` buffers (recomputed) and a tied ``lm_head.weight`` are not leftovers.
    """
    return [
        n
        for n in names
        if n not in used
        and not n.endswith("rotary_emb.inv_freq")
        and not (config.tie_word_embeddings and n == "lm_head.weight")
    ]


def open_checkpoint(path: str | os.PathLike, **fields: Any) -> MappedCheckpoint:
    """A HF Mistral directory checked against its config (``fields`` as
    :func:`read_config`); nothing is read yet. Raises :class:`CheckpointError` for a
    missing, misshapen or non-float tensor, or one the model has no place for."""
    config = read_config(path, **fields)
    source = TensorSource(path)
    mappings = param_mappings(config)
    check_tensors(source, mappings, " from config.json")
    used = {n for m in mappings for n in m.hf_names}
    leftover = unused_tensors(source.names(), used, config)
    if leftover:
        raise CheckpointError(
            f"{path}: {len(leftover)} tensors do not belong to a MistralForCausalLM with this "
            f"config, e.g. {[source.describe(n) for n in leftover[:3]]}"
        )
    return MappedCheckpoint(config, source, mappings)


def _init_adapters(module: MistralLM, rng: jax.Array) -> dict:
    """Only the LoRA leaves of ``module.init``; jit dead-code-eliminates the base weights."""

    @jax.jit
    def init(rng):
        params = nn.meta.unbox(module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        flat = jax.tree_util.tree_leaves_with_path(params)
        return {tuple(k.key for k in p): v for p, v in flat if lora_param_filter(p)}

    return init(rng)


def load_mistral(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    lora: LoRAConfig | None = None,
    *,
    lora_rng: jax.Array | None = None,
    **config_overrides: Any,
) -> tuple[MistralLM, dict]:
    """Loads an HF Mistral directory into ``(MistralLM, params)``.

    ``params`` is the inner parameter dict (apply with ``{'params': params}``), stored in
    ``dtype`` (also the compute dtype unless ``config_overrides`` sets ``dtype``). With
    ``lora``, adapters are added at their initial values (``lora_b == 0``, so the model
    computes exactly the checkpoint's function); ``lora_a`` is drawn from ``lora_rng``
    (default ``jax.random.key(0)``). ``config_overrides`` go to :class:`MistralConfig`
    (e.g. ``scan_layers=False``, ``remat_policy="full"``).

    Raises :class:`CheckpointError` for a missing directory, an unsupported architecture,
    a bad ``config.json`` field, a missing tensor or a tensor of the wrong shape (naming it).
    """
    fields = {"dtype": dtype, "param_dtype": dtype, "lora": lora, **config_overrides}
    ckpt = open_checkpoint(path, **fields)
    module = MistralLM(ckpt.config)
    params = read_params(ckpt.source, ckpt.mappings, ckpt.config.param_dtype)
    if lora is not None:
        adapters = _init_adapters(module, lora_rng if lora_rng is not None else jax.random.key(0))
        for p, v in adapters.items():
            set_param(params, p, v)
    return module, params


def iter_hf_tensors(config: MistralConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` one tensor at a time, pulling one layer to the host at a
    time. Adapters (``config.lora``) are merged per tensor, ``kernel + scale * A @ B``, so
    no merged copy of the whole model is ever built."""
    for m in param_mappings(config):
        parent = get_param(params, m.path[:-1], m.hf_names[0])
        value = parent[m.path[-1]]
        adapter = (parent["lora_a"], parent["lora_b"]) if "lora_a" in parent else None
        if adapter is not None and config.lora is None:
            raise CheckpointError(f"{'/'.join(m.path)}: LoRA adapters but the config has lora=None")
        for i, name in enumerate(m.hf_names):
            if adapter is None:
                tensor = value[i] if m.stacked else value
            else:
                part = (lambda x, i=i: x[i]) if m.stacked else (lambda x: x)
                tensor = merge_lora(
                    {"kernel": part(value), "lora_a": part(adapter[0]), "lora_b": part(adapter[1])},
                    config.lora,
                )["kernel"]
            yield name, m.to_hf(np.asarray(tensor))


def save_mistral(
    module_or_config: MistralLM | MistralConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Any = None,
) -> os.PathLike:
    """Writes an HF ``MistralForCausalLM`` directory (``config.json`` + safetensors).

    LoRA adapters (if the config has LoRA) are merged into their kernels tensor by tensor as
    they are written (in float32, then cast). Tensors keep the params' dtype unless
    ``dtype`` (``float32`` / ``bfloat16`` / ``float16``) is given; ``config.json`` records
    it as ``torch_dtype``.
    """
    config = module_or_config
    if isinstance(module_or_config, MistralLM):
        config = module_or_config.config
    params = plain_params(params)
    first = get_param(params, ("embed_tokens", "embedding"), "model.embed_tokens.weight")
    out_dtype = np.dtype(first.dtype if dtype is None else dtype)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        out_dtype.name, None if dtype is not None else "float32"
    )
    if torch_dtype is None:
        raise CheckpointError(
            f"save_mistral: dtype {out_dtype.name} is not a checkpoint dtype; use float32, "
            "bfloat16 or float16"
        )
    tensors = iter_hf_tensors(config, params)
    if dtype is not None:
        tensors = ((name, a.astype(out_dtype, copy=False)) for name, a in tensors)
    return write_safetensors(
        out_dir,
        tensors,
        max_shard_bytes=max_shard_bytes,
        config=to_hf_config(dataclasses.replace(config, lora=None), torch_dtype=torch_dtype),
    )
