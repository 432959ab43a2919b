"""The jitted train step, built once for the trainer and the memory plan alike.

:func:`jit_train_step` wraps :func:`exo2ego_jax.stages.make_train_step` in ``jax.jit`` with
explicit in / out shardings and the train state donated. ``training.loop`` compiles it with
real arrays; ``tools.memory_plan`` lowers the very same function with abstract shapes, so the
plan measures exactly the program that trains.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import optax

from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax import stages
from exo2ego_jax.models.exo2ego import Exo2Ego, Params


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
