"""Loading and saving VideoLLaMA2's ``mm_projector`` (STC connector) weights.

VideoLLaMA2 ships the connector as ``mm_projector.bin``, a pickled PyTorch state dict with
keys such as ``s1.b1.conv1.conv.weight`` (sometimes prefixed ``model.mm_projector.``, as in
a full model checkpoint). This module maps those keys one to one onto the parameter tree of
:class:`exo2ego_jax.models.connector.STCConnector`:

    torch key                         flax path                       layout
    s1.b1.conv1.conv.weight  [O,I,kh,kw]  s1/b1/conv1/conv/kernel  [kh,kw,I,O]  OIHW -> HWIO
    s1.b1.conv1.bn.weight    [C]          s1/b1/conv1/bn/scale     [C]
    s1.b1.se.fc1.{weight,bias}            s1/b1/se/fc1/{kernel,bias}       (1×1 convs)
    s1.b1.downsample.conv.weight          s1/b1/downsample/conv/kernel
    sampler.0.weight  [O,I,kt,kh,kw]      sampler_0/kernel  [kt,kh,kw,I,O]  OIDHW -> DHWIO
    readout.0.weight  [out,in]            readout_0/kernel  [in,out]        Linear transpose

All sizes (channels, depth, MLP depth, bottleneck ratio, group size, SE ratio, sampler
kernel) are inferred from the tensor shapes, then every tensor is checked against the
shapes the inferred config implies.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.models.connector import STCConnector, STCConnectorConfig
from exo2ego_jax.weights.safetensors_io import (
    _DTYPES,
    CheckpointError,
    TensorIndex,
    _read_header,
    write_safetensors,
)

Params = dict[str, Any]

#: One projector tensor: torch key -> (torch shape, flax path, layout kind).
KeySpec = tuple[tuple[int, ...], tuple[str, ...], str]

_BIN_NAMES = ("mm_projector.bin", "mm_projector.pt", "mm_projector.pth")
_MARKER = "mm_projector."


# ----------------------------------------------------------------------------- key table


def _conv_norm(key: str, path: tuple[str, ...], c_in: int, c_out: int, k: int):
    """Keys of a timm ``ConvNormAct`` (bias-free conv + LayerNorm named ``bn``)."""
    yield f"{key}.conv.weight", ((c_out, c_in, k, k), (*path, "conv", "kernel"), "conv")
    yield f"{key}.bn.weight", ((c_out,), (*path, "bn", "scale"), "vector")
    yield f"{key}.bn.bias", ((c_out,), (*path, "bn", "bias"), "vector")


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
                yield f"{key}.se.{fc}.weight", ((b, a, 1, 1), (*path, "se", fc, "kernel"), "conv")
                yield f"{key}.se.{fc}.bias", ((b,), (*path, "se", fc, "bias"), "vector")
        yield from _conv_norm(f"{key}.conv3", (*path, "conv3"), mid, out, 1)
        if block_in != out:
            yield from _conv_norm(f"{key}.downsample", (*path, "downsample"), block_in, out, 1)


def mm_projector_keys(config: STCConnectorConfig) -> dict[str, KeySpec]:
    """Every VideoLLaMA2 state-dict key of ``config`` (no prefix), in torch module order."""
    d = config.hidden_size
    table = dict(_stage("s1", config, config.in_channels))
    table["sampler.0.weight"] = ((d, d, *config.downsample), ("sampler_0", "kernel"), "conv")
    table["sampler.0.bias"] = ((d,), ("sampler_0", "bias"), "vector")
    table.update(_stage("s2", config, d))
    for i in range(config.mlp_depth):
        c_in = d if i == 0 else config.out_size
        name = f"readout_{2 * i}"
        table[f"readout.{2 * i}.weight"] = ((config.out_size, c_in), (name, "kernel"), "linear")
        table[f"readout.{2 * i}.bias"] = ((config.out_size,), (name, "bias"), "vector")
    return table


# ----------------------------------------------------------------------------- layouts


def _to_flax(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # [O, I, *k] -> [*k, I, O]
        return np.transpose(arr, (*range(2, arr.ndim), 1, 0))
    if kind == "linear":  # [out, in] -> [in, out]
        return arr.T
    return arr


def _to_torch(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # [*k, I, O] -> [O, I, *k]
        return np.transpose(arr, (arr.ndim - 1, arr.ndim - 2, *range(arr.ndim - 2)))
    if kind == "linear":
        return arr.T
    return arr


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

    blocks = _indices(shapes, r"^s1\.b(\d+)\.")
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
    readout = [i for i in _indices(shapes, r"^readout\.(\d+)\.weight$") if i % 2 == 0]
    if not readout:
        need("readout.0.weight")
    mid, in_channels, hidden = conv1[0], conv1[1], conv3[0]
    se = shapes.get("s1.b1.se.fc1.weight")
    try:
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
    except (ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"inconsistent STC connector tensor shapes: {e}") from e


# ----------------------------------------------------------------------------- conversion


def _strip_prefix(names) -> tuple[str, dict[str, str]]:
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


def _convert(
    shapes: Mapping[str, tuple[int, ...]],
    get: Callable[[str], np.ndarray],
    dtype: Any,
    where: str,
    sampler_padding: int,
) -> tuple[STCConnector, Params]:
    """Checks every tensor against the inferred config and builds the flax params tree."""
    prefix, names = _strip_prefix(list(shapes))
    local_shapes = {k: tuple(shapes[v]) for k, v in names.items()}
    try:
        config = infer_config(local_shapes, dtype, prefix, sampler_padding)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None
    table = mm_projector_keys(config)
    unknown = [names[k] for k in names if k not in table]
    if unknown:
        raise CheckpointError(
            f"{where}: unexpected tensor {unknown[0]!r} for the STC connector inferred from "
            f"the other tensors ({_describe(config)})"
            + (f" (and {len(unknown) - 1} more: {unknown[1:4]})" if len(unknown) > 1 else "")
        )
    missing = [prefix + k for k in table if k not in names]
    if missing:
        raise CheckpointError(
            f"{where}: tensor {missing[0]!r} missing"
            + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else "")
        )
    for key, (shape, _, _) in table.items():  # all shapes first: fail before converting
        if local_shapes[key] != shape:
            raise CheckpointError(
                f"{where}: tensor {names[key]!r} has shape {list(local_shapes[key])}, "
                f"expected {list(shape)} (inferred {_describe(config)})"
            )
    params: Params = {}
    np_dtype = jnp.dtype(dtype)
    for key, (_, path, kind) in table.items():
        arr = _to_flax(np.asarray(get(names[key])), kind).astype(np_dtype)
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr)
    return STCConnector(config), params


def _torch_to_numpy(t) -> np.ndarray:
    import torch  # only reached for torch tensors, so torch is already importable

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.to(torch.float32)
    return t.numpy()


def convert_state_dict(
    state_dict: Mapping[str, Any], dtype: Any = jnp.float32, *, sampler_padding: int = 1
) -> tuple[STCConnector, Params]:
    """In-memory VideoLLaMA2 connector state dict (torch tensors or numpy) -> (module, params).

    ``module.apply({"params": params}, x)`` runs the connector.
    """

    def get(name: str) -> np.ndarray:
        v = state_dict[name]
        return v if isinstance(v, np.ndarray) else _torch_to_numpy(v)

    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    return _convert(shapes, get, dtype, "state dict", sampler_padding)


# ----------------------------------------------------------------------------- file I/O


def _load_torch(file: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{file}: reading a PyTorch .bin checkpoint needs torch; `pip install torch` (CPU "
            "build is enough) or convert the file to safetensors first"
        ) from e
    try:
        # weights_only: never run arbitrary pickled code from a downloaded file.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad files
        raise CheckpointError(f"{file}: cannot read as a PyTorch state dict ({e})") from e
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise CheckpointError(
            f"{file}: expected a state dict of tensors, got {type(state).__name__}"
        )
    return state


class _SafetensorsFile:
    """Lazy tensors of one ``.safetensors`` file (``TensorIndex`` reads whole directories)."""

    def __init__(self, file: Path):
        self.file = file
        self.header, self.data_start = _read_header(file)

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        begin, end = info["data_offsets"]
        shape, dtype = tuple(info["shape"]), _DTYPES[info["dtype"]]
        size = int(np.prod(shape, dtype=np.int64))
        if end - begin != size * dtype.itemsize:
            raise CheckpointError(
                f"{self.file}: tensor {name!r} byte size does not match its shape"
            )
        if not size:
            return np.zeros(shape, dtype)
        return np.memmap(
            self.file,
            dtype=dtype,
            mode="r",
            offset=self.data_start + begin,
            shape=shape,
        )


def _resolve(path: Path) -> Path:
    """A directory resolves to its mm_projector file, or stays a directory of safetensors."""
    if not path.is_dir():
        return path
    for name in ("mm_projector.safetensors", *_BIN_NAMES):
        if (path / name).is_file():
            return path / name
    return path


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
    path = _resolve(Path(path))
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir():
        index = TensorIndex(path)
        shapes = {n: index.shape(n) for n in index.names()}
        return _convert(shapes, index.get, dtype, str(path), sampler_padding)
    if path.suffix == ".safetensors":
        reader = _SafetensorsFile(path)
        shapes = {n: reader.shape(n) for n in reader.names()}
        return _convert(shapes, reader.get, dtype, str(path), sampler_padding)
    state = _load_torch(path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    get = lambda n: _torch_to_numpy(state[n])
    return _convert(shapes, get, dtype, str(path), sampler_padding)


def to_state_dict(
    config: STCConnectorConfig, params: Params, prefix: str = ""
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(VideoLLaMA2 key, torch-layout array)`` for every connector tensor.

    ``params`` is the tree :class:`STCConnector` uses (``{"params": ...}`` and logical
    partitioning boxes are accepted too).
    """
    params = nn.meta.unbox(params)
    if set(params) == {"params"}:
        params = params["params"]
    for key, (shape, path, kind) in mm_projector_keys(config).items():
        node = params
        try:
            for p in path:
                node = node[p]
        except (KeyError, TypeError):
            raise CheckpointError(f"params have no {'/'.join(path)} (needed for {key!r})") from None
        arr = _to_torch(np.asarray(jax.device_get(node)), kind)
        if arr.shape != shape:
            raise CheckpointError(
                f"param {'/'.join(path)} has shape {list(node.shape)}; {key!r} needs {list(shape)}"
            )
        yield prefix + key, np.ascontiguousarray(arr)


def save_mm_projector(
    config: STCConnectorConfig, params: Params, path: str | os.PathLike, prefix: str = ""
) -> Path:
    """Writes connector params as safetensors with VideoLLaMA2's key names (atomically).

    ``path`` ending in ``.safetensors`` is the file written; any other path is a directory
    that receives ``mm_projector.safetensors``. ``prefix`` (e.g. ``"model.mm_projector."``)
    is prepended to every key. Returns the written file.
    """
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / "mm_projector.safetensors"
    tensors = list(to_state_dict(config, params, prefix))  # validate before touching disk
    file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{file.name}.tmp-", dir=file.parent) as tmp:
        out = write_safetensors(Path(tmp) / "out", tensors, max_shard_bytes=2**62)
        os.replace(out / "model.safetensors", file)
    return file
