"""Logical axis names and the rules table that maps them onto the device mesh.

Every parameter and every constrained activation in exo2ego-jax carries *logical* axis
names. One rules table (a sequence of ``(logical_name, mesh_axes)`` pairs, as in MaxText and
``flax.linen.partitioning``) maps those names onto the physical mesh axes
``('data', 'fsdp', 'tensor')``. Changing the parallelism strategy means changing the table,
never the model code.

Parameter axes
  ``embed``      model width of a transformer (LLM d_model, CLIP hidden size) and the input /
                 output channels of convolutions and linear maps in the connector / mappings.
  ``mlp``        hidden width of feed-forward blocks; wide output channels of convs.
  ``heads``      query heads (fused ``heads * head_dim`` projections use ``heads``).
  ``kv_heads``   key / value heads (grouped-query attention).
  ``head_dim``   per-head width.
  ``vocab``      vocabulary.
  ``layers``     the stacked-layer axis created by ``nn.scan``.
  ``lora_rank``  LoRA bottleneck.
  ``conv_space`` the first spatial / temporal axis of a convolution kernel (further spatial
                 axes are ``None``: Flax refuses a logical name twice in one array).
  ``norm``       scale / bias vectors of normalisation layers.
Activation axes
  ``batch``, ``length`` (sequence / tokens), ``act_embed``, ``act_heads``, ``act_kv_heads``,
  ``act_mlp``, ``act_vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

#: FSDP over the ``fsdp`` mesh axis, tensor parallel over ``tensor``, data over ``data``.
#: With a mesh of shape (N, 1, 1) this is plain data parallelism.
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("conv_space", None),
    ("norm", None),
)


def make_mesh(
    shape: Sequence[int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ``('data', 'fsdp', 'tensor')`` mesh; one ``-1`` entry is filled from the device count."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
    if -1 in shape:
        known = 1
        for s in shape:
            if s != -1:
                known *= s
        if len(devices) % known:
            raise ValueError(
                f"mesh shape {shape} cannot be filled from {len(devices)} devices: "
                f"{len(devices)} is not divisible by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    total = 1
    for s in shape:
        total *= s
    if total != len(devices):
        raise ValueError(
            f"mesh shape {tuple(shape)} needs {total} devices but {len(devices)} are available; "
            "set the mesh shape so its product equals the device count (use -1 to fill one axis)"
        )
    return jax.make_mesh(
        tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )
