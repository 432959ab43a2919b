"""CLIP ViT vision tower (as Hugging Face ``CLIPVisionModel``), in Flax Linen.

The tower VideoLLaMA2 (and so Exo2Ego) uses: patch conv without bias, a class token plus
learned position embeddings, ``pre_layrnorm``, pre-LN transformer layers (biased
self-attention, quick-GELU MLP) and ``post_layernorm`` on the class token for the pooled
output. Parameter names follow the HF module names so checkpoint mapping stays readable
(:mod:`exo2ego_jax.weights.hf_clip`).

Layout conventions: images are NHWC ``float[B, H, W, 3]`` already CLIP-normalised; tokens are
``float[B, S, W]`` with ``S = 1 + N`` (class token first, then ``N = (H/p)²`` patches in
row-major order); ``W`` is the model width.

Letters in einsums: B batch, Q/K query/key positions, H heads, D head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from exo2ego_jax.models import remat as remat_lib
from exo2ego_jax.models.attention import ATTENTION_IMPLS, attend
from exo2ego_jax.models.conv import Conv
from input_pipeline.normalization import CLIP_MEAN, CLIP_STD

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# Hugging Face ``CLIPVisionConfig`` defaults, used for keys a saved config.json omits.
_HF_DEFAULTS = {
    "image_size": 224,
    "patch_size": 32,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
_HF_MODEL_TYPES = ("clip", "clip_vision_model")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP ViT vision tower.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters;
    softmax and layer norms always run in float32. ``remat`` names a rematerialisation
    policy of :data:`exo2ego_jax.models.remat.REMAT_POLICIES` (``"none"``, ``"full"``,
    ``"save_qkvo_mlp"``, ...); ``attention_impl`` the attention kernel
    (:data:`exo2ego_jax.models.attention.ATTENTION_IMPLS`, ``"auto"`` by backend);
    ``scan_layers`` stacks the encoder layers along a leading ``layers`` axis and runs them
    with ``nn.scan``.
    """

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    attention_impl: str = "auto"
    scan_layers: bool = True

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
        remat_lib.check_policy(self.remat, field="remat")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side, ``H / p``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """``N = (H / p)²`` patch tokens (the sequence is ``1 + N`` with the class token)."""
        return self.grid_size**2

    def replace(self, **changes: Any) -> CLIPVisionConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides: Any) -> CLIPVisionConfig:
        """From a HF ``CLIPVisionConfig`` dict or a ``CLIPModel`` dict (uses ``vision_config``).

        Keys the dict omits take HF's defaults (``save_pretrained`` may drop them);
        ``overrides`` set fields such as ``dtype``, ``remat`` or ``scan_layers``.
        """
        model_type = hf.get("model_type")
        if model_type is not None and model_type not in _HF_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a CLIP model {_HF_MODEL_TYPES}")
        if "vision_config" in hf or model_type == "clip":
            hf = hf.get("vision_config") or {}
        v = {**_HF_DEFAULTS, **{k: val for k, val in hf.items() if val is not None}}
        fields = dict(
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            layer_norm_eps=float(v["layer_norm_eps"]),
            hidden_act=str(v["hidden_act"]),
            num_channels=int(v["num_channels"]),
        )
        return cls(**{**fields, **overrides})

    def to_hf_config(self) -> dict[str, Any]:
        """The ``config.json`` dict of the equivalent HF ``CLIPVisionModel``."""
        return {
            "architectures": ["CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_channels": self.num_channels,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "initializer_factor": 1.0,
            "dtype": jnp.dtype(self.param_dtype).name,
        }


def paper(**overrides: Any) -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14-336 vision tower (the paper's ``E_ego`` / ``E_exo``)."""
    return CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=1024,
        intermediate_size=4096,
        num_layers=24,
        num_heads=16,
        layer_norm_eps=1e-5,
        **overrides,
    )


def tiny(**overrides: Any) -> CLIPVisionConfig:
    """A few-KB tower for tests and ``:demo`` runs (32 px, 4×4 patches of 8 px, width 64)."""
    fields = dict(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_layers=3,
        num_heads=4,
    )
    return CLIPVisionConfig(**{**fields, **overrides})


@flax.struct.dataclass
class CLIPVisionOutput:
    """What :class:`CLIPVisionTower` returns (HF ``BaseModelOutputWithPooling`` fields).

    ``last_hidden_state``: ``float[B, 1+N, W]``, output of the last layer, no post-norm.
    ``pooler_output``: ``float[B, W]``, ``post_layernorm`` of the class token.
    ``hidden_states``: ``num_layers + 1`` arrays ``float[B, 1+N, W]`` (embeddings after
    ``pre_layrnorm`` first, as HF), or ``None`` when not requested.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _p(init: Callable, names: tuple[str | None, ...]) -> Callable:
    """An initializer whose params carry logical axis names."""
    return nn.with_logical_partitioning(init, names)


def _constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, names)


_TOKENS = ("batch", "length", "act_embed")
_kernel_init = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _norm(config: CLIPVisionConfig, name: str, x: jax.Array) -> jax.Array:
    """LayerNorm in float32 (params at ``name/{scale,bias}``), result in ``config.dtype``.

    Called inside a compact method, so the norm becomes a submodule of the caller.
    """
    ln = nn.LayerNorm(
        epsilon=config.layer_norm_eps,
        dtype=jnp.float32,
        param_dtype=config.param_dtype,
        scale_init=_p(_ones, ("norm",)),
        bias_init=_p(_zeros, ("norm",)),
        name=name,
    )
    return ln(x.astype(jnp.float32)).astype(config.dtype)


class CLIPVisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token + learned position embeddings.

    ``float[B, H, W_img, C]`` → ``float[B, 1+N, W]``.
    """

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        b, h, w, c = pixel_values.shape
        if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(
                f"pixel_values {pixel_values.shape} do not match the tower's "
                f"[B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] (NHWC)"
            )
        patches = Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_p(_kernel_init, ("conv_space", None, None, "embed")),
            name="patch_embedding",
        )(pixel_values.astype(cfg.dtype))
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major, as HF's flatten(2)
        cls = self.param(
            "class_embedding",
            _p(nn.initializers.normal(cfg.hidden_size**-0.5), ("embed",)),
            (cfg.hidden_size,),
            cfg.param_dtype,
        )
        pos = self.param(
            "position_embedding",
            _p(nn.initializers.normal(0.02), (None, "embed")),
            (cfg.num_patches + 1, cfg.hidden_size),
            cfg.param_dtype,
        )
        cls = jnp.broadcast_to(cls.astype(cfg.dtype), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + pos.astype(cfg.dtype)
        return _constrain(x, _TOKENS)


class _Projection(nn.Module):
    """``y = einsum(x, kernel) + bias`` with a multi-axis kernel (DenseGeneral's params).

    Flax's ``DenseGeneral`` initialises a *flattened* 2-D kernel and reshapes it, which
    breaks logical-axis constraints on its 3-D names once sharding rules are active; this
    module creates the kernel in its final shape.
    """

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    bias_shape: tuple[int, ...]
    bias_axes: tuple[str | None, ...]
    equation: str
    config: CLIPVisionConfig
    contracting: tuple[int, ...] = (0,)  # kernel axes that are inputs (for the fan-in)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        out_axes = tuple(i for i in range(len(self.kernel_shape)) if i not in self.contracting)
        init = nn.initializers.lecun_normal(in_axis=self.contracting, out_axis=out_axes)
        kernel = self.param(
            "kernel", _p(init, self.kernel_axes), self.kernel_shape, cfg.param_dtype
        )
        bias = self.param("bias", _p(_zeros, self.bias_axes), self.bias_shape, cfg.param_dtype)
        y = jnp.einsum(self.equation, x.astype(cfg.dtype), kernel.astype(cfg.dtype))
        return y + bias.astype(cfg.dtype)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections.

    ``float[B, S, W]`` → ``float[B, S, W]``; the kernel is ``config.attention_impl``'s
    (:func:`exo2ego_jax.models.attention.attend`), softmax statistics in float32.
    """

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n, h, w = cfg.num_heads, cfg.head_dim, cfg.hidden_size

        def proj(name: str, tag: str) -> jax.Array:
            y = _Projection(
                (w, n, h),
                ("embed", "heads", "head_dim"),
                (n, h),
                ("heads", "head_dim"),
                "BSW,WNH->BSNH",
                cfg,
                name=name,
            )(x)
            return _constrain(checkpoint_name(y, tag), ("batch", "length", "act_heads", None))

        q = proj("q_proj", remat_lib.QUERY)
        k = proj("k_proj", remat_lib.KEY)
        v = proj("v_proj", remat_lib.VALUE)
        out = attend(q, k, v, None, impl=cfg.attention_impl)
        out = _Projection(
            (n, h, w),
            ("heads", "head_dim", "embed"),
            (w,),
            ("embed",),
            "BSNH,NHW->BSW",
            cfg,
            contracting=(0, 1),
            name="out_proj",
        )(out)
        return checkpoint_name(out, remat_lib.OUT)


class CLIPMLP(nn.Module):
    """``fc1`` → activation → ``fc2``: ``float[B, S, W]`` → ``float[B, S, W]``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(
            cfg.intermediate_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_p(_kernel_init, ("embed", "mlp")),
            bias_init=_p(_zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = checkpoint_name(h, remat_lib.MLP_IN)
        h = _constrain(_ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "act_mlp"))
        out = nn.Dense(
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=_p(_kernel_init, ("mlp", "embed")),
            bias_init=_p(_zeros, ("embed",)),
            name="fc2",
        )(h)
        return checkpoint_name(out, remat_lib.MLP_OUT)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``.

    Scan-shaped: ``float[B, S, W]`` → ``(carry float[B, S, W], per-layer output or None)``.
    """

    config: CLIPVisionConfig
    collect: bool = True  # emit the layer output as the scan's per-layer output

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        x = x + CLIPAttention(cfg, name="self_attn")(_norm(cfg, "layer_norm1", x))
        x = x + CLIPMLP(cfg, name="mlp")(_norm(cfg, "layer_norm2", x))
        x = _constrain(x, _TOKENS)
        return x, (x if self.collect else None)


class CLIPEncoder(nn.Module):
    """``config.num_layers`` encoder layers, scanned (params ``layers/...`` with a leading
    ``layers`` axis) or unrolled (``layers_0/...``), rematerialised by ``config.remat``.

    ``float[B, S, W]`` → (``float[B, S, W]``, ``float[L, B, S, W]`` or ``None``).
    """

    config: CLIPVisionConfig
    collect: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        # prevent_cse is only needed outside scan (scan already blocks CSE across steps).
        layer_cls = remat_lib.remat_layer(
            CLIPEncoderLayer, cfg.remat, prevent_cse=not cfg.scan_layers
        )
        if cfg.scan_layers:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            return scanned(cfg, collect=self.collect, name="layers")(x)
        outs = []
        for i in range(cfg.num_layers):
            x, y = layer_cls(cfg, collect=self.collect, name=f"layers_{i}")(x)
            outs.append(y)
        return x, (jnp.stack(outs) if self.collect else None)


class CLIPVisionTower(nn.Module):
    """CLIP ViT vision tower, numerically equal to HF ``CLIPVisionModel``.

    ``__call__(pixel_values float[B, H, W, 3])`` → :class:`CLIPVisionOutput`.
    """

    config: CLIPVisionConfig

    @nn.compact
    def __call__(
        self, pixel_values: jax.Array, *, output_hidden_states: bool = True
    ) -> CLIPVisionOutput:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values)
        x = _constrain(_norm(cfg, "pre_layrnorm", x), _TOKENS)  # HF's spelling
        embeds = x
        per_layer = None
        if cfg.num_layers:
            x, per_layer = CLIPEncoder(cfg, collect=output_hidden_states, name="encoder")(x)
        pooled = _norm(cfg, "post_layernorm", x[:, 0])
        hidden_states = None
        if output_hidden_states:
            layers = tuple(per_layer) if per_layer is not None else ()
            hidden_states = (embeds, *layers)
        return CLIPVisionOutput(
            last_hidden_state=x, pooler_output=pooled, hidden_states=hidden_states
        )


def _as_config(module_or_config: CLIPVisionTower | CLIPVisionConfig) -> CLIPVisionConfig:
    if isinstance(module_or_config, CLIPVisionTower):
        return module_or_config.config
    if isinstance(module_or_config, CLIPVisionConfig):
        return module_or_config
    raise TypeError(f"expected CLIPVisionTower or CLIPVisionConfig, got {type(module_or_config)}")


def resolve_layer(config: CLIPVisionConfig, select_layer: int) -> int:
    """Index into the ``num_layers + 1`` hidden states = number of layers that must run."""
    n = config.num_layers + 1
    if not -n <= select_layer < n:
        raise ValueError(f"select_layer {select_layer} out of range for {n} hidden states")
    return select_layer % n


def truncate_layers(
    config: CLIPVisionConfig, params: Mapping[str, Any], num_layers: int
) -> tuple[CLIPVisionConfig, dict[str, Any]]:
    """The first ``num_layers`` encoder layers of a tower: (config, params) pure slice.

    With scanned params every ``encoder/layers`` leaf is sliced ``[:num_layers]`` (inside
    ``jit`` XLA may copy the slice once per call; cheap next to the forward pass);
    unrolled params just drop ``layers_{i}`` for ``i >= num_layers``.
    """
    if not 0 <= num_layers <= config.num_layers:
        raise ValueError(f"num_layers {num_layers} not in [0, {config.num_layers}]")
    if num_layers == config.num_layers:
        return config, dict(params)
    params = dict(params)
    encoder = params.pop("encoder")
    if num_layers:
        if config.scan_layers:
            encoder = {"layers": jax.tree.map(lambda a: a[:num_layers], encoder["layers"])}
        else:
            encoder = {f"layers_{i}": encoder[f"layers_{i}"] for i in range(num_layers)}
        params["encoder"] = encoder
    return config.replace(num_layers=num_layers), params


def normalize_uint8(frames: jax.Array) -> jax.Array:
    """``uint8[..., 3]`` RGB -> CLIP-normalised ``float32[..., 3]`` (as
    ``input_pipeline.normalization.normalize_frames`` does on the host)."""
    x = frames.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def clip_features(
    module_or_config: CLIPVisionTower | CLIPVisionConfig,
    params: Mapping[str, Any],
    frames: jax.Array,
    select_layer: int = -2,
    drop_cls: bool = True,
) -> jax.Array:
    """VideoLLaMA2's CLIP features of a batch of clips.

    ``frames float[B, T, H, W, 3]`` (CLIP-normalised), or ``uint8`` RGB frames normalised
    here on the device (:func:`normalize_uint8`: a quarter of the bytes to send), are folded
    to ``(B·T)`` images;
    returns ``hidden_states[select_layer]`` (no post-layernorm) with the class token
    dropped, ``float[B, T, N, W]`` (or ``float[B, T, 1+N, W]`` with ``drop_cls=False``).

    Only the layers that feed the selected hidden state run: for ``select_layer=-2`` the
    last layer is skipped (``num_layers + 1 + select_layer`` layers), and no other hidden
    state is kept, so nothing is stored per layer.
    """
    config = _as_config(module_or_config)
    b, t = frames.shape[:2]
    if frames.dtype == jnp.uint8:
        frames = normalize_uint8(frames)
    cfg, p = truncate_layers(config, params, resolve_layer(config, select_layer))
    out = CLIPVisionTower(cfg).apply(
        {"params": p}, frames.reshape(b * t, *frames.shape[2:]), output_hidden_states=False
    )
    x = out.last_hidden_state
    if drop_cls:
        x = x[:, 1:]
    return x.reshape(b, t, *x.shape[1:])
