"""Shared helpers for tests that load or write Hugging Face checkpoints."""

from __future__ import annotations

import numpy as np
import torch


def perturb_(model: torch.nn.Module, seed: int, const_std: float = 0.3, std: float = 0.02) -> None:
    """Makes every tensor of ``model`` informative and distinct, in place (seeded).

    HF initialises every norm weight to 1 and every bias to 0, the same in every layer: a
    loader that ignored them, or read another layer's, would still match. A tensor whose
    entries are all equal (a norm weight, a bias) becomes its value ``+ const_std·N(0, 1)``;
    any other tensor gets ``+ std·N(0, 1)`` (keeps its scale). One generator for the whole
    model, so each layer draws its own values.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            constant = bool((p == p.reshape(-1)[0]).all())
            p.add_((const_std if constant else std) * noise)


def norm_weights_distinct(model: torch.nn.Module) -> bool:
    """True if no two norm weights of ``model`` are equal and none is all ones."""
    norms = [p for n, p in model.named_parameters() if "norm" in n and n.endswith("weight")]
    ones = any(bool((p == 1).all()) for p in norms)
    pairs = any(
        torch.equal(a, b) for i, a in enumerate(norms) for b in norms[i + 1 :] if a.shape == b.shape
    )
    return bool(norms) and not ones and not pairs


def perturb_params(params, seed: int, const_std: float = 0.3, std: float = 0.02):
    """:func:`perturb_` for a JAX/Flax parameter tree (returns a new tree of numpy arrays).

    Flax also initialises norm scales to 1 and biases to 0; a layer-stacked ``[L, D]`` scale
    gets different values in every layer.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)

    def one(x):
        x = np.asarray(x)
        constant = bool((x == x.reshape(-1)[0]).all())
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return (x + (const_std if constant else std) * noise).astype(x.dtype)

    return jax.tree_util.tree_map(one, params)


def right_padded_batch(lengths, total, vocab, seed=0, low=3):
    """``(ids, mask)`` int64 ``[len(lengths), total]``: row ``i`` holds ``lengths[i]`` random
    ids in ``[low, vocab)`` then zeros (mask 1 on the real tokens)."""
    rs = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), total), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rs.randint(low, vocab, n)
        mask[i, :n] = 1
    return ids, mask
