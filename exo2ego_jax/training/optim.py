"""The optimizer of every stage: AdamW, warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax


def make_schedule(o: Any, total_steps: int) -> Callable[[int], float]:
    """Linear warmup over ``o.warmup_ratio`` of the optimizer steps, then cosine decay to 0.

    ``o`` is ``config.optim``; ``total_steps`` counts optimizer updates.
    """
    warmup = int(round(o.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(warmup, 1), max(total_steps, warmup + 1), 0.0
    )


def make_optimizer(o: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW + warmup-cosine + global-norm clipping (VideoLLaMA2 defaults).

    ``total_steps`` counts optimizer updates. With ``grad_accum = k > 1`` the returned
    transformation is ``optax.MultiSteps``: each call takes one micro-batch and the update is
    applied every k calls with the mean of the k gradients (so each micro-batch's VTG is
    normalised by its own supervised-token count, then averaged).
    """
    chain = []
    if o.grad_clip and o.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip))
    chain.append(
        optax.adamw(
            make_schedule(o, total_steps), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay
        )
    )
    opt = optax.chain(*chain)
    if (o.grad_accum or 1) > 1:
        opt = optax.MultiSteps(opt, every_k_schedule=o.grad_accum)
    return opt
