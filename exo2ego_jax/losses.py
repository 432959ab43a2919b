"""Exo2Ego training losses (method.md §4) as pure ``jnp`` functions.

All math is float32 whatever the input dtype. Nothing here knows about stages or loss
weights: stage 2's ``λ_vtg·VTG + λ_kl·KL + λ_ccl·CCL`` is assembled by the trainer.

VTG (vision-grounded text generation)
  Next-token cross-entropy as a Hugging Face causal LM computes it: ``logits[:, :-1]``
  predict ``labels[:, 1:]``; positions whose label is ``ignore_index`` are not supervised.
  The loss is the *sum* over supervised tokens divided by the number of supervised tokens
  in the global batch. ``vtg_loss_terms`` returns ``(sum, count)`` so gradient accumulation
  and multi-host training can add both up (or ``psum`` them) and divide once;
  ``vtg_loss(..., num_supervised=global_count)`` divides a local sum by a global count.
  A batch without supervised tokens gives loss 0 (never NaN).

KL ("migration", a decision of this project)
  Per visual token, ``KL(softmax(y/τ) ‖ softmax(F(x)/τ))`` over the channel axis, mean over
  (unmasked) tokens. ``y`` (the exo demonstrator's tokens) is the fixed target: it is
  wrapped in ``stop_gradient``, so the gradient flows only into ``F(x)`` (and through it into
  F and E_ego). τ = 1 by default; ``scale_by_t2=True`` multiplies by τ² (Hinton et al.'s
  distillation convention, which keeps gradient magnitudes comparable across τ); off by
  default because with τ = 1 it changes nothing and the paper states no such factor.

CCL (cycle consistency)
  ``mean|G(F(x)) − x| + mean|F(G(y)) − y|`` (element-wise L1 mean, as CycleGAN's
  ``nn.L1Loss``); ``forward_only=True`` keeps only the first term (paper ablation). The plain
  formula lets gradient reach ``x`` through the target as well (E_ego trains in stage 2);
  ``stop_gradient_targets=True`` holds ``x`` and ``y`` fixed instead. ``y`` comes from the
  frozen E_exo, so the option only matters for ``x``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from input_pipeline.templates import IGNORE_INDEX  # -100, as Hugging Face / VideoLLaMA2

# ----------------------------------------------------------------------------- VTG


def vtg_loss_terms(
    logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood and the number of supervised tokens.

    Args:
      logits: ``float[B, L, V]`` (any float dtype; upcast to float32 here).
      labels: ``int[B, L]`` aligned with the *inputs*: ``labels[:, t]`` is the token at
        position t, predicted by ``logits[:, t - 1]``; ``ignore_index`` marks unsupervised
        positions. Supervised labels must lie in ``[0, V)``.
      ignore_index: label value that is not supervised.
    Returns:
      ``(nll_sum float32[], count int32[])`` over the ``B·(L-1)`` shifted positions.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"vtg_loss expects logits float[B, L, V] and labels int[B, L]; "
            f"got {logits.shape} and {labels.shape}"
        )
    logits = logits[:, :-1].astype(jnp.float32)  # [B, L-1, V]
    targets = labels[:, 1:]  # [B, L-1]
    mask = targets != ignore_index
    safe = jnp.where(mask, targets, 0)  # any in-range id; masked out below
    # -log softmax(z)[y] = logsumexp(z) - z[y]: stable, never materialises log-probs.
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(mask, lse - picked, 0.0)
    return nll.sum(), mask.sum(dtype=jnp.int32)


def vtg_loss(
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = IGNORE_INDEX,
    num_supervised: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over supervised tokens.

    Args:
      logits: ``float[B, L, V]``.
      labels: ``int[B, L]`` (unshifted, see ``vtg_loss_terms``).
      ignore_index: label value that is not supervised.
      num_supervised: normaliser; pass the *global* count of supervised tokens (over hosts
        and accumulation micro-batches) so the total is the global mean. ``None`` = this
        batch's own count.
    Returns:
      ``(loss float32[], count int32[])``: the loss, and this batch's supervised-token
      count. The loss is 0 when the normaliser is 0.
    """
    nll_sum, count = vtg_loss_terms(logits, labels, ignore_index)
    denom = count if num_supervised is None else jnp.asarray(num_supervised)
    return _safe_divide(nll_sum, denom), count


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
    """``total / count`` in float32, 0 when ``count == 0``."""
    count = jnp.asarray(count, jnp.float32)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


# ----------------------------------------------------------------------------- KL


def kl_per_token(y: jax.Array, fx: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``KL(softmax(y/τ) ‖ softmax(fx/τ))`` over the last axis, ``y`` under stop_gradient.

    Args:
      y: ``float[..., D]`` target tokens (exo, ``E_exo(exo clip)``).
      fx: ``float[..., D]`` mapped tokens ``F(E_ego(ego clip))``, same shape.
      temperature: τ > 0.
    Returns:
      ``float32[...]`` per-token KL (≥ 0).
    """
    if y.shape != fx.shape:
        raise ValueError(f"kl_migration_loss: y {y.shape} and F(x) {fx.shape} differ in shape")
    y = jax.lax.stop_gradient(y)  # the exo demonstrator is the fixed target
    log_p = jax.nn.log_softmax(y.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(fx.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def kl_migration_loss(
    y: jax.Array,
    fx: jax.Array,
    temperature: float = 1.0,
    token_mask: jax.Array | None = None,
    scale_by_t2: bool = False,
) -> jax.Array:
    """Mean per-token KL from the exo tokens ``y`` to the mapped ego tokens ``F(x)``.

    Gradient flows only into ``fx``; ``y`` is held fixed (stop_gradient).

    Args:
      y: ``float[B, S, D]`` exo visual tokens (target distribution after softmax / τ).
      fx: ``float[B, S, D]`` ``F(x)``.
      temperature: τ > 0 (method.md: 1).
      token_mask: optional ``bool[B, S]``; only True tokens count. ``None`` = all tokens.
      scale_by_t2: multiply by τ² (Hinton distillation convention); default False.
    Returns:
      ``float32[]``; 0 if the mask selects no token.
    """
    kl = kl_per_token(y, fx, temperature)  # [B, S]
    if token_mask is None:
        loss = kl.mean()
    else:
        if token_mask.shape != kl.shape:
            raise ValueError(f"token_mask {token_mask.shape} must be [B, S] = {kl.shape}")
        mask = token_mask.astype(bool)
        loss = _safe_divide(jnp.where(mask, kl, 0.0).sum(), mask.sum())
    return loss * (temperature**2) if scale_by_t2 else loss


# ----------------------------------------------------------------------------- CCL


def l1_mean(a: jax.Array, b: jax.Array) -> jax.Array:
    """``mean|a − b|`` over all elements, float32 (CycleGAN's ``nn.L1Loss``)."""
    if a.shape != b.shape:
        raise ValueError(f"cycle_consistency_loss: shapes {a.shape} and {b.shape} differ")
    return jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))


def cycle_consistency_loss(
    x: jax.Array,
    gfx: jax.Array,
    y: jax.Array | None = None,
    fgy: jax.Array | None = None,
    *,
    forward_only: bool = False,
    stop_gradient_targets: bool = False,
) -> jax.Array:
    """``mean|G(F(x)) − x| + mean|F(G(y)) − y|``.

    Args:
      x: ``float[B, S, D]`` ego tokens ``E_ego(ego clip)``.
      gfx: ``float[B, S, D]`` ``G(F(x))``.
      y: ``float[B, S, D]`` exo tokens ``E_exo(exo clip)``; unused if ``forward_only``.
      fgy: ``float[B, S, D]`` ``F(G(y))``; unused if ``forward_only``.
      forward_only: keep only the ego → exo → ego term (paper ablation).
      stop_gradient_targets: treat ``x`` and ``y`` as constants in the L1 targets.
    Returns:
      ``float32[]``.
    """
    if stop_gradient_targets:
        x = jax.lax.stop_gradient(x)
    loss = l1_mean(gfx, x)
    if forward_only:
        return loss
    if y is None or fgy is None:
        raise ValueError("cycle_consistency_loss needs y and F(G(y)) unless forward_only=True")
    if stop_gradient_targets:
        y = jax.lax.stop_gradient(y)
    return loss + l1_mean(fgy, y)
