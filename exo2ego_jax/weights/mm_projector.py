"""Loading and saving VideoLLaMA2's ``mm_projector`` (STC connector) weights.

VideoLLaMA2 ships the connector as ``mm_projector.bin``, a pickled PyTorch state dict with
keys such as ``s1.b1.conv1.conv.weight`` (sometimes prefixed ``model.mm_projector.``, as in
a full model checkpoint). :func:`param_mappings` maps those keys one to one onto the
parameter tree of :class:`exo2ego_jax.models.connector.STCConnector`:

    torch key                         flax path                       layout
    s1.b1.conv1.conv.weight  [O,I,kh,kw]  s1/b1/conv1/conv/kernel  [kh,kw,I,O]  OIHW -> HWIO
    s1.b1.conv1.bn.weight    [C]          s1/b1/conv1/bn/scale     [C]
    s1.b1.se.fc1.{weight,bias}            s1/b1/se/fc1/{kernel,bias}       (1×1 convs)
    s1.b1.downsample.conv.weight          s1/b1/downsample/conv/kernel
    sampler.0.weight  [O,I,kt,kh,kw]      sampler_0/kernel  [kt,kh,kw,I,O]  OIDHW -> DHWIO
    readout.0.weight  [out,in]            readout_0/kernel  [in,out]        Linear transpose

All sizes (channels, depth, MLP depth, bottleneck ratio, group size, SE ratio, sampler
kernel) are inferred from the tensor shapes, then every tensor is checked against the
shapes the inferred config implies (:func:`open_checkpoint`, shared with the streaming
converter). Files are read through :class:`~exo2ego_jax.weights.tensors.TensorSource`
(a ``.bin`` with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.connector import STCConnector, STCConnectorConfig
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.param_map import (
    MappedCheckpoint,
    ParamMapping,
    check_tensors,
    iter_hf_tensors,
    read_params,
    unmapped,
)
from exo2ego_jax.weights.safetensors_format import write_safetensors_file
from exo2ego_jax.weights.tensors import TensorSource
from input_pipeline import atomic

Params = dict[str, Any]

_FILE_NAMES = (
    "mm_projector.safetensors",
    "mm_projector.bin",
    "mm_projector.pt",
    "mm_projector.pth",
)
_MARKER = "mm_projector."


# ----------------------------------------------------------------------------- mapping table


def _mapping(key: str, hf_shape: tuple[int, ...], path: tuple[str, ...], kind: str, prefix: str):
    """``kind``: ``conv`` (``[O, I, *k]`` -> ``[*k, I, O]``), ``linear`` (transpose), ``vector``."""
    n = len(hf_shape)
    perm = {"conv": (*range(2, n), 1, 0), "linear": (1, 0)}.get(kind, tuple(range(n)))
    shape = tuple(hf_shape[p] for p in perm)
    return ParamMapping(path, (prefix + key,), hf_shape, shape, perm)


def _conv_norm(key: str, path: tuple[str, ...], c_in: int, c_out: int, k: int):
    """Entries of a timm ``ConvNormAct`` (bias-free conv + LayerNorm named ``bn``)."""
    yield f"{key}.conv.weight", (c_out, c_in, k, k), (*path, "conv", "kernel"), "conv"
    yield f"{key}.bn.weight", (c_out,), (*path, "bn", "scale"), "vector"
    yield f"{key}.bn.bias", (c_out,), (*path, "bn", "bias"), "vector"


def _stage(name: str, cfg: STCConnectorConfig, c_in: int):
    mid, out = cfg.bottleneck_channels, cfg.hidden_size
    for i in range(cfg.depth):
        block_in = c_in if i == 0 else out
        key, path = f"{name}.b{i + 1}", (name, f"b{i + 1}")
        yield from _conv_norm(f"{key}.conv1", (*path, "conv1"), block_in, mid, 1)
        yield from _conv_norm(f"{key}.conv2", (*path, "conv2"), cfg.group_size, mid, 3)
        if cfg.se_ratio:
            rd = cfg.se_channels(block_in)
            for fc, (a, b) in (("fc1", (mid, rd)), ("fc2", (rd, mid))):
                yield f"{key}.se.{fc}.weight", (b, a, 1, 1), (*path, "se", fc, "kernel"), "conv"
                yield f"{key}.se.{fc}.bias", (b,), (*path, "se", fc, "bias"), "vector"
        yield from _conv_norm(f"{key}.conv3", (*path, "conv3"), mid, out, 1)
        if block_in != out:
            yield from _conv_norm(f"{key}.downsample", (*path, "downsample"), block_in, out, 1)


def param_mappings(config: STCConnectorConfig, prefix: str = "") -> list[ParamMapping]:
    """Every connector param and its VideoLLaMA2 state-dict key (``prefix + key``), in torch
    module order."""
    d = config.hidden_size
    entries = [
        *_stage("s1", config, config.in_channels),
        ("sampler.0.weight", (d, d, *config.downsample), ("sampler_0", "kernel"), "conv"),
        ("sampler.0.bias", (d,), ("sampler_0", "bias"), "vector"),
        *_stage("s2", config, d),
    ]
    for i in range(config.mlp_depth):
        c_in = d if i == 0 else config.out_size
        name = f"readout_{2 * i}"
        entries.append(
            (f"readout.{2 * i}.weight", (config.out_size, c_in), (name, "kernel"), "linear")
        )
        entries.append((f"readout.{2 * i}.bias", (config.out_size,), (name, "bias"), "vector"))
    return [_mapping(*entry, prefix) for entry in entries]


# ----------------------------------------------------------------------------- config inference


def _indices(names, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.match(pattern, n))})


def _contiguous(indices: list[int], start: int) -> int:
    """How many of ``start, start+1, ...`` are present (later ones are reported as unknown)."""
    n, present = 0, set(indices)
    while start + n in present:
        n += 1
    return n


def infer_config(
    shapes: Mapping[str, tuple[int, ...]],
    dtype: Any = jnp.float32,
    prefix: str = "",
    sampler_padding: int = 1,
) -> STCConnectorConfig:
    """The :class:`STCConnectorConfig` implied by un-prefixed state-dict key -> shape.

    ``sampler_padding`` is the one setting the weights cannot tell (1 for VideoLLaMA2's
    ``STCConnector``, 0 for ``STCConnectorV35``). ``prefix`` only names tensors in errors.
    """

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(
                f"tensor {prefix + key!r} missing: needed to infer the connector sizes"
            )
        return tuple(shapes[key])

    blocks = _indices(shapes, r"^s1\.b(\d{1,6})\.")
    if not blocks:
        hint = ""
        if any(re.match(r"^\d+\.weight$", n) for n in shapes):
            hint = " (its keys look like an MLP projector such as mm_projector_type=mlp2x_gelu)"
        sample = sorted(shapes)[:4]
        raise CheckpointError(
            f"not an STC connector checkpoint: no 's1.b1.*' tensors{hint}; keys start {sample}"
        )
    conv1 = need("s1.b1.conv1.conv.weight")  # [mid, in, 1, 1]
    conv3 = need("s1.b1.conv3.conv.weight")  # [hidden, mid, 1, 1]
    conv2 = need("s1.b1.conv2.conv.weight")  # [mid, group_size, 3, 3]
    sampler = need("sampler.0.weight")  # [hidden, hidden, kt, kh, kw]
    # Linear layers sit at the even Sequential indices (GELUs in between); odd ones are stray.
    readout = [i for i in _indices(shapes, r"^readout\.(\d{1,6})\.weight$") if i % 2 == 0]
    if not readout:
        need("readout.0.weight")
    se = shapes.get("s1.b1.se.fc1.weight")
    try:
        mid, in_channels, hidden = conv1[0], conv1[1], conv3[0]
        return STCConnectorConfig(
            in_channels=in_channels,
            hidden_size=hidden,
            out_size=need("readout.0.weight")[0],
            depth=_contiguous(blocks, start=1),
            mlp_depth=_contiguous([i // 2 for i in readout], start=0),
            downsample=tuple(sampler[2:]),
            sampler_padding=sampler_padding,
            bottle_ratio=mid / hidden,
            group_size=conv2[1],
            se_ratio=(se[0] / in_channels) if se is not None else 0.0,
            dtype=dtype,
            param_dtype=dtype,
        )
    except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:  # odd shapes
        raise CheckpointError(f"inconsistent STC connector tensor shapes: {e!r}") from e


# ----------------------------------------------------------------------------- checking


def _strip_prefix(names: list[str]) -> tuple[str, dict[str, str]]:
    """(prefix, un-prefixed name -> stored name) for the connector's tensors only.

    If any key contains ``mm_projector.`` (``model.mm_projector.``, a PEFT
    ``base_model.model.model.mm_projector.``...), only keys with that one prefix are the
    connector's and the rest (LLM, vision tower) are ignored; otherwise every key must be a
    connector key.
    """
    prefixes = {n[: n.index(_MARKER) + len(_MARKER)] for n in names if _MARKER in n}
    if len(prefixes) > 1:
        raise CheckpointError(
            f"several mm_projector prefixes in one checkpoint: {sorted(prefixes)}"
        )
    prefix = prefixes.pop() if prefixes else ""
    return prefix, {n[len(prefix) :]: n for n in names if n.startswith(prefix)}


def _describe(cfg: STCConnectorConfig) -> str:
    return (
        f"in_channels={cfg.in_channels} hidden_size={cfg.hidden_size} out_size={cfg.out_size} "
        f"depth={cfg.depth} mlp_depth={cfg.mlp_depth} bottle_ratio={cfg.bottle_ratio:g} "
        f"group_size={cfg.group_size} se_ratio={cfg.se_ratio:g} downsample={cfg.downsample}"
    )


def projector_source(path: str | os.PathLike) -> TensorSource:
    """The tensors of ``path``: a ``mm_projector.{safetensors,bin,pt,pth}`` file, a
    directory holding one, or a directory of (sharded) ``*.safetensors`` of a full model."""
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in _FILE_NAMES if (path / n).is_file()), path)
    return TensorSource(path)


def open_checkpoint(
    source: TensorSource | str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    sampler_padding: int = 1,
) -> MappedCheckpoint:
    """The connector in ``source`` (a :class:`TensorSource` or a path for
    :func:`projector_source`): config inferred from the shapes, every tensor checked
    against it; nothing read yet.

    ``sampler_padding`` is not recorded in the weights: 1 for VideoLLaMA2's
    ``STCConnector``. Raises :class:`CheckpointError` naming the tensor that is missing,
    unexpected, of the wrong shape or not float.
    """
    if not isinstance(source, TensorSource):
        source = projector_source(source)
    where = source.where
    prefix, names = _strip_prefix(source.names())
    local_shapes = {k: source.shape(v) for k, v in names.items()}
    try:
        config = infer_config(local_shapes, dtype, prefix, sampler_padding)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    mappings = param_mappings(config, prefix)
    unknown = unmapped(names.values(), mappings)
    if unknown:
        raise CheckpointError(
            f"{where}: unexpected tensor {unknown[0]!r} for the STC connector inferred from "
            f"the other tensors ({_describe(config)})"
            + (f" (and {len(unknown) - 1} more: {unknown[1:4]})" if len(unknown) > 1 else "")
        )
    check_tensors(source, mappings, f" (inferred {_describe(config)})")
    return MappedCheckpoint(config, source, mappings)


# ----------------------------------------------------------------------------- load / save


def convert_state_dict(
    state_dict: Mapping[str, Any], dtype: Any = jnp.float32, *, sampler_padding: int = 1
) -> tuple[STCConnector, Params]:
    """In-memory VideoLLaMA2 connector state dict (torch tensors or numpy) -> (module, params).

    ``module.apply({"params": params}, x)`` runs the connector.
    """
    source = TensorSource.from_state_dict(state_dict)
    ckpt = open_checkpoint(source, dtype, sampler_padding=sampler_padding)
    return STCConnector(ckpt.config), read_params(source, ckpt.mappings, dtype)


def load_mm_projector(
    path: str | os.PathLike, dtype: Any = jnp.float32, *, sampler_padding: int = 1
) -> tuple[STCConnector, Params]:
    """Reads VideoLLaMA2 connector weights into ``(STCConnector(config), params)``.

    Args:
      path: ``mm_projector.bin`` (PyTorch state dict, needs torch), a ``.safetensors`` file,
        or a directory holding either, or a directory of (sharded) ``*.safetensors`` of a
        full VideoLLaMA2 model, whose ``model.mm_projector.*`` tensors are picked out.
      dtype: dtype of the returned params and of the module's computation.
      sampler_padding: not recorded in the weights; 1 for VideoLLaMA2's ``STCConnector``.

    Returns:
      The module (its config inferred from the weights) and the params tree, to be used as
      ``module.apply({"params": params}, x)``.

    Raises:
      CheckpointError: file missing or unreadable; a tensor missing, unexpected, or of the
        wrong shape (the message names it).
    """
    ckpt = open_checkpoint(path, dtype, sampler_padding=sampler_padding)
    return STCConnector(ckpt.config), read_params(ckpt.source, ckpt.mappings, dtype)


def save_mm_projector(
    config: STCConnectorConfig, params: Params, path: str | os.PathLike, prefix: str = ""
) -> Path:
    """Writes connector params with VideoLLaMA2's key names (atomically).

    ``path`` ending in ``.safetensors`` is the file written; ``.bin`` writes a PyTorch state
    dict (``torch.save``, as VideoLLaMA2's own ``mm_projector.bin``; needs torch); any other
    path is a directory that receives ``mm_projector.safetensors``. ``prefix`` (e.g.
    ``"model.mm_projector."``, which VideoLLaMA2's ``pretrain_mm_mlp_adapter`` loader needs:
    it keeps only keys containing ``mm_projector.``) is prepended to every key; ``params``
    may be ``{"params": ...}`` and boxed. Returns the written file.
    """
    path = Path(path)
    file = path if path.suffix in (".safetensors", ".bin") else path / "mm_projector.safetensors"
    # Validate every tensor before touching disk.
    tensors = list(iter_hf_tensors(param_mappings(config, prefix), params))
    if file.suffix == ".bin":
        return _save_torch_state_dict(file, tensors)
    return write_safetensors_file(file, tensors)


def _save_torch_state_dict(file: Path, tensors: list[tuple[str, Any]]) -> Path:
    """``torch.save`` of ``{name: tensor}`` into ``file``, atomically."""
    try:
        import torch  # optional dependency: only the PyTorch .bin format needs it
    except ImportError as e:
        raise CheckpointError(
            f"{file}: writing a PyTorch .bin state dict needs torch; `pip install torch` (CPU "
            "build is enough) or write mm_projector.safetensors instead"
        ) from e
    state = {name: torch.from_numpy(np.array(a, copy=True)) for name, a in tensors}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    file.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_bytes(file, buffer.getvalue())
