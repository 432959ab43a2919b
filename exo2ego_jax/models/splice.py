"""Splicing visual tokens into a right-padded text sequence at the ``<video>`` placeholder.

Each row of ``input_ids`` holds exactly one sentinel id (VideoLLaMA2's ``-201``) where the
video goes. The sentinel is replaced by ``N`` visual tokens, so every output row is
``L + N - 1`` long: text before the placeholder, the visual tokens, the rest of the text,
then the row's padding (right padding stays right padding). Everything is a gather with
static shapes, so it jits once for a given (L, N).
"""

from __future__ import annotations

import jax.numpy as jnp

from input_pipeline.templates import IGNORE_INDEX


def placeholder_positions(input_ids: jnp.ndarray, sentinel: int) -> jnp.ndarray:
    """int32[B]: index of the (first) sentinel in each row of ``int[B, L]`` ids."""
    return jnp.argmax(input_ids == sentinel, axis=1).astype(jnp.int32)


def splice(text: jnp.ndarray, visual: jnp.ndarray, position: jnp.ndarray) -> jnp.ndarray:
    """Replaces ``text[b, position[b]]`` by the ``N`` rows of ``visual[b]``.

    Args:
      text: ``[B, L, ...]`` per-token values (embeddings, labels, mask...).
      visual: ``[B, N, ...]`` values for the visual tokens (same trailing shape, same dtype).
      position: ``int32[B]`` placeholder index per row.
    Returns:
      ``[B, L + N - 1, ...]``.
    """
    b, length = text.shape[:2]
    n = visual.shape[1]
    out_len = length + n - 1
    j = jnp.arange(out_len)[None, :]  # [1, L+N-1]
    p = position[:, None]  # [B, 1]
    is_visual = (j >= p) & (j < p + n)
    text_idx = jnp.where(j < p, j, j - n + 1)
    text_idx = jnp.clip(text_idx, 0, length - 1)
    vis_idx = jnp.clip(j - p, 0, n - 1)
    extra = (1,) * (text.ndim - 2)
    from_text = jnp.take_along_axis(text, text_idx.reshape(b, out_len, *extra), axis=1)
    from_vis = jnp.take_along_axis(visual, vis_idx.reshape(b, out_len, *extra), axis=1)
    return jnp.where(is_visual.reshape(b, out_len, *extra), from_vis, from_text)


def splice_batch(
    input_ids: jnp.ndarray,
    token_embeds: jnp.ndarray,
    visual_embeds: jnp.ndarray,
    attention_mask: jnp.ndarray,
    labels: jnp.ndarray | None,
    sentinel: int,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """Builds the LLM inputs of a multimodal batch.

    Args:
      input_ids: ``int[B, L]`` with one ``sentinel`` per row, right padded.
      token_embeds: ``float[B, L, D]`` embeddings of ``input_ids`` (sentinel rows arbitrary).
      visual_embeds: ``float[B, N, D]`` visual tokens (already in the LLM width).
      attention_mask: ``int[B, L]``, 1 for real tokens.
      labels: ``int[B, L]`` or None; visual positions get ``IGNORE_INDEX``.
    Returns:
      ``(embeds float[B, L+N-1, D], attention_mask int[B, L+N-1], labels int[B, L+N-1] | None)``.
    """
    pos = placeholder_positions(input_ids, sentinel)
    n = visual_embeds.shape[1]
    embeds = splice(token_embeds, visual_embeds.astype(token_embeds.dtype), pos)
    ones = jnp.ones((input_ids.shape[0], n), attention_mask.dtype)
    mask = splice(attention_mask, ones, pos)
    if labels is not None:
        ignore = jnp.full((input_ids.shape[0], n), IGNORE_INDEX, labels.dtype)
        labels = splice(labels, ignore, pos)
    return embeds, mask, labels
