"""The mapping networks F / G <-> one ``.safetensors`` file plus a JSON of their config.

``save_mapping(..., "mapping_F.safetensors")`` writes the weights and, beside them,
``mapping_F.json``: the :class:`MappingConfig` fields, the token width ``features`` (D) and
the visual grid ``(T', H', W')`` the network was trained on, which together rebuild
``MappingNetwork(config, features)`` (:func:`load_mapping`).

Key layout: each parameter's path in the ``MappingNetwork`` params tree joined with ``.``,
stored in our (Flax) layout, float32 unless the params are another dtype. For the paper's
``kind="resnet"`` (the CycleGAN ResNet generator, ``models/mapping.py``)::

    resnet.stem.conv.kernel              [7, 7, D, ngf]      7×7 conv, HWIO
    resnet.stem.conv.bias                [ngf]               (conv_bias=True)
    resnet.stem.norm.scale / .bias       [ngf]               (norm="layer" or instance_affine)
    resnet.down_{0,1}.conv.kernel        [3, 3, C, 2C]       stride-2 conv, zero pad 1
    resnet.block_{i}.conv{1,2}.conv.kernel  [3, 3, 4ngf, 4ngf]  residual block i
    resnet.up_{0,1}.conv.kernel          [3, 3, C, C/2]      transposed conv (see below)
    resnet.head.kernel / .bias           [7, 7, ngf, D] / [D]

and for ``kind="mlp"``: ``mlp.dense_{i}.kernel [in, out]`` / ``mlp.dense_{i}.bias [out]``.
Every conv / transposed conv has ``.bias`` and every norm its ``.scale`` / ``.bias`` when
the config gives them. In PyTorch terms: a ``Conv2d`` weight ``[out, in, kh, kw]`` is
``kernel.transpose(3, 2, 0, 1)``; a ``ConvTranspose2d(k=3, stride=2, padding=1,
output_padding=1)`` weight ``[in, out, kh, kw]`` is ``kernel.transpose(2, 3, 0, 1)`` (no
flip); a ``Linear`` weight is ``kernel.T``. The network acts on ``float[B, S, D]`` tokens
in time-major ``(t, h, w)`` order, each time step's ``H'×W'`` grid padded to a multiple of
4 and cropped back (``models/mapping.py`` has every convention).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from exo2ego_jax.models.mapping import Grid, MappingConfig, MappingNetwork
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.param_map import (
    ParamMapping,
    check_tensors,
    iter_hf_tensors,
    read_params,
    unmapped,
)
from exo2ego_jax.weights.safetensors_format import write_safetensors_file
from exo2ego_jax.weights.tensors import TensorSource
from input_pipeline import atomic

FORMAT = "exo2ego-mapping"
FORMAT_VERSION = 1
_DTYPE_FIELDS = ("dtype", "param_dtype")


def config_path(file: str | os.PathLike) -> Path:
    """The JSON beside a weights file: ``mapping_F.safetensors`` -> ``mapping_F.json``."""
    return Path(file).with_suffix(".json")


def param_mappings(config: MappingConfig, features: int, grid: Grid) -> list[ParamMapping]:
    """Every parameter of ``MappingNetwork(config, features)`` and its ``.``-joined key
    (identity layout), in module order; shapes from ``jax.eval_shape`` (nothing allocated)."""
    tokens = jax.ShapeDtypeStruct((1, math.prod(grid), features), jnp.float32)
    module = MappingNetwork(config, features)
    shapes = jax.eval_shape(lambda t: module.init(jax.random.key(0), t, tuple(grid)), tokens)
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes["params"]))
    return [
        ParamMapping(path, (".".join(path),), tuple(leaf.shape), tuple(leaf.shape))
        for path, leaf in flat.items()
    ]


def _config_json(config: MappingConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    for f in _DTYPE_FIELDS:
        fields[f] = jnp.dtype(fields[f]).name
    return fields


def save_mapping(
    config: MappingConfig,
    features: int,
    grid: Grid,
    params: dict,
    file: str | os.PathLike,
    *,
    info: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes one mapping network's params to ``file`` (``.safetensors``) and its config to
    :func:`config_path` ``(file)``, each atomically; returns both paths.

    ``params`` is the network's tree (``params["F"]`` of the model; boxed or not); ``info``
    adds fields to the JSON (e.g. ``{"name": "F", "direction": "ego -> exo"}``).
    """
    file = Path(file)
    grid = tuple(int(g) for g in grid)
    tensors = list(iter_hf_tensors(param_mappings(config, features, grid), params))
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        **(info or {}),
        "features": int(features),
        "grid": list(grid),
        "config": _config_json(config),
        "key_layout": "params-tree path joined with '.', Flax layout (conv kernels HWIO); "
        "see exo2ego_jax/weights/mapping_net.py",
    }
    write_safetensors_file(file, tensors, {"format": "pt", "exo2ego": FORMAT})
    cfg_file = atomic.write_text(config_path(file), json.dumps(meta, indent=2) + "\n")
    return file, cfg_file


def read_mapping_config(file: str | os.PathLike) -> tuple[MappingConfig, int, Grid, dict]:
    """``(config, features, grid, the whole JSON)`` of a mapping saved by :func:`save_mapping`."""
    where = config_path(file)
    try:
        meta = json.loads(where.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{where}: missing; a mapping file needs the JSON of its config beside it"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: field 'format' is not {FORMAT!r}; not a mapping config")
    fields = dict(meta.get("config") or {})
    known = {f.name for f in dataclasses.fields(MappingConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{where}: config fields {unknown} are not MappingConfig fields")
    try:
        for f in _DTYPE_FIELDS:
            if f in fields:
                fields[f] = jnp.dtype(fields[f])
        config = MappingConfig(**fields)
        features = int(meta["features"])
        grid = tuple(int(g) for g in meta["grid"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad field ({e!r})") from e
    if len(grid) != 3 or min(grid) < 1 or features < 1:
        raise CheckpointError(f"{where}: field 'grid' {list(grid)} / 'features' {features} invalid")
    return config, features, grid, meta


def load_mapping(
    file: str | os.PathLike, dtype: Any = jnp.float32
) -> tuple[MappingNetwork, dict, Grid]:
    """Reads a mapping written by :func:`save_mapping`.

    Returns ``(module, params, grid)``; run it as
    ``module.apply({"params": params}, tokens, grid)`` on ``float[B, T'·H'·W', D]``.
    Every tensor is checked (present, shape, float dtype, nothing extra) before any is read.
    """
    config, features, grid, _ = read_mapping_config(file)
    mappings = param_mappings(config, features, grid)
    source = TensorSource(Path(file))
    check_tensors(source, mappings, f" (from {config_path(file).name})")
    leftover = unmapped(source.names(), mappings)
    if leftover:
        raise CheckpointError(
            f"{source.where}: tensors {leftover[:3]} have no place in the mapping network of "
            f"{config_path(file).name}"
        )
    return MappingNetwork(config, features), read_params(source, mappings, dtype), grid
