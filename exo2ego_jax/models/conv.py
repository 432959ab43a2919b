"""Convolutions in the form each backend runs fastest: one ``Conv`` for the connector, the
CLIP patch embedding and the mapping networks.

``nn.Conv`` lowers every convolution to XLA's generic ``conv_general_dilated``. On XLA:CPU
the gradients of two of the kinds this model uses are very slow: a 3×3 depthwise conv
(the STC connector's RegStage blocks) and a conv whose stride equals its kernel (the
connector's Conv3d sampler, CLIP's patch embedding). Measured forward + backward on the
demo connector's shapes (``[32, 8, 8, 64]``, 2 CPU cores): depthwise 9.7 ms as a conv,
1.0 ms as nine shifted multiply-adds; the 2×2×2 sampler 11.3 ms as a conv. So :func:`conv`
computes, with the same parameters and the same result up to float rounding:

* a 1×…×1 kernel (stride 1, no padding, no groups) as a matmul over channels;
* a depthwise kernel (one filter per channel, stride 1) as a sum of shifted, scaled copies
  of the padded input (one elementwise fusion, forward and backward);
* a kernel tiled without overlap (stride == kernel size, no groups) as "patchify + matmul":
  the padded input is cut into kernel-sized blocks and multiplied with the flattened kernel
  (the usual ViT patch-embedding form; a matmul on every backend);
* a dense conv with no more input than output channels (the mapping networks' 7×7 head and
  residual-block convs), on a CPU only, as "im2col + matmul": the input's
  kernel-tap views stacked along channels times the flattened kernel. Measured forward +
  backward, the head (7×7, 8 -> 64 channels on ``[32, 14, 14, 8]``): 19 ms as a conv,
  4.6 ms; with more input than output channels (the 7×7 stem, 64 -> 8) the stacked views
  are large and the conv is faster (22-36 ms against 99 ms), so it stays a conv. im2col
  costs K² times the input's memory, which a TPU or GPU at paper size should not pay;
* anything else (and on an accelerator every dense conv) with
  ``jax.lax.conv_general_dilated``.

All forms are exact rewrites (tests/test_conv.py checks values and gradients against
``conv_general_dilated``); the first three are used on every backend (on an accelerator
the matmul and elementwise forms are at least as fast as the generic conv). The backend is
``attention.current_backend()``, so an ahead-of-time compile for a TPU on a CPU host picks
the TPU's forms.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from exo2ego_jax.models import attention

Array = jax.Array
Padding = str | int | Sequence[tuple[int, int]]


def _pairs(padding: Padding, ndim: int) -> list[tuple[int, int]]:
    """``"VALID"`` / an int / per-dimension ``(low, high)`` pairs -> ``ndim`` pairs."""
    if isinstance(padding, str):
        if padding.upper() != "VALID":
            raise ValueError(f"padding {padding!r}: use 'VALID', an int or (low, high) pairs")
        return [(0, 0)] * ndim
    if isinstance(padding, int):
        return [(padding, padding)] * ndim
    pairs = [tuple(p) for p in padding]
    if len(pairs) != ndim:
        raise ValueError(f"padding {padding!r} has {len(pairs)} pairs for {ndim} spatial dims")
    return pairs


def _pad(x: Array, pairs: list[tuple[int, int]]) -> Array:
    if not any(lo or hi for lo, hi in pairs):
        return x
    return jnp.pad(x, [(0, 0), *pairs, (0, 0)])


def _depthwise(x: Array, kernel: Array, pairs: list[tuple[int, int]]) -> Array:
    """``x float[B, *S, C]``, ``kernel float[*K, 1, C]`` (stride 1) -> ``float[B, *S', C]``."""
    ksize = kernel.shape[:-2]
    x = _pad(x, pairs)
    out = [x.shape[1 + d] - k + 1 for d, k in enumerate(ksize)]
    total = None
    for offset in itertools.product(*(range(k) for k in ksize)):
        window = x[
            (slice(None), *(slice(o, o + n) for o, n in zip(offset, out, strict=True)), slice(None))
        ]
        term = window * kernel[offset][0]
        total = term if total is None else total + term
    return total


def _patchify(x: Array, kernel: Array, pairs: list[tuple[int, int]]) -> Array:
    """Stride == kernel size: ``x float[B, *S, C]``, ``kernel float[*K, C, F]`` ->
    ``float[B, *O, F]`` with ``O_d = (S_d + pad_d - K_d) // K_d + 1``."""
    ksize, (c, f) = kernel.shape[:-2], kernel.shape[-2:]
    x = _pad(x, pairs)
    b, n = x.shape[0], len(ksize)
    out = [(x.shape[1 + d] - k) // k + 1 for d, k in enumerate(ksize)]
    # Rows / columns past the last whole block are never read by the conv either.
    x = x[(slice(None), *(slice(0, o * k) for o, k in zip(out, ksize, strict=True)), slice(None))]
    blocks = x.reshape(
        b, *itertools.chain(*zip(out, ksize, strict=True)), c
    )  # [B, O1, K1, O2, K2, ..., C]
    order = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1]
    blocks = blocks.transpose(order).reshape(b, *out, math.prod(ksize) * c)
    return blocks @ kernel.reshape(-1, f)


def _dilate_pad(x: Array, pairs: list[tuple[int, int]], dilation: tuple[int, ...]) -> Array:
    """Zeros between input elements (a transposed conv) and the padding, in one ``lax.pad``
    (whose gradient is a strided slice)."""
    spatial = [(lo, hi, d - 1) for (lo, hi), d in zip(pairs, dilation, strict=True)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *spatial, (0, 0, 0)])


def _views(x: Array, offset: tuple[int, ...], out: list[int], strides: tuple[int, ...]) -> Array:
    """``x[:, o_d : o_d + (out_d - 1)·s_d + 1 : s_d, ..., :]``: the input under one kernel tap."""
    spatial = (
        slice(o, o + (n - 1) * s + 1, s) for o, n, s in zip(offset, out, strides, strict=True)
    )
    return x[(slice(None), *spatial, slice(None))]


def _im2col(
    x: Array,
    kernel: Array,
    strides: tuple[int, ...],
    pairs: list[tuple[int, int]],
    dilation: tuple[int, ...],
) -> Array:
    """A dense conv as one matmul: ``x float[B, *S, C]``, ``kernel float[*K, C, F]`` ->
    ``float[B, *O, F]``. The (input-dilated, padded) input's K shifted, strided views are
    stacked along channels, ``float[B, *O, prod(K)·C]``, in the kernel's row-major order."""
    ksize, f = kernel.shape[:-2], kernel.shape[-1]
    x = _dilate_pad(x, pairs, dilation)
    out = [
        (x.shape[1 + d] - k) // s + 1 for d, (k, s) in enumerate(zip(ksize, strides, strict=True))
    ]
    views = [_views(x, o, out, strides) for o in itertools.product(*(range(k) for k in ksize))]
    return jnp.concatenate(views, axis=-1) @ kernel.reshape(-1, f)


def conv(
    x: Array,
    kernel: Array,
    *,
    strides: Sequence[int] | None = None,
    padding: Padding = "VALID",
    groups: int = 1,
    input_dilation: Sequence[int] | None = None,
) -> Array:
    """An N-d convolution, channels last: ``x float[B, *S, C_in]``, ``kernel float[*K,
    C_in / groups, F]`` -> ``float[B, *S', F]`` (as ``nn.Conv`` / ``conv_general_dilated``
    with ``feature_group_count=groups`` and ``lhs_dilation=input_dilation``, which makes a
    transposed conv), computed in the fastest exact form (module doc)."""
    ksize = tuple(kernel.shape[:-2])
    n = len(ksize)
    strides = tuple(strides or (1,) * n)
    dilation = tuple(input_dilation or (1,) * n)
    pairs = _pairs(padding, n)
    c_in, f = x.shape[-1], kernel.shape[-1]
    plain = all(s == 1 for s in strides) and all(d == 1 for d in dilation)
    if groups == 1 and plain and all(k == 1 for k in ksize):
        return _pad(x, pairs) @ kernel.reshape(c_in, f)
    if groups == c_in == f and kernel.shape[-2] == 1 and plain:
        return _depthwise(x, kernel, pairs)
    if groups == 1 and strides == ksize and all(d == 1 for d in dilation):
        return _patchify(x, kernel, pairs)
    if groups == 1 and c_in <= f and attention.current_backend() == "cpu":
        return _im2col(x, kernel, strides, pairs, dilation)
    spatial = "DHW"[-n:] if n <= 3 else None
    if spatial is None:
        raise ValueError(f"conv: {n} spatial dims are not supported (at most 3)")
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pairs,
        lhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )


class Conv(nn.Module):
    """``nn.Conv``'s parameters (``kernel float[*kernel_size, C_in / groups, features]``,
    ``bias float[features]``) and semantics, computed by :func:`conv`.

    ``float[B, *S, C_in] -> float[B, *S', features]``; inputs and parameters are cast to
    ``dtype``. Checkpoints and weight maps written for ``nn.Conv`` load unchanged.
    """

    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: Padding = "VALID"
    groups: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c_in = x.shape[-1]
        if c_in % self.groups:
            raise ValueError(f"Conv: {c_in} input channels do not split into {self.groups} groups")
        shape = (*self.kernel_size, c_in // self.groups, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        y = conv(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            strides=self.strides,
            padding=self.padding,
            groups=self.groups,
        )
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
