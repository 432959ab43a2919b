"""The small training loop shared by the demo's stand-in pretrainers (LM and CLIP tower).

Both stand-ins train one pytree of parameters on host-sampled batches with AdamW, a short
warmup and a cosine decay to 5 % of the peak rate, and global-norm clipping at 1.0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from tqdm.auto import tqdm


@dataclasses.dataclass
class FitResult:
    params: Any
    first_loss: float
    last_loss: float


def make_optimizer(lr: float, steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay 0.01), warmup over 5 % of ``steps``, cosine to ``0.05 * lr``,
    global-norm clipping at 1.0."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def fit(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    next_batch: Callable[[], tuple],
    *,
    steps: int,
    lr: float,
    desc: str,
    progress: bool = True,
) -> FitResult:
    """Minimises ``loss_fn(params, *batch)`` for ``steps`` steps, one ``next_batch()`` each.

    The loss is read back every 50 steps for the progress bar (and at the first and last
    step); in between the host only samples and sends batches.
    """
    opt = make_optimizer(lr, steps)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = loss = None
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, *next_batch())
        if i == 0:
            first = float(loss)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return FitResult(params, first, float(loss))
