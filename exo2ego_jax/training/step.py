"""The jitted train step, built once for the trainer and the memory plan alike.

:func:`jit_train_step` wraps :func:`exo2ego_jax.stages.make_train_step` in ``jax.jit`` with
explicit in / out shardings and the train state donated. ``training.loop`` compiles it with
real arrays; ``tools.memory_plan`` lowers the very same function with abstract shapes, so the
plan measures exactly the program that trains.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax import stages
from exo2ego_jax.models.exo2ego import Exo2Ego, Params, for_flop_count
from exo2ego_jax.training.perf import xla_flops


@flax.struct.dataclass
class TrainState:
    """What one step updates (and a checkpoint saves): the stage's trainable parameters and
    their optimizer state. The frozen rest of the model is a separate, undonated argument."""

    params: Params
    opt_state: Any


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every leaf (arrays or ``ShapeDtypeStruct`` s with shardings)."""
    return jax.tree.map(lambda a: a.sharding, tree)


def abstract_of(tree: Any) -> Any:
    """``ShapeDtypeStruct`` s (shape, dtype, sharding) of every leaf, e.g. to restore into."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def batch_shardings(example: Mapping[str, Any], mesh, rules) -> Any:
    """One ``sharding.batch_sharding`` per leaf: batch axis split, the rest replicated."""
    return jax.tree.map(lambda _: sharding_lib.batch_sharding(mesh, rules), example)


def uses_dropout_rng(model: Exo2Ego) -> bool:
    """Whether the step needs a PRNG key (LoRA dropout is on)."""
    lora = model.config.llm.lora
    return lora is not None and lora.dropout > 0


def jit_train_step(
    model: Exo2Ego,
    stage: stages.StageConfig,
    optimizer: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    frozen_shardings: Params,
    batch_shardings: Any,
):
    """``step(state, frozen, batch, rng) -> (state, metrics)``, jitted with shardings.

    ``state`` is donated (updated in place); ``rng`` is a PRNG key, ignored (and pruned by
    jit) unless LoRA dropout is on; ``metrics`` are replicated scalars.
    """
    step_fn = stages.make_train_step(model, stage, optimizer)
    use_rng = uses_dropout_rng(model)

    def step(state: TrainState, frozen: Params, batch: Any, rng: jax.Array):
        params, opt_state, metrics = step_fn(
            state.params, state.opt_state, frozen, batch, rng if use_rng else None
        )
        return TrainState(params, opt_state), metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, frozen_shardings, batch_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def model_flops_per_step(
    model: Exo2Ego,
    stage: stages.StageConfig,
    optimizer: optax.GradientTransformation,
    batch: Any,
) -> float | None:
    """Model FLOPs of one whole train step (all devices): XLA's count of the step lowered
    (not compiled) from abstract shapes with every layer unrolled, no rematerialisation and
    ``xla`` attention (:func:`for_flop_count`). ``batch``: arrays or ``ShapeDtypeStruct`` s.

    Lowered HLO is the global program (before SPMD partitioning), so it is counted outside
    the run's mesh and rules (the abstract inputs carry no sharding).
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    no_mesh = jax.sharding.AbstractMesh((), ())
    with jax.sharding.use_abstract_mesh(no_mesh), nn.logical_axis_rules(()):
        plain = Exo2Ego(for_flop_count(model.config))
        params = plain.abstract_params()
        patterns = stages.trainable_patterns(stage, plain)
        trainable, frozen = stages.split_params(params, patterns)
        state = TrainState(trainable, jax.eval_shape(optimizer.init, trainable))
        step_fn = stages.make_train_step(plain, stage, optimizer)
        rng = jax.eval_shape(lambda: jax.random.key(0))
        use_rng = uses_dropout_rng(plain)

        def step(state, frozen, batch, rng):
            return step_fn(state.params, state.opt_state, frozen, batch, rng if use_rng else None)

        return xla_flops(jax.jit(step).lower(state, frozen, abstract, rng))


def model_flops_per_device(
    model: Exo2Ego,
    stage: stages.StageConfig,
    optimizer: optax.GradientTransformation,
    batch: Any,
) -> float | None:
    """:func:`model_flops_per_step` divided by the devices the step runs on."""
    flops = model_flops_per_step(model, stage, optimizer, batch)
    return flops / jax.device_count() if flops else None


class CompiledSteps:
    """The train step compiled once per batch shape (text lengths are padded per batch to a
    bucket, so a handful of shapes occur), with each shape's model FLOPs per device
    (``count_flops(batch)``, e.g. :func:`model_flops_per_device`). ``seconds`` /
    ``count_seconds``: each shape's compilation / FLOP-counting time."""

    def __init__(self, jitted, *, log=None, count_flops=None):
        self._jitted, self._log, self._count = jitted, log, count_flops
        self._compiled: dict[Any, Any] = {}
        self.flops: dict[Any, float | None] = {}
        self.seconds: dict[Any, float] = {}
        self.count_seconds: dict[Any, float] = {}

    @staticmethod
    def key(batch: Any) -> Any:
        return tuple((jax.tree_util.keystr(p), tuple(x.shape)) for p, x in _leaves(batch))

    def compiled(self, state: TrainState, frozen: Params, batch: Any, rng: jax.Array):
        """The executable for ``batch``'s shapes (compiled on first use)."""
        key = self.key(batch)
        if key not in self._compiled:
            t0 = time.time()
            executable = self._jitted.lower(state, frozen, batch, rng).compile()
            self.seconds[key] = time.time() - t0
            t0 = time.time()
            self.flops[key] = self._count(batch) if self._count is not None else None
            self.count_seconds[key] = time.time() - t0
            self._compiled[key] = executable
            if self._log is not None:
                shapes = sorted({s for _, s in key if len(s) == 2})  # the text arrays
                self._log(
                    f"compiled the train step for text shapes {shapes} in "
                    f"{self.seconds[key]:.1f}s ({len(self._compiled)} shape(s) so far)"
                )
        return self._compiled[key]

    def total_seconds(self) -> tuple[float, float]:
        """``(compiling, counting FLOPs)``: seconds over every shape so far."""
        return sum(self.seconds.values()), sum(self.count_seconds.values())

    def __call__(self, state: TrainState, frozen: Params, batch: Any, rng: jax.Array):
        """``(state, metrics, model FLOPs of this step or None)``."""
        executable = self.compiled(state, frozen, batch, rng)
        state, metrics = executable(state, frozen, batch, rng)
        return state, metrics, self.flops[self.key(batch)]


def _leaves(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def cast_frozen(frozen: Params, dtype: Any) -> Params:
    """The frozen parameters' floating leaves in ``dtype`` (the compute dtype), keeping
    their shardings; the float32 originals are donated. A frozen 7B LLM in bfloat16 holds
    14.5 GB instead of 29: it is only ever read in the compute dtype. Arrays or
    ``ShapeDtypeStruct`` s (for planning) alike."""
    dtype = jnp.dtype(dtype)

    def target(x):
        return dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    if all(target(x) == x.dtype for x in jax.tree.leaves(frozen)):
        return frozen
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, target(x), sharding=x.sharding), frozen
        )
    cast = jax.jit(
        lambda t: jax.tree.map(lambda x: x.astype(target(x)), t),
        out_shardings=shardings_of(frozen),
        donate_argnums=0,
    )
    return cast(frozen)
