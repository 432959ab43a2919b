"""Hugging Face CLIP vision checkpoints ↔ :class:`~exo2ego_jax.models.clip.CLIPVisionTower`.

Reads a ``CLIPVisionModel`` or ``CLIPModel`` directory (``config.json`` + safetensors,
sharded or not) tensor by tensor, converting layouts:

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

The pure pieces (:func:`tensor_map`, :func:`iter_flax_params`, :func:`iter_hf_tensors`)
take no files, so the streaming converter can reuse them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionTower
from exo2ego_jax.weights.safetensors_io import (
    CheckpointError,
    TensorIndex,
    read_hf_config,
    write_safetensors,
)

#: Prefix written by :func:`save_clip_vision` (what transformers 4 ``CLIPVisionModel`` uses).
SAVE_PREFIX = "vision_model."
_ANCHOR = "embeddings.patch_embedding.weight"
_SUPPORTED_MODEL_TYPES = ("clip", "clip_vision_model")

Array = np.ndarray
Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one HF tensor maps onto one Flax param (one layer's slice, for per-layer ones).

    ``hf_name`` has a ``{i}`` placeholder when ``per_layer``; ``flax_path`` is the path in
    the scan layout (``encoder/layers/...``, leading ``layers`` axis).
    """

    hf_name: str
    flax_path: Path_
    hf_shape: tuple[int, ...]
    to_flax: Callable[[Array], Array]
    to_hf: Callable[[Array], Array]
    per_layer: bool = False


def _same(a: Array) -> Array:
    return a


def _linear(out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF Linear ``[out, in]`` ↔ Flax kernel ``[in, *out_shape]`` (and back)."""

    def to_flax(a: Array) -> Array:
        return a.T.reshape(a.shape[1], *out_shape)

    def to_hf(a: Array) -> Array:
        return a.reshape(a.shape[0], -1).T

    return to_flax, to_hf


def _linear_in(in_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """HF Linear ``[out, H·D]`` ↔ Flax kernel ``[H, D, out]``."""

    def to_flax(a: Array) -> Array:
        return a.T.reshape(*in_shape, a.shape[0])

    def to_hf(a: Array) -> Array:
        return a.reshape(-1, a.shape[-1]).T

    return to_flax, to_hf


def _reshape(shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    def to_flax(a: Array) -> Array:
        return a.reshape(shape)

    def to_hf(a: Array) -> Array:
        return a.reshape(-1)

    return to_flax, to_hf


_ID = (_same, _same)
_CONV = (
    lambda a: a.transpose(2, 3, 1, 0),  # OIHW → HWIO
    lambda a: a.transpose(3, 2, 0, 1),
)


def tensor_map(config: CLIPVisionConfig) -> list[TensorSpec]:
    """Every tensor of the vision tower, HF name (without prefix) → Flax param."""
    w, m, h, d = config.hidden_size, config.intermediate_size, config.num_heads, config.head_dim
    c, p, n = config.num_channels, config.patch_size, config.num_patches
    # (HF name, Flax path, HF shape, (to_flax, to_hf))
    tower = [
        (
            "embeddings.patch_embedding.weight",
            "embeddings/patch_embedding/kernel",
            (w, c, p, p),
            _CONV,
        ),
        ("embeddings.class_embedding", "embeddings/class_embedding", (w,), _ID),
        ("embeddings.position_embedding.weight", "embeddings/position_embedding", (n + 1, w), _ID),
        ("pre_layrnorm.weight", "pre_layrnorm/scale", (w,), _ID),
        ("pre_layrnorm.bias", "pre_layrnorm/bias", (w,), _ID),
        ("post_layernorm.weight", "post_layernorm/scale", (w,), _ID),
        ("post_layernorm.bias", "post_layernorm/bias", (w,), _ID),
    ]
    layer = [
        ("layer_norm1.weight", "layer_norm1/scale", (w,), _ID),
        ("layer_norm1.bias", "layer_norm1/bias", (w,), _ID),
        *[
            entry
            for proj in ("q_proj", "k_proj", "v_proj")
            for entry in (
                (
                    f"self_attn.{proj}.weight",
                    f"self_attn/{proj}/kernel",
                    (h * d, w),
                    _linear((h, d)),
                ),
                (f"self_attn.{proj}.bias", f"self_attn/{proj}/bias", (h * d,), _reshape((h, d))),
            )
        ],
        ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", (w, h * d), _linear_in((h, d))),
        ("self_attn.out_proj.bias", "self_attn/out_proj/bias", (w,), _ID),
        ("layer_norm2.weight", "layer_norm2/scale", (w,), _ID),
        ("layer_norm2.bias", "layer_norm2/bias", (w,), _ID),
        ("mlp.fc1.weight", "mlp/fc1/kernel", (m, w), _linear((m,))),
        ("mlp.fc1.bias", "mlp/fc1/bias", (m,), _ID),
        ("mlp.fc2.weight", "mlp/fc2/kernel", (w, m), _linear((w,))),
        ("mlp.fc2.bias", "mlp/fc2/bias", (w,), _ID),
    ]
    return [TensorSpec(hf, tuple(fp.split("/")), shape, *fns) for hf, fp, shape, fns in tower] + [
        TensorSpec(
            f"encoder.layers.{{i}}.{hf}",
            ("encoder", "layers", *fp.split("/")),
            shape,
            *fns,
            per_layer=True,
        )
        for hf, fp, shape, fns in layer
    ]


def _layer_path(path: Path_, i: int, scan_layers: bool) -> tuple[Path_, int | None]:
    """(path in the params tree, index on the stacked axis or None) of layer ``i``."""
    if scan_layers:
        return path, i
    return ("encoder", f"layers_{i}", *path[2:]), None


def _check_shape(name: str, expected: tuple[int, ...], found: tuple[int, ...]) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(
            f"tensor {name!r}: expected shape {tuple(expected)} from the config, "
            f"found {tuple(found)}"
        )


def iter_flax_params(
    config: CLIPVisionConfig,
    get: Callable[[str], Array],
    prefix: str = SAVE_PREFIX,
    dtype: Any = None,
) -> Iterator[tuple[Path_, Array]]:
    """Yields ``(flax_path, numpy array)`` for every param, reading one tensor at a time.

    ``get(hf_name)`` returns a tensor in HF layout (e.g. ``TensorIndex.get``); per-layer
    tensors are stacked along the leading ``layers`` axis when ``config.scan_layers``.
    Shapes are checked against ``config`` before conversion.
    """
    dtype = np.dtype(dtype or config.param_dtype)
    for spec in tensor_map(config):
        if not spec.per_layer:
            name = prefix + spec.hf_name
            a = get(name)
            _check_shape(name, spec.hf_shape, a.shape)
            yield spec.flax_path, np.asarray(spec.to_flax(a), dtype=dtype)
            continue
        stacked = None
        for i in range(config.num_layers):
            name = prefix + spec.hf_name.format(i=i)
            a = get(name)
            _check_shape(name, spec.hf_shape, a.shape)
            a = np.asarray(spec.to_flax(a), dtype=dtype)
            path, idx = _layer_path(spec.flax_path, i, config.scan_layers)
            if idx is None:
                yield path, a
                continue
            if stacked is None:
                stacked = np.empty((config.num_layers, *a.shape), dtype)
            stacked[idx] = a
        if stacked is not None:
            yield spec.flax_path, stacked


def _get_path(tree: Mapping[str, Any], path: Path_) -> Any:
    for k in path:
        try:
            tree = tree[k]
        except KeyError:
            raise CheckpointError(f"param {'/'.join(path)} not found in the params tree") from None
    return tree


def iter_hf_tensors(
    config: CLIPVisionConfig, params: Mapping[str, Any], prefix: str = SAVE_PREFIX
) -> Iterator[tuple[str, Array]]:
    """Yields ``(hf_name, numpy array in HF layout)`` for every param, one at a time."""
    params = _plain_params(params)
    for spec in tensor_map(config):
        if not spec.per_layer:
            a = spec.to_hf(np.asarray(_get_path(params, spec.flax_path)))
            _check_shape(prefix + spec.hf_name, spec.hf_shape, a.shape)
            yield prefix + spec.hf_name, np.ascontiguousarray(a)
            continue
        for i in range(config.num_layers):
            path, idx = _layer_path(spec.flax_path, i, config.scan_layers)
            leaf = _get_path(params, path)
            a = spec.to_hf(np.asarray(leaf[idx] if idx is not None else leaf))
            name = prefix + spec.hf_name.format(i=i)
            _check_shape(name, spec.hf_shape, a.shape)
            yield name, np.ascontiguousarray(a)


def _set_path(tree: dict, path: Path_, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _plain_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts ``params`` or ``{'params': params}``, boxed (from ``init``) or not."""
    if set(params) == {"params"}:
        params = params["params"]
    return nn.unbox(params)


def find_prefix(index: TensorIndex) -> str:
    """The name prefix of the vision tower's tensors in a checkpoint."""
    prefixes = sorted(
        n[: -len(_ANCHOR)] for n in index.names() if n.endswith(_ANCHOR) and "text_model" not in n
    )
    if not prefixes:
        raise CheckpointError(
            f"{index.path}: no CLIP vision tower found (no tensor named '*{_ANCHOR}')"
        )
    if len(prefixes) > 1:
        raise CheckpointError(
            f"{index.path}: several vision towers {prefixes}; pass prefix= to choose one"
        )
    return prefixes[0]


def _check_architecture(path: str | os.PathLike, hf_config: Mapping[str, Any]) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{Path(path) / 'config.json'}: model_type {model_type!r} "
            f"(architectures {hf_config.get('architectures')}) is not a CLIP model; "
            f"load_clip_vision supports model_type {list(_SUPPORTED_MODEL_TYPES)}"
        )


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
    HF model. Raises :class:`CheckpointError` for a missing directory or file, a non-CLIP
    ``model_type``, a missing tensor, or a tensor whose shape does not fit the config.
    """
    hf_config = read_hf_config(path)
    _check_architecture(path, hf_config)
    try:
        config = CLIPVisionConfig.from_hf_config(
            hf_config,
            dtype=dtype,
            param_dtype=param_dtype if param_dtype is not None else dtype,
            **config_overrides,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: unusable CLIP config ({e})") from e
    index = TensorIndex(path)
    prefix = find_prefix(index) if prefix is None else prefix
    extra = f"{prefix}encoder.layers.{config.num_layers}.layer_norm1.weight"
    if extra in index:
        raise CheckpointError(
            f"{path}: checkpoint has a tensor {extra!r} beyond the config's "
            f"num_hidden_layers={config.num_layers}"
        )
    params: dict[str, Any] = {}
    for flax_path, array in iter_flax_params(config, index.get, prefix):
        _set_path(params, flax_path, jnp.asarray(array))
    return CLIPVisionTower(config), params


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
    leaves = jax.tree.leaves(_plain_params(params))
    hf_config = config.to_hf_config()
    if leaves:
        hf_config["dtype"] = np.dtype(leaves[0].dtype).name
    return write_safetensors(out_dir, iter_hf_tensors(config, params, prefix), config=hf_config)
