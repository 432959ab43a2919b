"""The one mapping-table idiom: :class:`ParamMapping`, and the loops every table shares.

A model's table (``hf_clip.param_mappings``, ``hf_mistral.param_mappings``,
``mm_projector.param_mappings``) lists each of our parameters with the checkpoint tensors
it is made of and one layout rule::

    ours = hf.transpose(perm).reshape(shape)          hf = ours.reshape(...).transpose(perm⁻¹)

which covers every layout we meet: a linear weight ``[out, in]`` -> kernel ``[in, out]``
(``perm=(1, 0)``), a conv ``OIHW`` -> ``HWIO`` (``perm=(2, 3, 1, 0)``), an attention
projection ``[H·D, W]`` -> ``[W, H, D]`` (transpose, then reshape). A layer-stacked
parameter (``nn.scan`` layout) lists one tensor per layer.

The same table drives loading (:func:`check_tensors` then :func:`read_params`), saving
(:func:`iter_hf_tensors`) and the streaming converter (which streams a tensor by rows when
``streamable``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.tensors import TensorSource

Path_ = tuple[str, ...]
#: Checkpoint dtypes a parameter may be read from (safetensors tags F64, F32, F16, BF16).
FLOAT_DTYPES = tuple(np.dtype(t) for t in ("float64", "float32", "float16", jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class ParamMapping:
    """One of our parameters and the checkpoint tensors it is made of.

    Attributes:
      path: the parameter's path in our params tree.
      hf_names: checkpoint tensor names: with ``stacked``, ``hf_names[i]`` is layer ``i`` of
        a parameter with a leading layer axis; otherwise the one tensor of the parameter.
      hf_shape: shape of each checkpoint tensor.
      shape: our shape of each tensor (the parameter's shape without the layer axis).
      perm: axis order of the checkpoint tensor in ours (identity by default).
      stacked: the parameter has a leading layer axis, one tensor per layer.
    """

    path: Path_
    hf_names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    perm: tuple[int, ...] = ()
    stacked: bool = False

    def __post_init__(self):
        perm = self.perm or tuple(range(len(self.hf_shape)))
        object.__setattr__(self, "perm", tuple(perm))
        if sorted(self.perm) != list(range(len(self.hf_shape))):
            raise ValueError(f"{self.path}: perm {self.perm} does not fit shape {self.hf_shape}")
        if math.prod(self.hf_shape) != math.prod(self.shape):
            raise ValueError(f"{self.path}: {self.hf_shape} cannot be reshaped to {self.shape}")

    @property
    def param_shape(self) -> tuple[int, ...]:
        """The whole parameter's shape (with the layer axis when ``stacked``)."""
        return (len(self.hf_names), *self.shape) if self.stacked else self.shape

    @property
    def _permuted(self) -> tuple[int, ...]:
        return tuple(self.hf_shape[p] for p in self.perm)

    @property
    def streamable(self) -> bool:
        """No reshape: a run of the checkpoint tensor's leading rows is a block of ours."""
        return self._permuted == self.shape

    def to_ours(self, a: np.ndarray) -> np.ndarray:
        """A checkpoint tensor ``[*hf_shape]`` in our layout ``[*shape]`` (a view if it can)."""
        return a.transpose(self.perm).reshape(self.shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        """One of our tensors ``[*shape]`` in checkpoint layout ``[*hf_shape]``, contiguous."""
        return np.ascontiguousarray(a.reshape(self._permuted).transpose(np.argsort(self.perm)))


def per_layer(
    before: Path_,
    sub: Path_,
    hf_template: str,
    num_layers: int,
    scan_layers: bool,
    **layout: Any,
) -> list[ParamMapping]:
    """One parameter of every layer: one stacked mapping at ``(*before, "layers", *sub)``, or
    (``scan_layers=False``) one mapping per layer at ``(*before, f"layers_{i}", *sub)``.

    ``hf_template`` has an ``{i}`` for the layer; ``layout`` is ``hf_shape``, ``shape``,
    ``perm`` of one layer's tensor.
    """
    names = tuple(hf_template.format(i=i) for i in range(num_layers))
    if scan_layers:
        return [ParamMapping((*before, "layers", *sub), names, stacked=True, **layout)]
    return [
        ParamMapping((*before, f"layers_{i}", *sub), (n,), **layout) for i, n in enumerate(names)
    ]


class MappedCheckpoint(NamedTuple):
    """A checked checkpoint, nothing read yet: the model config it describes, its
    tensors, and the mapping of every parameter (every tensor present, shape and dtype
    checked)."""

    config: Any
    source: TensorSource
    mappings: list[ParamMapping]


def _more(items: Sequence[str]) -> str:
    return f" (and {len(items) - 1} more: {list(items[1:4])})" if len(items) > 1 else ""


def unmapped(names: Iterable[str], mappings: Sequence[ParamMapping]) -> list[str]:
    """The tensor names in ``names`` that none of ``mappings`` reads, in order."""
    used = {n for m in mappings for n in m.hf_names}
    return [n for n in names if n not in used]


def check_tensors(source: TensorSource, mappings: Sequence[ParamMapping], why: str = "") -> None:
    """Every tensor of ``mappings`` is in ``source`` with its ``hf_shape`` and a float dtype.

    Missing tensors are reported first, then the first wrong shape, then the first
    non-float dtype; ``why`` ends shape messages (e.g. ``" from config.json"``).
    """
    missing = [n for m in mappings for n in m.hf_names if n not in source]
    if missing:
        raise CheckpointError(
            f"{source.where}: tensor {missing[0]!r} missing (not found in the checkpoint)"
            + _more(missing)
        )
    for m in mappings:
        for name in m.hf_names:
            found = source.shape(name)
            if found != m.hf_shape:
                raise CheckpointError(
                    f"{source.describe(name)} has shape {list(found)}, expected "
                    f"{list(m.hf_shape)}{why}"
                )
    for m in mappings:
        for name in m.hf_names:
            if source.dtype(name) not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{source.describe(name)} has dtype {source.dtype(name)}, expected a float "
                    "type (float64, float32, float16 or bfloat16)"
                )


def read_params(
    source: TensorSource, mappings: Sequence[ParamMapping], dtype: Any
) -> dict[str, Any]:
    """The params tree of ``mappings`` (already checked) as device arrays of ``dtype``.

    Each parameter is assembled in one host buffer (a stacked one filled one layer at a
    time), moved to the device and released before the next, so peak host memory is one
    model copy plus one parameter. Tensors are read sequentially, then transposed in RAM
    (a transposed read straight from a memory map would stride across the file).
    """
    dtype = np.dtype(dtype)
    params: dict[str, Any] = {}
    for m in mappings:
        buf = np.empty(m.param_shape, dtype)
        for i, name in enumerate(m.hf_names):
            src = m.to_ours(source.read(name))
            if m.stacked:
                buf[i] = src  # also converts to the parameter dtype
            else:
                buf[...] = src
            del src
        set_param(params, m.path, jnp.asarray(buf))
        del buf
    return params


def iter_hf_tensors(
    mappings: Sequence[ParamMapping], params: Mapping[str, Any]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(checkpoint name, array in checkpoint layout)`` one tensor at a time.

    ``params`` may be ``{"params": ...}`` and boxed (from ``init``); a stacked parameter
    is pulled to the host one layer at a time.
    """
    params = plain_params(params)
    for m in mappings:
        value = get_param(params, m.path, m.hf_names[0])
        if tuple(value.shape) != m.param_shape:
            raise CheckpointError(
                f"param {'/'.join(m.path)} has shape {list(value.shape)}; "
                f"{m.hf_names[0]!r} needs {list(m.param_shape)}"
            )
        for i, name in enumerate(m.hf_names):
            yield name, m.to_hf(np.asarray(value[i] if m.stacked else value))


def plain_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accepts ``params`` or ``{'params': params}``, boxed (from ``init``) or not."""
    if set(params) == {"params"}:
        params = params["params"]
    return nn.meta.unbox(params)


def get_param(tree: Mapping[str, Any], path: Path_, needed_for: str) -> Any:
    """``tree[path[0]][path[1]]...``; a missing one names the tensor that ``needed_for``."""
    node: Any = tree
    for k in path:
        try:
            node = node[k]
        except (KeyError, TypeError, IndexError):
            raise CheckpointError(
                f"params have no {'/'.join(path)} (needed for {needed_for!r})"
            ) from None
    return node


def set_param(tree: dict[str, Any], path: Path_, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
