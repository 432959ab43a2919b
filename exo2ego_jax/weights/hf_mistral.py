"""Hugging Face ``MistralForCausalLM`` checkpoints <-> :class:`MistralLM` parameters.

Loading reads ``config.json`` and the ``*.safetensors`` files (single or sharded + index)
tensor by tensor through memory maps. Each of our parameters is assembled in one host
buffer (a layer-stacked kernel is filled one layer at a time), moved to the device and
released before the next one, so peak host memory is one model copy plus one stacked
tensor, never two copies of the model.

Every HF linear weight ``[out, in]`` is our kernel ``[in, out]`` transposed; embeddings and
norm weights are copied as they are. The mapping is exposed (:func:`param_mappings`,
:func:`hf_to_param`, :func:`param_to_hf`) for reuse by streaming converters.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.lora import LoRAConfig, lora_param_filter, merge_lora
from exo2ego_jax.models.mistral import MistralConfig, MistralLM, from_hf_config, to_hf_config
from exo2ego_jax.weights.safetensors_io import (
    CheckpointError,
    TensorIndex,
    read_hf_config,
    write_safetensors,
)

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM",)

# (HF name inside ``model.layers.{i}.``, our path inside one block, HF tensor is [out, in])
_LAYER_MAP: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), True),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), True),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), True),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), True),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), True),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
    ("input_layernorm.weight", ("input_layernorm", "scale"), False),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), False),
)


class ParamMapping(NamedTuple):
    """One of our parameters and the HF tensors it is made of.

    ``hf_names[i]`` fills ``param[i]`` when ``stacked`` (layer axis first), else the whole
    parameter (one name). ``transpose``: HF ``[out, in]`` vs our ``[in, out]``.
    """

    path: tuple[str, ...]
    hf_names: tuple[str, ...]
    stacked: bool
    transpose: bool


def param_mappings(config: MistralConfig) -> list[ParamMapping]:
    """All base (non-LoRA) parameters of ``MistralLM(config)`` in HF checkpoint order."""
    maps = [
        ParamMapping(("embed_tokens", "embedding"), ("model.embed_tokens.weight",), False, False)
    ]
    for hf_suffix, sub, transpose in _LAYER_MAP:
        names = tuple(f"model.layers.{i}.{hf_suffix}" for i in range(config.num_layers))
        if config.scan_layers:
            maps.append(ParamMapping(("layers", *sub), names, True, transpose))
        else:
            maps += [
                ParamMapping((f"layers_{i}", *sub), (n,), False, transpose)
                for i, n in enumerate(names)
            ]
    maps.append(ParamMapping(("norm", "scale"), ("model.norm.weight",), False, False))
    if not config.tie_word_embeddings:
        maps.append(ParamMapping(("lm_head", "kernel"), ("lm_head.weight",), False, True))
    return maps


def hf_to_param(tensor: np.ndarray, transpose: bool) -> np.ndarray:
    """One HF tensor in our layout (a view; no copy)."""
    return tensor.T if transpose else tensor


def param_to_hf(array: np.ndarray, transpose: bool) -> np.ndarray:
    """One of our (per-layer) arrays in HF layout, contiguous."""
    return np.ascontiguousarray(array.T if transpose else array)


def _hf_shape(shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    return tuple(reversed(shape)) if transpose else tuple(shape)


def _check_config(hf: dict, path: Any) -> None:
    model_type = hf.get("model_type")
    if model_type != "mistral":
        raise CheckpointError(
            f"{path}: model_type={model_type!r} is not supported by load_mistral "
            "(expected 'mistral')"
        )
    archs = hf.get("architectures") or list(SUPPORTED_ARCHITECTURES)
    if not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(
            f"{path}: architectures={archs} not supported "
            f"(expected one of {SUPPORTED_ARCHITECTURES})"
        )


def _get_path(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _unbox(tree: Any) -> Any:
    """Strips ``nn.LogicallyPartitioned`` boxes (freshly initialised params carry them)."""
    boxed = lambda x: hasattr(x, "unbox")
    return jax.tree_util.tree_map(lambda x: x.unbox() if boxed(x) else x, tree, is_leaf=boxed)


def _abstract_params(module: MistralLM) -> dict:
    """Shapes / dtypes of every parameter, without allocating any."""
    init = lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return _unbox(jax.eval_shape(init)["params"])


def _init_adapters(module: MistralLM, rng: jax.Array) -> dict:
    """Only the LoRA leaves of ``module.init``; jit dead-code-eliminates the base weights."""

    @jax.jit
    def init(rng):
        params = _unbox(module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])
        flat = jax.tree_util.tree_leaves_with_path(params)
        return {tuple(k.key for k in p): v for p, v in flat if lora_param_filter(p)}

    return init(rng)


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
    a missing tensor or a tensor of the wrong shape (naming it).
    """
    hf = read_hf_config(path)
    _check_config(hf, path)
    try:
        config = from_hf_config(
            hf, **{"dtype": dtype, "param_dtype": dtype, "lora": lora, **config_overrides}
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: unsupported or incomplete config.json ({e!r})") from e
    module = MistralLM(config)
    expected = _abstract_params(module)
    index = TensorIndex(path)

    used = set()
    params: dict = {}
    for m in param_mappings(config):
        want = _get_path(expected, m.path)
        per_tensor = want.shape[1:] if m.stacked else want.shape
        hf_shape = _hf_shape(per_tensor, m.transpose)
        buf = np.empty(want.shape, dtype=np.dtype(want.dtype))
        for i, name in enumerate(m.hf_names):
            found = index.shape(name)  # raises CheckpointError naming a missing tensor
            if found != hf_shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(found)} but the config "
                    f"(config.json) expects {list(hf_shape)}"
                )
            # Read the tensor sequentially (np.array of the memmap), then transpose in RAM:
            # a transposed read straight from the map would stride across the file.
            src = hf_to_param(np.array(index.get(name)), m.transpose)
            if m.stacked:
                buf[i] = src  # also converts to the parameter dtype
            else:
                buf[...] = src
            del src
            used.add(name)
        _set_path(params, m.path, jnp.asarray(buf))
        del buf

    leftover = unused_tensors(index.names(), used, config)
    if leftover:
        raise CheckpointError(
            f"{path}: {len(leftover)} tensors do not belong to a MistralForCausalLM with this "
            f"config, e.g. {leftover[:5]}"
        )
    if lora is not None:
        adapters = _init_adapters(module, lora_rng if lora_rng is not None else jax.random.key(0))
        for p, v in adapters.items():
            _set_path(params, p, v)
    return module, params


def _unwrap(params: dict) -> dict:
    if set(params) == {"params"}:
        params = params["params"]
    return _unbox(params)


def iter_hf_tensors(config: MistralConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` one tensor at a time, pulling one layer to the host at a
    time. Adapters (``config.lora``) are merged per tensor, ``kernel + scale * A @ B``, so
    no merged copy of the whole model is ever built."""
    for m in param_mappings(config):
        parent = _get_path(params, m.path[:-1])
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
            yield name, param_to_hf(np.asarray(tensor), m.transpose)


def save_mistral(
    module_or_config: MistralLM | MistralConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> os.PathLike:
    """Writes an HF ``MistralForCausalLM`` directory (``config.json`` + safetensors).

    LoRA adapters (if the config has LoRA) are merged into their kernels tensor by tensor as
    they are written. Tensors keep the params' dtype; ``config.json`` records it as
    ``torch_dtype``.
    """
    config = module_or_config
    if isinstance(module_or_config, MistralLM):
        config = module_or_config.config
    params = _unwrap(params)
    first = _get_path(params, ("embed_tokens", "embedding"))
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        np.dtype(first.dtype).name, "float32"
    )
    return write_safetensors(
        out_dir,
        iter_hf_tensors(config, params),
        max_shard_bytes=max_shard_bytes,
        config=to_hf_config(dataclasses.replace(config, lora=None), torch_dtype=torch_dtype),
    )
