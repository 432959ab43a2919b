"""VideoLLaMA2's STC connector (spatial-temporal convolution) as Flax Linen modules.

The connector turns per-frame CLIP patch features into LLM-width visual tokens:

    x: float[B, T, N, C] (N = h·w, square) or float[B, T, h, w, C]
      -> fold (B·T)          -> s1: RegStage, C -> D      float[B·T, h, w, D]
      -> unfold              -> sampler: Conv3d + SiLU    float[B, T', h', w', D]
      -> fold (B·T')         -> s2: RegStage, D -> D      float[B·T', h', w', D]
      -> flatten (t, h, w)   -> readout: Linear, GELU, Linear -> float[B, T'·h'·w', D_out]

The RegStage semantics are timm's (v1.0.3, the version VideoLLaMA2 pins) as VideoLLaMA2
instantiates it, i.e. with the ``Bottleneck`` defaults ``bottle_ratio=1``, ``group_size=1``
(so the 3×3 conv is depthwise), ``se_ratio=0.25`` of the *block input* channels,
``downsample='conv1x1'`` and ``LayerNorm2d`` + ``SiLU``. timm turns ``LayerNorm2d`` inside
``ConvNormAct`` into ``LayerNormAct2d``, whose epsilon is 1e-5 (not LayerNorm2d's 1e-6).

Everything is channels-last (NHWC / NDHWC). Submodule names mirror the PyTorch state-dict
keys (``s1.b1.conv1.conv.weight`` ↔ ``s1/b1/conv1/conv/kernel``, ``sampler.0`` ↔
``sampler_0``, ``readout.2`` ↔ ``readout_2``) so that
:mod:`exo2ego_jax.weights.mm_projector` maps ``mm_projector.bin`` one to one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from exo2ego_jax.models.conv import Conv

Array = jax.Array
Dtype = Any

# torch's default Conv/Linear init (kaiming_uniform with a=sqrt(5)) is U(±1/sqrt(fan_in)),
# i.e. variance 1/(3·fan_in); biases start at zero here.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# Logical axes of a conv activation: (B·T, h, w, C) or (B, T, h, w, C).
_ACT_2D = ("batch", None, None, "act_embed")
_ACT_3D = ("batch", None, None, None, "act_embed")


@dataclasses.dataclass(frozen=True)
class STCConnectorConfig:
    """Architecture of the STC connector (VideoLLaMA2 ``mm_projector_type='stc_connector'``).

    Attributes:
      in_channels: vision feature width (VideoLLaMA2 ``mm_hidden_size``; 1024 for CLIP-L).
      hidden_size: width of both RegStages and the sampler (VideoLLaMA2 ``hidden_size``).
      out_size: output token width (the LLM width; VideoLLaMA2 uses ``hidden_size``).
      depth: bottleneck blocks per RegStage (``s1`` and ``s2``).
      mlp_depth: Linear layers in ``readout`` (GELU between them).
      downsample: (t, h, w) kernel size and stride of the Conv3d sampler.
      sampler_padding: zero padding of the sampler on t, h and w (1 in VideoLLaMA2's
        ``STCConnector``; 0 would be its ``STCConnectorV35``).
      bottle_ratio: bottleneck width / block output width (timm default 1.0).
      group_size: channels per group of the 3×3 conv (timm default 1: depthwise).
      se_ratio: squeeze-excite reduction width / block *input* width (timm default 0.25);
        0 disables squeeze-excite.
      norm_eps: epsilon of the channel LayerNorms (timm ``LayerNormAct2d``: 1e-5).
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    in_channels: int = 1024
    hidden_size: int = 4096
    out_size: int = 4096
    depth: int = 4
    mlp_depth: int = 2
    downsample: tuple[int, int, int] = (2, 2, 2)
    sampler_padding: int = 1
    bottle_ratio: float = 1.0
    group_size: int = 1
    se_ratio: float = 0.25
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"STCConnectorConfig.depth must be >= 1, got {self.depth}")
        if self.mlp_depth < 1:
            raise ValueError(f"STCConnectorConfig.mlp_depth must be >= 1, got {self.mlp_depth}")
        if len(self.downsample) != 3 or min(self.downsample) < 1:
            raise ValueError(
                f"STCConnectorConfig.downsample must be three positive ints (t, h, w), "
                f"got {self.downsample}"
            )
        object.__setattr__(self, "downsample", tuple(int(d) for d in self.downsample))
        bottleneck = self.bottleneck_channels
        if bottleneck % self.group_size:
            raise ValueError(
                f"STCConnectorConfig: bottleneck width {bottleneck} is not divisible by "
                f"group_size {self.group_size}"
            )

    @property
    def bottleneck_channels(self) -> int:
        """Width inside every bottleneck block (timm: ``int(round(out_chs * bottle_ratio))``)."""
        return int(round(self.hidden_size * self.bottle_ratio))

    def se_channels(self, block_in_channels: int) -> int:
        """Squeeze-excite width of a block (timm: ``int(round(in_chs * se_ratio))``)."""
        return int(round(block_in_channels * self.se_ratio))

    def output_grid(self, num_frames: int, grid: int) -> tuple[int, int, int]:
        """(t', h', w') after the sampler for ``num_frames`` frames of ``grid``×``grid`` patches."""
        pad, out = self.sampler_padding, []
        for size, k in zip((num_frames, grid, grid), self.downsample, strict=True):
            out.append((size + 2 * pad - k) // k + 1)
        return tuple(out)

    def num_tokens(self, num_frames: int, grid: int) -> int:
        """Visual tokens per clip, e.g. 16 frames of 24×24 -> 9·13·13 = 1521."""
        return math.prod(self.output_grid(num_frames, grid))


def paper(**overrides: Any) -> STCConnectorConfig:
    """VideoLLaMA2-7B: CLIP-L/14-336 (1024) -> Mistral-7B (4096); 16 frames -> 1521 tokens."""
    return STCConnectorConfig(
        **{"in_channels": 1024, "hidden_size": 4096, "out_size": 4096, **overrides}
    )


def tiny(**overrides: Any) -> STCConnectorConfig:
    """A CPU-sized connector with the paper's structure (2 blocks per stage)."""
    return STCConnectorConfig(
        **{"in_channels": 32, "hidden_size": 64, "out_size": 64, "depth": 2, **overrides}
    )


def _conv(
    cfg: STCConnectorConfig,
    features: int,
    kernel: tuple[int, ...],
    channel_axes: tuple[str | None, str | None],
    *,
    name: str,
    strides: tuple[int, ...] | None = None,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = False,
) -> Conv:
    """A :class:`~exo2ego_jax.models.conv.Conv` whose kernel carries logical axes;
    ``channel_axes`` = (in, out).

    Spatial kernel dims are never sharded. Flax rejects a logical name repeated within one
    array, so only the leading spatial dim is named ``conv_space`` and the others are None.
    Dense convs name their channels ``conv_embed`` (the block's in/out width side) and
    ``conv_mlp`` (the bottleneck side): rules of their own, so a run can re-lay the
    connector's kernels without touching the LLM's ``embed`` / ``mlp`` (docs/sharding.md,
    Known issues); the depthwise and squeeze-excite convs use ``mlp``.
    """
    axes = ("conv_space",) + (None,) * (len(kernel) - 1) + tuple(channel_axes)
    return Conv(
        features,
        kernel,
        strides=strides,
        padding=padding,
        groups=groups,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
        name=name,
    )


class ConvNormAct(nn.Module):
    """timm ``ConvNormAct``: bias-free conv ``conv`` -> channel LayerNorm ``bn`` -> SiLU.

    ``float[N, h, w, C_in] -> float[N, h, w, features]``; 'same' padding (stride 1).
    """

    config: STCConnectorConfig
    features: int
    kernel_size: int
    axes: tuple[str | None, str | None]  # logical (in, out) channel axes of the kernel
    groups: int = 1
    apply_act: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, k = self.config, self.kernel_size
        x = _conv(
            cfg,
            self.features,
            (k, k),
            self.axes,
            padding=(k - 1) // 2,  # timm get_padding for stride 1, dilation 1
            groups=self.groups,
            name="conv",
        )(x)
        # timm keeps the norm's attribute name `bn` for weight compatibility.
        x = nn.LayerNorm(
            epsilon=cfg.norm_eps,
            use_fast_variance=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            name="bn",
        )(x)
        return nn.silu(x) if self.apply_act else x


class SqueezeExcite(nn.Module):
    """timm ``SEModule``: global mean -> 1×1 ``fc1`` -> SiLU -> 1×1 ``fc2`` -> sigmoid gate.

    ``float[N, h, w, C] -> float[N, h, w, C]``.
    """

    config: STCConnectorConfig
    rd_channels: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, channels = self.config, x.shape[-1]
        s = jnp.mean(x, axis=(1, 2), keepdims=True)  # float[N, 1, 1, C]
        # rd_channels is small and need not divide a mesh axis: leave it unsharded.
        s = _conv(cfg, self.rd_channels, (1, 1), ("mlp", None), use_bias=True, name="fc1")(s)
        s = nn.silu(s)  # VideoLLaMA2 passes act_layer=SiLU, which timm forwards to the SE
        s = _conv(cfg, channels, (1, 1), (None, "mlp"), use_bias=True, name="fc2")(s)
        return x * nn.sigmoid(s)


class Bottleneck(nn.Module):
    """timm RegNet ``Bottleneck`` (SE after the 3×3 conv, SiLU after the residual add).

    ``float[N, h, w, C_in] -> float[N, h, w, hidden_size]``. A 1×1 conv + norm shortcut
    (``downsample``) exists only when ``C_in != hidden_size`` (stride is always 1 here).
    """

    config: STCConnectorConfig
    in_channels: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        out, mid = cfg.hidden_size, cfg.bottleneck_channels
        shortcut = x
        x = ConvNormAct(cfg, mid, 1, ("conv_embed", "conv_mlp"), name="conv1")(x)
        x = ConvNormAct(cfg, mid, 3, (None, "mlp"), groups=mid // cfg.group_size, name="conv2")(x)
        if cfg.se_ratio:
            x = SqueezeExcite(cfg, cfg.se_channels(self.in_channels), name="se")(x)
        x = ConvNormAct(cfg, out, 1, ("conv_mlp", "conv_embed"), apply_act=False, name="conv3")(x)
        if self.in_channels != out:
            shortcut = ConvNormAct(
                cfg, out, 1, ("conv_embed", "conv_mlp"), apply_act=False, name="downsample"
            )(shortcut)
        return nn.silu(x + shortcut)


class RegStage(nn.Module):
    """timm ``RegStage``: ``depth`` bottlenecks ``b1 … b{depth}``, the first one C_in -> D.

    ``float[N, h, w, C_in] -> float[N, h, w, hidden_size]``.
    """

    config: STCConnectorConfig
    in_channels: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        for i in range(cfg.depth):
            block_in = self.in_channels if i == 0 else cfg.hidden_size
            x = Bottleneck(cfg, block_in, name=f"b{i + 1}")(x)
            x = nn.with_logical_constraint(x, _ACT_2D)
        return x


class STCConnector(nn.Module):
    """VideoLLaMA2's ``STCConnector``: CLIP patch features of a clip -> visual tokens.

    ``float[B, T, N, C]`` (N = h·w, square) or ``float[B, T, h, w, C]``
    -> ``float[B, T'·h'·w', out_size]``, tokens ordered time-major (t, h, w).
    With the paper config, ``[B, 16, 576, 1024] -> [B, 1521, 4096]``.
    """

    config: STCConnectorConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if x.ndim == 4:
            b, t, n, c = x.shape
            hw = math.isqrt(n)
            if hw * hw != n:
                raise ValueError(f"STCConnector: {n} patches per frame is not a square grid")
            x = x.reshape(b, t, hw, hw, c)
        elif x.ndim != 5:
            raise ValueError(f"STCConnector expects [B,T,N,C] or [B,T,h,w,C], got {x.shape}")
        b, t, h, w, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"STCConnector: input has {c} channels, config expects {cfg.in_channels}"
            )
        x = x.astype(cfg.dtype)

        # 1. per-frame spatial mixing: frames folded into the batch.
        x = nn.with_logical_constraint(x.reshape(b * t, h, w, c), _ACT_2D)
        x = RegStage(cfg, cfg.in_channels, name="s1")(x)

        # 2. spatio-temporal downsampling over (t, h, w).
        x = x.reshape(b, t, h, w, cfg.hidden_size)
        d = cfg.hidden_size
        x = _conv(
            cfg,
            d,
            cfg.downsample,
            ("conv_embed", "conv_mlp"),
            strides=cfg.downsample,
            padding=cfg.sampler_padding,
            use_bias=True,
            name="sampler_0",  # torch nn.Sequential index 0 (index 1 is the SiLU)
        )(x)
        x = nn.with_logical_constraint(nn.silu(x), _ACT_3D)
        _, t2, h2, w2, _ = x.shape

        # 3. per-time-step spatial mixing again.
        x = RegStage(cfg, d, name="s2")(x.reshape(b * t2, h2, w2, d))

        # 4. time-major flatten, then the MLP readout (torch Sequential: Linear, GELU, ...).
        x = nn.with_logical_constraint(
            x.reshape(b, t2 * h2 * w2, d), ("batch", "length", "act_embed")
        )
        for i in range(cfg.mlp_depth):
            if i:
                x = nn.gelu(x, approximate=False)  # torch nn.GELU() is the exact erf form
            # alternate so consecutive kernels shard (embed, mlp) then (mlp, embed)
            in_axis, out_axis = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            x = nn.Dense(
                cfg.out_size,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, (in_axis, out_axis)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
                name=f"readout_{2 * i}",
            )(x)
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
