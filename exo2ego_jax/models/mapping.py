"""Mapping networks ``F`` (ego → exo) and ``G`` (exo → ego) between visual-token domains.

Both act on visual-encoder output tokens ``float[B, S, D]`` with ``S = T'·H'·W'`` in
time-major ``(t, h, w)`` order, exactly as the STC connector emits them (method.md §2).

``kind="resnet"`` (paper): the CycleGAN ResNet generator (``ResnetGenerator`` in
junyanz/pytorch-CycleGAN-and-pix2pix ``models/networks.py``), run per time step on the grid
``float[(B·T'), H', W', D]``::

    pad 3 · 7×7 conv D→ngf · norm · ReLU
    3×3 conv stride 2, zero pad 1, ngf→2ngf · norm · ReLU
    3×3 conv stride 2, zero pad 1, 2ngf→4ngf · norm · ReLU
    n_blocks × [pad 1 · 3×3 conv · norm · ReLU · pad 1 · 3×3 conv · norm] + skip
    3×3 transposed conv stride 2 (= torch ConvTranspose2d(k=3, s=2, p=1, output_padding=1)),
        4ngf→2ngf · norm · ReLU
    same, 2ngf→ngf · norm · ReLU
    pad 3 · 7×7 conv ngf→D            (no tanh: features are unbounded)

``kind="mlp"``: the paper's "FC layers" ablation, a per-token MLP ``D → hidden → … → D``
(``mlp_layers`` linear maps, activation between them), no spatial mixing.

Decisions (each one a config field):
  * Grid alignment: the two stride-2 convs need H', W' to be multiples of 4. The grid is
    padded at the bottom / right up to the next multiple of 4 (``align_pad="edge"``
    replicates the border tokens, ``"zero"`` inserts zeros) and the output is cropped back,
    so output shape == input shape for any grid (13×13 → 16×16 → … → 13×13; 1×1 works too).
    The padded positions take part in instance-norm statistics; that is the price of
    padding and is why ``edge`` (no artificial zeros) is the default.
  * ``padding="reflect"`` (CycleGAN default) is used for the 7×7 convs and the convs inside
    residual blocks; ``"zero"`` swaps it for zero padding. The two down-sampling convs use
    zero padding in both modes, as CycleGAN does.
  * ``norm="instance"``: per sample, per channel, over H, W (biased variance, eps 1e-5),
    as ``torch.nn.InstanceNorm2d``. CycleGAN's default has no affine parameters
    (``instance_affine=False``); set it True for a learned per-channel scale / bias.
    ``norm="layer"``: per position, over channels, with scale and bias (as
    ``torch.nn.LayerNorm(C)`` applied channels-last).
  * ``conv_bias=True``: as CycleGAN with InstanceNorm2d, every conv has a bias. A bias
    directly followed by instance norm is removed by the mean subtraction, so those
    biases get zero gradient (they stay at init); they are kept so parameter trees and
    counts match the PyTorch reference. Set ``conv_bias=False`` to drop all conv biases but
    the last conv's (which is never followed by a norm).
  * On small grids instance norm degenerates (shapes still work): a 4×4 padded grid has a
    1×1 bottleneck, where instance norm outputs zeros, so the residual blocks add nothing;
    a 1×1 grid edge-padded to 4×4 is spatially constant, so the first norm already outputs
    zeros and the output does not depend on the input (with ``align_pad="zero"`` only the
    sign of each channel survives). Use ``norm="layer"`` for such grids. The paper grid
    (13×13 → 16×16, bottleneck 4×4) is unaffected.
  * No dropout (CycleGAN's ``use_dropout`` defaults to False).

Sharding: kernels are ``[kh, kw, in, out]`` with logical names
``("conv_space", None, "mapping_embed", "mapping_mlp")`` (Flax forbids a logical name twice
in one array, and both spatial axes stay unsharded anyway); the last conv (back to the model
width) is ``("conv_space", None, "mapping_mlp", "mapping_embed")``; biases carry the output
name. These are F/G's own counterparts of ``embed`` / ``mlp``: every preset but ``dp``
shards the kernels ZeRO-3 style on ``mapping_embed`` over ``('fsdp', 'tensor')``, because
XLA differentiates F/G wrongly with Megatron-style layouts under ``fsdp_tp``
(docs/sharding.md, Known issues). Norm vectors use ``("norm",)``. Tokens are constrained to
``("batch", "length", "act_embed")``, the internal grid to
``("batch", None, None, "act_embed"/"act_mlp")``.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from exo2ego_jax.models.conv import Conv, conv

Grid = tuple[int, int, int]

_KERNEL_INIT = nn.initializers.lecun_normal()
_ZEROS = nn.initializers.zeros_init()
_ONES = nn.initializers.ones_init()
_EPS = 1e-5  # torch InstanceNorm2d / LayerNorm default
# Logical axes of the conv kernels [kh, kw, in, out] (module docstring, "Sharding").
_CONV_AXES = ("conv_space", None, "mapping_embed", "mapping_mlp")
_HEAD_AXES = ("conv_space", None, "mapping_mlp", "mapping_embed")


@dataclasses.dataclass(frozen=True)
class MappingConfig:
    """Architecture of one mapping network (F or G share it).

    Attributes:
      kind: ``"resnet"`` (CycleGAN generator, paper) or ``"mlp"`` (per-token "FC layers").
      ngf: resnet base width; channels go ngf → 2ngf → 4ngf at the bottleneck.
      n_blocks: number of residual blocks at the bottleneck.
      norm: ``"instance"`` (per sample/channel over H, W) or ``"layer"`` (over channels).
      instance_affine: learned scale/bias for instance norm (CycleGAN default False).
      padding: ``"reflect"`` or ``"zero"`` for the 7×7 and residual-block convs.
      align_pad: how the grid is padded to a multiple of 4: ``"edge"`` or ``"zero"``.
      conv_bias: bias on the convs that are followed by a norm (CycleGAN: True).
      mlp_hidden: hidden width of the mlp kind; ``None`` = the model width D.
      mlp_layers: number of linear maps in the mlp kind (≥ 1).
      mlp_activation: ``"gelu"`` or ``"relu"`` between the mlp's linear maps.
      dtype: computation dtype (norm statistics are always float32).
      param_dtype: parameter dtype.
    """

    kind: Literal["resnet", "mlp"] = "resnet"
    ngf: int = 256
    n_blocks: int = 9
    norm: Literal["instance", "layer"] = "instance"
    instance_affine: bool = False
    padding: Literal["reflect", "zero"] = "reflect"
    align_pad: Literal["edge", "zero"] = "edge"
    conv_bias: bool = True
    mlp_hidden: int | None = None
    mlp_layers: int = 2
    mlp_activation: Literal["gelu", "relu"] = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        choices = {
            "kind": ("resnet", "mlp"),
            "norm": ("instance", "layer"),
            "padding": ("reflect", "zero"),
            "align_pad": ("edge", "zero"),
            "mlp_activation": ("gelu", "relu"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"MappingConfig.{name}={getattr(self, name)!r}; expected one of {allowed}"
                )
        if self.ngf < 1 or self.n_blocks < 0 or self.mlp_layers < 1:
            raise ValueError(
                f"MappingConfig needs ngf >= 1, n_blocks >= 0, mlp_layers >= 1; got "
                f"ngf={self.ngf}, n_blocks={self.n_blocks}, mlp_layers={self.mlp_layers}"
            )


def paper(**overrides: Any) -> MappingConfig:
    """CycleGAN ResNet generator: ngf 256, 9 blocks, instance norm, reflect padding."""
    return MappingConfig(
        **{"kind": "resnet", "ngf": 256, "n_blocks": 9, "norm": "instance", **overrides}
    )


def paper_fc(**overrides: Any) -> MappingConfig:
    """The paper's "FC layers" ablation: a 2-layer per-token MLP of hidden width D."""
    return MappingConfig(**{"kind": "mlp", "mlp_hidden": None, "mlp_layers": 2, **overrides})


def tiny(**overrides: Any) -> MappingConfig:
    """A CPU-test-sized resnet (ngf 8, 2 blocks)."""
    return MappingConfig(
        **{"kind": "resnet", "ngf": 8, "n_blocks": 2, "mlp_hidden": 32, **overrides}
    )


# ----------------------------------------------------------------------------- helpers


def _param_init(init: Any, names: Sequence[str | None]) -> Any:
    return nn.with_logical_partitioning(init, tuple(names))


def _pad_hw(x: jax.Array, pad: int, mode: str) -> jax.Array:
    """Pads H and W of ``[N, H, W, C]`` by ``pad`` on every side (``reflect`` | ``zero``)."""
    if pad == 0:
        return x
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jnp.pad(x, widths, mode="reflect" if mode == "reflect" else "constant")


def _align_grid(x: jax.Array, multiple: int, mode: str) -> jax.Array:
    """Pads H and W of ``[N, H, W, C]`` at the bottom / right up to a multiple."""
    h, w = x.shape[1:3]
    widths = ((0, 0), (0, -h % multiple), (0, -w % multiple), (0, 0))
    if widths[1][1] == 0 and widths[2][1] == 0:
        return x
    return jnp.pad(x, widths, mode="edge" if mode == "edge" else "constant")


# ----------------------------------------------------------------------------- layers


class InstanceNorm(nn.Module):
    """``torch.nn.InstanceNorm2d`` channels-last: ``[N, H, W, C]`` normalised over H, W.

    Statistics in float32 (biased variance); optional per-channel affine.
    """

    affine: bool = False
    eps: float = _EPS
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(axis=(1, 2), keepdims=True)
        var = jnp.square(xf - mean).mean(axis=(1, 2), keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            c = x.shape[-1]
            scale = self.param("scale", _param_init(_ONES, ("norm",)), (c,), self.param_dtype)
            bias = self.param("bias", _param_init(_ZEROS, ("norm",)), (c,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class ConvTranspose2x(nn.Module):
    """``torch.nn.ConvTranspose2d(k, stride=2, padding=k//2, output_padding=1)``: H, W → 2H, 2W.

    The kernel is stored ``[kh, kw, in, out]`` as the torch weight ``[in, out, kh, kw]``
    transposed (no flip); the call flips it and runs the equivalent input-dilated conv.
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        p = k // 2
        kernel = self.param(
            "kernel",
            _param_init(_KERNEL_INIT, _CONV_AXES),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        # Transposed conv = conv of the 2×-dilated input with the spatially flipped kernel,
        # padded (k-1-p) before and (k-1-p + output_padding) after.
        lo, hi = k - 1 - p, k - 1 - p + 1
        y = conv(
            x.astype(self.dtype),
            kernel[::-1, ::-1].astype(self.dtype),
            padding=((lo, hi), (lo, hi)),
            input_dilation=(2, 2),
        )
        if self.use_bias:
            bias = self.param(
                "bias", _param_init(_ZEROS, ("mapping_mlp",)), (self.features,), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


class GeneratorConv(nn.Module):
    """(pad) · conv · norm · (ReLU) on ``[N, H, W, C]``: one CycleGAN generator stage.

    Attributes:
      features: output channels.
      kernel_size: square kernel size.
      stride: 1, 2 (down-sampling conv, zero pad 1) or -2 (transposed conv, ×2 up).
      pad_mode: padding of stride-1 convs (``reflect`` | ``zero``), ``kernel_size // 2``.
      relu: apply ReLU after the norm.
    """

    config: MappingConfig
    features: int
    kernel_size: int
    stride: int = 1
    relu: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        k = self.kernel_size
        if self.stride == -2:
            x = ConvTranspose2x(
                self.features, k, cfg.conv_bias, cfg.dtype, cfg.param_dtype, name="conv"
            )(x)
        else:
            if self.stride == 1:
                x = _pad_hw(x, k // 2, cfg.padding)
                padding = "VALID"
            else:  # CycleGAN down-sampling convs always zero-pad
                padding = ((k // 2, k // 2), (k // 2, k // 2))
            x = Conv(
                self.features,
                (k, k),
                strides=(self.stride, self.stride),
                padding=padding,
                use_bias=cfg.conv_bias,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_param_init(_KERNEL_INIT, _CONV_AXES),
                bias_init=_param_init(_ZEROS, ("mapping_mlp",)),
                name="conv",
            )(x)
        x = _norm(cfg, name="norm")(x)
        return nn.relu(x) if self.relu else x


def _norm(cfg: MappingConfig, name: str) -> nn.Module:
    if cfg.norm == "instance":
        return InstanceNorm(
            cfg.instance_affine, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name
        )
    return nn.LayerNorm(
        epsilon=_EPS,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=_param_init(_ONES, ("norm",)),
        bias_init=_param_init(_ZEROS, ("norm",)),
        name=name,
    )


class ResnetBlock(nn.Module):
    """``x + norm(conv(relu(norm(conv(x)))))`` with 3×3 convs, width preserved."""

    config: MappingConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h = GeneratorConv(self.config, c, 3, relu=True, name="conv1")(x)
        h = GeneratorConv(self.config, c, 3, relu=False, name="conv2")(h)
        return x + h


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator without tanh: ``float[N, H, W, D] -> float[N, H, W, D]``.

    H and W must be multiples of 4 (``MappingNetwork`` pads for you).
    """

    config: MappingConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        ngf = cfg.ngf
        if x.shape[1] % 4 or x.shape[2] % 4:
            raise ValueError(f"ResnetGenerator needs H, W multiples of 4; got {x.shape[1:3]}")
        act_spec = ("batch", None, None, "act_mlp")
        h = GeneratorConv(cfg, ngf, 7, name="stem")(x)
        h = GeneratorConv(cfg, 2 * ngf, 3, stride=2, name="down_0")(h)
        h = GeneratorConv(cfg, 4 * ngf, 3, stride=2, name="down_1")(h)
        for i in range(cfg.n_blocks):
            h = nn.with_logical_constraint(h, act_spec)
            h = ResnetBlock(cfg, name=f"block_{i}")(h)
        h = nn.with_logical_constraint(h, act_spec)
        h = GeneratorConv(cfg, 2 * ngf, 3, stride=-2, name="up_0")(h)
        h = GeneratorConv(cfg, ngf, 3, stride=-2, name="up_1")(h)
        h = _pad_hw(h, 3, cfg.padding)
        # Final conv: always biased (CycleGAN), not followed by a norm, no tanh.
        return Conv(
            self.features,
            (7, 7),
            padding="VALID",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_param_init(_KERNEL_INIT, _HEAD_AXES),
            bias_init=_param_init(_ZEROS, ("mapping_embed",)),
            name="head",
        )(h)


class TokenMLP(nn.Module):
    """Per-token MLP ``float[..., D] -> float[..., D]`` with ``mlp_layers`` linear maps."""

    config: MappingConfig
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        hidden = cfg.mlp_hidden or self.features
        act = nn.gelu if cfg.mlp_activation == "gelu" else nn.relu
        for i in range(cfg.mlp_layers):
            last = i == cfg.mlp_layers - 1
            out = self.features if last else hidden
            # Alternate the logical names so no array carries one name twice.
            names = ("mlp", "embed") if last and i > 0 else ("embed", "mlp")
            x = nn.Dense(
                out,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=_param_init(_KERNEL_INIT, names),
                bias_init=_param_init(_ZEROS, (names[1],)),
                name=f"dense_{i}",
            )(x)
            if not last:
                x = act(x)
        return x


# ----------------------------------------------------------------------------- public module


class MappingNetwork(nn.Module):
    """``F`` or ``G``: visual tokens of one domain → tokens of the other, same shape.

    Attributes:
      config: architecture (``MappingConfig``).
      features: model width D of the tokens (in and out).
    """

    config: MappingConfig
    features: int

    @nn.compact
    def __call__(self, tokens: jax.Array, grid: Grid) -> jax.Array:
        """Maps ``float[B, S, D]`` tokens to ``float[B, S, D]``.

        Args:
          tokens: ``float[B, S, D]`` visual tokens, time-major ``(t, h, w)`` order.
          grid: ``(T', H', W')`` with ``T'·H'·W' == S`` (static Python ints).
        Returns:
          ``float[B, S, D]`` in ``config.dtype``.
        """
        cfg = self.config
        b, s, d, (t, h, w) = _check_inputs(tokens, grid, self.features)
        tokens = nn.with_logical_constraint(tokens, ("batch", "length", "act_embed"))
        if cfg.kind == "mlp":
            out = TokenMLP(cfg, self.features, name="mlp")(tokens)
        else:
            x = tokens.reshape(b * t, h, w, d)  # fold time into the batch, as per frame
            x = nn.with_logical_constraint(x, ("batch", None, None, "act_embed"))
            x = _align_grid(x, 4, cfg.align_pad)
            y = ResnetGenerator(cfg, self.features, name="resnet")(x)
            y = nn.with_logical_constraint(y[:, :h, :w, :], ("batch", None, None, "act_embed"))
            out = y.reshape(b, s, d)
        return nn.with_logical_constraint(out, ("batch", "length", "act_embed"))


def _check_inputs(tokens: jax.Array, grid: Grid, features: int) -> tuple[int, int, int, Grid]:
    """Validates shapes; returns ``(B, S, D, (T', H', W'))``."""
    if tokens.ndim != 3:
        raise ValueError(f"MappingNetwork expects tokens float[B, S, D]; got shape {tokens.shape}")
    b, s, d = tokens.shape
    try:
        t, h, w = (operator.index(g) for g in grid)
    except (TypeError, ValueError) as e:  # wrong length, or a traced (non-static) grid
        raise ValueError(f"grid must be three static ints (T', H', W'); got {grid!r}") from e
    if min(t, h, w) < 1:
        raise ValueError(f"grid entries must be positive; got {grid!r}")
    if t * h * w != s:
        raise ValueError(
            f"MappingNetwork: {s} tokens do not match grid (T', H', W')={grid} "
            f"(T'·H'·W'={t * h * w}); pass the connector's output grid"
        )
    if d != features:
        raise ValueError(f"MappingNetwork built for D={features} but tokens have D={d}")
    return b, s, d, (t, h, w)
