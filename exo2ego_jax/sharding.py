"""Logical axis names and the rules table that maps them onto the device mesh.

Every parameter and every constrained activation in exo2ego-jax carries *logical* axis
names. One rules table (a sequence of ``(logical_name, mesh_axes)`` pairs, as in MaxText and
``flax.linen.partitioning``) maps those names onto the physical mesh axes
``('data', 'fsdp', 'tensor')``. Changing the parallelism strategy means changing the table,
never the model code.

Parameter axes
  ``embed``      model width of a transformer (LLM d_model, CLIP hidden size) and of the
                 linear maps in the connector readout / the mappings' MLP kind.
  ``mlp``        hidden width of feed-forward blocks; channels of the connector's depthwise
                 and squeeze-excite convs.
  ``conv_embed`` the block-width side of the connectors' dense conv kernels (input
                 channels; output channels of ``conv3``); ``conv_mlp`` the bottleneck side.
  ``mapping_embed`` / ``mapping_mlp``  the same for F / G's conv kernels (output channels
                 of the ``head`` on ``mapping_embed``).
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

Presets (:func:`rules_for`: :data:`RULES` with a preset's rows of :data:`PRESET_OVERRIDES`
replaced, and optionally a run's own rows; docs/sharding.md has the full table)
  ``fsdp``     (default, :data:`RULES` itself) ZeRO-3 style: weights are sharded over
               ``('fsdp', 'tensor')`` on their ``embed`` axis (LoRA factors without one: on
               ``lora_rank``); batch over all three mesh axes. ``tensor`` acts as a second
               FSDP axis, so a mesh with ``tensor > 1`` has no idle devices.
  ``fsdp_tp``  FSDP over ``fsdp`` plus tensor parallelism: ``heads`` / ``kv_heads`` / ``mlp``
               / ``vocab`` and their activations on ``tensor``; batch over
               ``('data', 'fsdp')``. The connectors' dense convs are tensor-parallel like
               the LLM (``conv_embed`` on ``fsdp``, ``conv_mlp`` on ``tensor``); F / G's
               conv kernels keep the ``fsdp`` layout (``mapping_embed`` over
               ``('fsdp', 'tensor')``): XLA computes wrong F / G gradients with
               Megatron-style kernel layouts (docs/sharding.md, Known issues;
               tests/test_sharding_presets.py).
  ``dp``       parameters replicated; batch over all three mesh axes.

Helpers
  :func:`logical_to_shardings`, :func:`param_shardings` and :func:`shard_init` place
  parameters (:func:`fit_spec` drops the mesh axes a dimension's size does not divide; the
  splash attention wrapper uses it too); :func:`optimizer_state_shardings` places optimizer
  state like them;
  :func:`batch_sharding` / :func:`shard_batch` place input batches and :func:`batch_ways`
  counts the devices a batch is split over;
  :func:`sharding_context` activates the rules (and the mesh) for the activation constraints
  inside the modules -- a jitted function is *traced* with the constraints only if its first
  call (or ``.lower``) happens inside it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, Protocol

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import meta
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]


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


def make_abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
    """A device-free ``('data', 'fsdp', 'tensor')`` mesh for planning layouts.

    ``NamedSharding(abstract_mesh, spec).shard_shape(shape)`` works on it, so the per-device
    footprint of, say, a 16-chip slice can be computed on a laptop (:func:`shard_bytes`).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES) or any(s < 1 for s in shape):
        raise ValueError(f"abstract mesh shape {shape} needs {len(MESH_AXES)} positive entries")
    return AbstractMesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# ----------------------------------------------------------------------------- vocabulary

#: Logical names carried by parameters (``nn.with_logical_partitioning``).
PARAM_AXES: tuple[str, ...] = (
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "layers",
    "lora_rank",
    "conv_embed",
    "conv_mlp",
    "mapping_embed",
    "mapping_mlp",
    "conv_space",
    "norm",
)
#: Logical names carried by activations (``nn.with_logical_constraint``).
ACTIVATION_AXES: tuple[str, ...] = (
    "batch",
    "length",
    "act_embed",
    "act_heads",
    "act_kv_heads",
    "act_mlp",
    "act_vocab",
)
#: The whole vocabulary; every preset has a rule for each of these names.
LOGICAL_AXES: tuple[str, ...] = PARAM_AXES + ACTIVATION_AXES

# ----------------------------------------------------------------------------- rules

_ALL = MESH_AXES  # batch over every mesh axis
_FSDP = ("fsdp", "tensor")  # the fsdp preset treats `tensor` as a second FSDP axis

#: The one rules table (the default preset, ``fsdp``): ZeRO-3 style, every weight sharded
#: over ``('fsdp', 'tensor')`` on its ``embed`` axis, the batch over every mesh axis.
#:
#: Flax resolves rules in order: for each rule whose logical name occurs in the array and
#: whose mesh axes are still unused by that array, the dimension takes those axes. So the
#: ``lora_rank`` rule, listed after ``embed``, only fires for the LoRA factors that have no
#: ``embed`` axis (lora_b[r, heads|kv_heads|mlp], lora_a[heads|mlp, r]): at paper size (r=128)
#: they hold 0.9 GB of trainable weights (+1.8 GB of Adam moments) that would otherwise sit
#: whole on every device. ``mlp`` gets no FSDP fallback on purpose: besides biases, the arrays
#: it would catch are the connector's depthwise and squeeze-excite convs, and sharding a
#: grouped conv's channels makes XLA replicate its batch-sharded input ("involuntary full
#: rematerialization"). ``conv_embed`` / ``conv_mlp`` (the connectors' dense conv kernels)
#: and ``mapping_embed`` / ``mapping_mlp`` (F / G's) mirror ``embed`` / ``mlp`` here. No
#: preset gives F / G tensor parallelism: with the batch on ``('data', 'fsdp')``, their
#: kernels on ``(fsdp, tensor)`` -- or ``(tensor, fsdp)`` once their bottleneck channels sit
#: on ``tensor`` -- make XLA (jax 0.10.2) compute wrong gradients (docs/sharding.md).
RULES: LogicalRules = (
    ("batch", _ALL),
    ("length", None),
    ("act_embed", None),
    ("act_heads", None),
    ("act_kv_heads", None),
    ("act_mlp", None),
    ("act_vocab", None),
    ("embed", _FSDP),
    ("lora_rank", _FSDP),
    ("conv_embed", _FSDP),
    ("conv_mlp", None),
    ("mapping_embed", _FSDP),
    ("mapping_mlp", None),
    ("mlp", None),
    ("heads", None),
    ("kv_heads", None),
    ("vocab", None),
    ("head_dim", None),
    ("layers", None),
    ("conv_space", None),
    ("norm", None),
)

#: Each preset is :data:`RULES` with these rows replaced (order kept).
PRESET_OVERRIDES: Mapping[str, Mapping[str, str | tuple[str, ...] | None]] = {
    "fsdp": {},
    # FSDP over `fsdp` plus tensor parallelism: heads / kv_heads / mlp / vocab and their
    # activations on `tensor`; the batch over ('data', 'fsdp'); LoRA factors mirror their
    # kernel (the rank takes `fsdp` where `embed` is missing).
    "fsdp_tp": {
        "batch": ("data", "fsdp"),
        "act_heads": "tensor",
        "act_kv_heads": "tensor",
        "act_mlp": "tensor",
        "act_vocab": "tensor",
        "embed": "fsdp",
        "lora_rank": "fsdp",
        "conv_embed": "fsdp",
        "conv_mlp": "tensor",
        "mlp": "tensor",
        "heads": "tensor",
        "kv_heads": "tensor",
        "vocab": "tensor",
    },
    # Parameters replicated; the batch over every mesh axis.
    "dp": {"embed": None, "lora_rank": None, "conv_embed": None, "mapping_embed": None},
}
DEFAULT_PRESET = "fsdp"

RulesLike = LogicalRules | str


def rules_for(
    name: str = DEFAULT_PRESET, overrides: Mapping[str, Any] | None = None
) -> LogicalRules:
    """:data:`RULES` with the rows of preset ``name`` (``"fsdp"``, ``"fsdp_tp"``, ``"dp"``)
    and then ``overrides`` (``{logical name: mesh axes}``, e.g. ``{"vocab": "tensor"}``)
    replaced; the order of the rows is kept."""
    if name not in PRESET_OVERRIDES:
        raise ValueError(
            f"unknown sharding preset {name!r}; choose one of {sorted(PRESET_OVERRIDES)} "
            "(see docs/sharding.md)"
        )
    rows = {**PRESET_OVERRIDES[name], **_as_rows(overrides or {})}
    unknown = sorted(set(rows) - {n for n, _ in RULES})
    if unknown:
        raise ValueError(f"sharding rule overrides {unknown}: not logical axis names of RULES")
    return tuple((n, rows.get(n, axes)) for n, axes in RULES)


def _as_rows(overrides: Mapping[str, Any]) -> dict[str, str | tuple[str, ...] | None]:
    # Config files give lists; PartitionSpec entries must be str, tuple or None.
    return {n: tuple(a) if isinstance(a, list) else (a or None) for n, a in overrides.items()}


def resolve_rules(rules: RulesLike | None) -> LogicalRules:
    """A rules table from a preset name, a table, or ``None`` (the default preset)."""
    if rules is None:
        return rules_for(DEFAULT_PRESET)
    if isinstance(rules, str):
        return rules_for(rules)
    return tuple((n, tuple(a) if isinstance(a, list) else a) for n, a in rules)


def uncovered_axes(rules: RulesLike, names: Sequence[str] = LOGICAL_AXES) -> list[str]:
    """The logical ``names`` that have no rule in ``rules`` (they would silently replicate)."""
    covered = {name for name, _ in resolve_rules(rules)}
    return sorted(set(names) - covered)


# ----------------------------------------------------------------------------- parameters

OnIndivisible = Literal["replicate", "raise"]
_log = logging.getLogger(__name__)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def _as_tuple(axes: str | Sequence[str]) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes)


def fit_spec(
    spec: P,
    logical: P,
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    where: str,
    on_indivisible: OnIndivisible = "replicate",
) -> P:
    """``spec`` with every dimension whose size its mesh axes do not divide made smaller.

    Trailing mesh axes of a dimension are dropped until the rest divides it (``('tensor',
    'fsdp')`` → ``'tensor'`` → replicated), so as much sharding as possible survives.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    names = list(logical) + [None] * (len(shape) - len(logical))
    out = []
    for dim, (size, axes) in enumerate(zip(shape, entries, strict=True)):
        if axes is None:
            out.append(None)
            continue
        wanted = _as_tuple(axes)
        kept = wanted
        while kept and size % math.prod(mesh_shape[a] for a in kept):
            kept = kept[:-1]
        if kept == wanted:
            out.append(axes)
            continue
        msg = (
            f"{where}: dimension {dim} ({names[dim]!r}, size {size}) is not divisible by mesh "
            f"axes {wanted} (size {math.prod(mesh_shape[a] for a in wanted)})"
        )
        if on_indivisible == "raise":
            raise ValueError(f"{msg}; change the mesh shape or the sharding rules")
        _warn_once(f"{msg}; sharding it over {kept or 'nothing (replicated)'} instead")
        out.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return P(*out)


def _path_str(path: tuple[Any, ...]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def logical_to_shardings(
    logical_specs: Any,
    mesh: jax.sharding.Mesh | AbstractMesh,
    rules: RulesLike | None = None,
    *,
    shapes: Any = None,
    on_indivisible: OnIndivisible = "replicate",
) -> Any:
    """Maps a tree of logical ``PartitionSpec`` s to a tree of ``NamedSharding`` s.

    Args:
      logical_specs: pytree whose leaves are ``PartitionSpec`` s of logical names (e.g.
        ``model.logical_specs()``).
      mesh: a concrete mesh, or an :class:`AbstractMesh` for planning.
      rules: a rules table or preset name (default preset when ``None``).
      shapes: optional pytree of the same structure with ``.shape`` leaves (arrays or
        ``ShapeDtypeStruct``). With it, a dimension that its mesh axes do not divide is
        handled per ``on_indivisible``; without it no check is made.
      on_indivisible: ``"replicate"`` (default) drops the offending mesh axes for that
        dimension and logs a warning once per parameter and dimension; ``"raise"`` raises a
        ``ValueError`` naming the parameter.
    """
    table = resolve_rules(rules)
    is_spec = lambda x: isinstance(x, P)
    flat, treedef = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=is_spec)
    shape_leaves = None
    if shapes is not None:
        shape_leaves = treedef.flatten_up_to(shapes)
    mesh_shape = dict(mesh.shape)
    out = []
    for i, (path, logical) in enumerate(flat):
        spec = nn.logical_to_mesh_axes(logical, table)
        if shape_leaves is not None:
            spec = fit_spec(
                spec,
                logical,
                shape_leaves[i].shape,
                mesh_shape,
                _path_str(path) or "array",
                on_indivisible,
            )
        out.append(NamedSharding(mesh, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


class _HasBoxedInit(Protocol):
    def init_boxed(self, rng: jax.Array) -> Any: ...


def _strip_boxes(tree: Any) -> Any:
    """Plain values of a boxed tree, without applying any sharding constraint."""

    def strip(x):
        if isinstance(x, meta.Partitioned):
            return x.unbox(apply_constraint=False)
        return x.unbox() if isinstance(x, meta.AxisMetadata) else x

    return jax.tree.map(strip, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def abstract_boxed(model: _HasBoxedInit) -> tuple[Any, Any]:
    """``(logical specs, ShapeDtypeStruct tree)`` of a model's parameters; nothing allocated.

    The same trees as ``model.logical_specs()`` and ``model.abstract_params()``, from one
    abstract evaluation of ``model.init_boxed`` instead of two.
    """
    boxed = jax.eval_shape(model.init_boxed, jax.random.key(0))
    return nn.get_partition_spec(boxed), _strip_boxes(boxed)


def param_shardings(
    model: _HasBoxedInit,
    mesh: jax.sharding.Mesh | AbstractMesh,
    rules: RulesLike | None = None,
    *,
    on_indivisible: OnIndivisible = "replicate",
) -> Any:
    """``NamedSharding`` tree for the parameters of an ``Exo2Ego`` (or any model with
    ``init_boxed``); computed from shapes and logical specs only, nothing is allocated."""
    specs, shapes = abstract_boxed(model)
    return logical_to_shardings(specs, mesh, rules, shapes=shapes, on_indivisible=on_indivisible)


#: XLA CPU options for programs that run once (parameter init): backend optimisation of
#: hundreds of random-number initialisers otherwise dominates start-up time on CPU.
FAST_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


def shard_init(
    model: _HasBoxedInit,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    rules: RulesLike | None = None,
    *,
    on_indivisible: OnIndivisible = "replicate",
) -> Any:
    """Parameters created directly in their sharded layout.

    ``model.init_boxed`` runs under ``jax.jit`` with ``out_shardings`` from
    :func:`param_shardings`, so each device computes only its own shards and no full copy of
    the parameters ever exists on one device or the host. Values equal ``model.init(rng)``.
    """
    shardings = param_shardings(model, mesh, rules, on_indivisible=on_indivisible)

    def init(key: jax.Array) -> Any:
        return _strip_boxes(model.init_boxed(key))

    # Empty rules turn every activation constraint inside the modules into a no-op while
    # tracing, so the result depends on out_shardings alone (even inside sharding_context).
    with nn.logical_axis_rules(()):
        lowered = jax.jit(init, out_shardings=shardings).lower(rng)
    options = FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
    return lowered.compile(options)(rng)


def optimizer_state_shardings(optimizer: Any, param_shardings_tree: Any, params: Any) -> Any:
    """Shardings for ``optimizer.init(params)``: parameter-shaped leaves (Adam moments, ...)
    like their parameter, everything else (step counts) replicated.

    ``jax.jit(optimizer.init)(sharded_params)`` alone puts the moments on one device (they do
    not depend on the parameter values, so nothing propagates); use
    ``jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(...))`` instead.
    ``params`` may be arrays or ``ShapeDtypeStruct`` s.
    """
    leaves = jax.tree.leaves(param_shardings_tree)
    if not leaves:
        raise ValueError("optimizer_state_shardings needs at least one parameter sharding")
    replicated = NamedSharding(leaves[0].mesh, P())
    abstract_state = jax.eval_shape(optimizer.init, params)
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_state,
        param_shardings_tree,
        transform_non_params=lambda _: replicated,
    )


# ----------------------------------------------------------------------------- batches


def batch_axes(rules: RulesLike | None = None) -> str | tuple[str, ...] | None:
    """Mesh axes of the logical ``batch`` axis under ``rules``."""
    return nn.logical_to_mesh_axes(("batch",), resolve_rules(rules))[0]


def batch_ways(
    mesh: jax.sharding.Mesh | AbstractMesh | Mapping[str, int], rules: RulesLike | None = None
) -> int:
    """Devices a batch is split over: the product of the ``batch`` rule's mesh axes.

    ``mesh`` may be a mesh or its ``{axis: size}`` shape (planning without devices).
    """
    shape = dict(mesh.shape) if hasattr(mesh, "shape") else dict(mesh)
    axes = batch_axes(rules)
    return math.prod(shape[a] for a in _as_tuple(axes)) if axes else 1


def batch_sharding(
    mesh: jax.sharding.Mesh | AbstractMesh, rules: RulesLike | None = None
) -> NamedSharding:
    """Leading (batch) dimension over the ``batch`` mesh axes; other dimensions replicated."""
    return NamedSharding(mesh, P(batch_axes(rules)))


def shard_batch(host_batch: Any, mesh: jax.sharding.Mesh, rules: RulesLike | None = None) -> Any:
    """Global ``jax.Array`` s from this process's part of a batch (a pytree of numpy arrays).

    Each process passes its own rows (``jax.make_array_from_process_local_data``): with one
    process that is the whole batch; on a multi-host slice the global batch is the
    concatenation of the processes' batches in process order. Scalars are replicated.
    """
    sharding = batch_sharding(mesh, rules)
    axes = batch_axes(rules)
    local_shards = max(1, batch_ways(mesh, rules) // jax.process_count())

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % local_shards:
            raise ValueError(
                f"batch leaf {_path_str(path) or 'array'}: {x.shape[0]} rows on this process "
                f"cannot be split over the {local_shards} batch shards of mesh axes {axes} "
                f"(mesh {dict(mesh.shape)}); use a per-process batch size divisible by "
                f"{local_shards}"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, host_batch)


# ----------------------------------------------------------------------------- activations


@contextlib.contextmanager
def sharding_context(
    mesh: jax.sharding.Mesh, rules: RulesLike | None = None
) -> Iterator[jax.sharding.Mesh]:
    """Activates ``mesh`` and ``rules`` for the modules' ``nn.with_logical_constraint`` s.

    Outside this context the constraints are no-ops (XLA then chooses activation layouts
    from the parameter and input shardings alone). Constraints are baked in when a function
    is *traced*, so the first call (or ``.lower``) of a jitted step must happen inside::

        with sharding_context(mesh, "fsdp_tp"):
            step = jax.jit(train_step, donate_argnums=(0, 1))
            trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
    """
    table = resolve_rules(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(table):
        yield mesh


# ----------------------------------------------------------------------------- accounting


def shard_bytes(shapes: Any, shardings: Any) -> dict[str, int]:
    """Bytes of one device's shard of every leaf, keyed by ``'/'``-joined path."""
    flat_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    flat_shardings = treedef.flatten_up_to(shardings)
    out = {}
    for (path, x), sharding in zip(flat_shapes, flat_shardings, strict=True):
        shard = sharding.shard_shape(tuple(x.shape))
        out[_path_str(path)] = math.prod(shard) * np.dtype(x.dtype).itemsize
    return out
