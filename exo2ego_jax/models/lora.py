"""Low-rank adapters (LoRA) as a drop-in replacement for a bias-free dense layer.

``LoRADense`` owns the frozen ``kernel`` at exactly the path a plain dense layer would, so
base checkpoints load unchanged, plus ``lora_a float[in, r]`` and ``lora_b float[r, out]``:

    y = x @ kernel + (alpha / r) * dropout(x) @ lora_a @ lora_b

``lora_b`` starts at zero (as PEFT and gemma's ``LoRADense``), so a freshly adapted model
computes exactly the base function. ``merge_lora`` folds trained adapters into the kernels
and removes them; ``lora_param_filter`` / ``lora_mask`` select the adapter leaves so a
training step can update only those.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_PARAM_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters (paper stage 3: rank 128, alpha 256, dropout 0.1, all seven).

    Attributes:
      rank: bottleneck width ``r``.
      alpha: the update is scaled by ``alpha / rank`` (PEFT's default, not rsLoRA).
      dropout: dropout rate on the adapter's input branch only (the base path is exact).
      targets: names of the projections that get an adapter.
      a_init: ``"kaiming_uniform"`` (PEFT default: U(-1/sqrt(in), 1/sqrt(in))) or
        ``"normal"`` (N(0, 1/r), PEFT's ``init_lora_weights="gaussian"``).
    """

    rank: int = 128
    alpha: float = 256.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ALL_PROJECTIONS
    a_init: str = "kaiming_uniform"

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.targets) - set(ALL_PROJECTIONS)
        if unknown:
            raise ValueError(
                f"unknown LoRA targets {sorted(unknown)}; choose from {ALL_PROJECTIONS}"
            )
        if self.a_init not in ("kaiming_uniform", "normal"):
            raise ValueError(f"a_init must be 'kaiming_uniform' or 'normal', got {self.a_init!r}")
        # Lists from config files would make the dataclass unhashable (jit static args).
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _a_initializer(kind: str, rank: int) -> nn.initializers.Initializer:
    if kind == "kaiming_uniform":
        # torch kaiming_uniform_(a=sqrt(5)) on A[r, in] == U(-1/sqrt(in), 1/sqrt(in)).
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2)
    return nn.initializers.normal(1.0 / rank)  # PEFT "gaussian": std 1/r


class LoRADense(nn.Module):
    """Bias-free dense layer ``float[..., in] -> float[..., features]`` with optional LoRA.

    With ``lora=None`` this is a plain dense layer whose only parameter is ``kernel``.

    Attributes:
      features: output width.
      kernel_axes: logical names of ``kernel``'s two axes, e.g. ``("embed", "heads")``.
      lora: adapter config, or None for no adapter.
      dtype: compute dtype; param_dtype: storage dtype of all parameters.
      kernel_init: initializer of the base kernel.
    """

    features: int
    kernel_axes: tuple[str | None, str | None] = (None, None)
    lora: LoRAConfig | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        d_in = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (d_in, self.features),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, kernel.astype(self.dtype))
        if self.lora is None:
            return y
        a = self.param(
            "lora_a",
            nn.with_logical_partitioning(
                _a_initializer(self.lora.a_init, self.lora.rank), (self.kernel_axes[0], "lora_rank")
            ),
            (d_in, self.lora.rank),
            self.param_dtype,
        )
        b = self.param(
            "lora_b",
            nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", self.kernel_axes[1])),
            (self.lora.rank, self.features),
            self.param_dtype,
        )
        h = nn.Dropout(self.lora.dropout)(x, deterministic=deterministic)
        # x @ A first: the rank-r intermediate is tiny, never form A @ B here.
        h = jnp.einsum("...i,ir->...r", h, a.astype(self.dtype))
        h = jnp.einsum("...r,ro->...o", h, b.astype(self.dtype))
        return y + jnp.asarray(self.lora.scale, self.dtype) * h


# ----------------------------------------------------------------------------- utilities


def _key_name(k: Any) -> str:
    """Name of one path entry: plain strings, or jax DictKey / GetAttrKey / SequenceKey."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def lora_param_filter(path: Sequence[Any]) -> bool:
    """True iff a parameter path (strings or a ``jax.tree_util`` key path) is an adapter.

    Attribute entries (the ``.value`` of a boxed ``nn.LogicallyPartitioned`` leaf) are
    skipped, so paths into freshly initialised, still boxed params work too.
    """
    names = [_key_name(k) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)]
    return bool(names) and names[-1] in LORA_PARAM_NAMES


def lora_mask(params: Any) -> Any:
    """Pytree of bools shaped like ``params``: True on adapter leaves (for ``optax.masked``)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: lora_param_filter(p), params)


def merge_lora(params: Any, config: Any) -> Any:
    """Folds every adapter into its kernel, ``kernel + scale * A @ B``, and drops the adapters.

    Works on any nesting (``{'params': ...}`` or the inner dict) and on layer-stacked
    parameters (``kernel float[L, in, out]``, ``lora_a float[L, in, r]``). The result runs in
    a module built with ``lora=None``. ``config`` is a ``LoRAConfig`` or any object with a
    ``.lora`` attribute (e.g. ``MistralConfig``); with no LoRA config, params are returned
    unchanged.
    """
    lora = config if isinstance(config, LoRAConfig) else getattr(config, "lora", None)
    if lora is None:
        if any(lora_param_filter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)):
            raise ValueError("params contain LoRA adapters but no LoRA config was given")
        return params

    def merge(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        if "lora_a" in node or "lora_b" in node:
            if not {"kernel", "lora_a", "lora_b"} <= node.keys():
                raise ValueError(f"incomplete LoRA layer with keys {sorted(node)}")
            kernel, a, b = (nn.unbox(node[k]) for k in ("kernel", "lora_a", "lora_b"))
            delta = jnp.einsum(
                "...ir,...ro->...io",
                a.astype(jnp.float32),
                b.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
            merged = (kernel.astype(jnp.float32) + lora.scale * delta).astype(kernel.dtype)
            box = node["kernel"]
            out = {k: v for k, v in node.items() if k not in LORA_PARAM_NAMES}
            out["kernel"] = (
                box.replace_boxed(merged) if isinstance(box, nn.meta.AxisMetadata) else merged
            )
            return out
        return {k: merge(v) for k, v in node.items()}

    return merge(params)
