"""VTG, KL-migration and cycle-consistency losses against torch / numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from exo2ego_jax.losses import (
    IGNORE_INDEX,
    cycle_consistency_loss,
    kl_migration_loss,
    vtg_loss,
    vtg_loss_terms,
)

B, L, V = 3, 9, 17


def _rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-30)


def _vtg_batch(seed: int = 0, scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((B, L, V))).astype(np.float32)
    labels = rng.integers(0, V, size=(B, L))
    labels[rng.random((B, L)) < 0.3] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # a row with no supervised token
    labels[0, 0] = 5  # position 0 is never a target (nothing predicts it)
    return logits, labels


def _torch_vtg(logits: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    lg = torch.from_numpy(np.array(logits)).double()[:, :-1].reshape(-1, V)
    tg = torch.from_numpy(labels)[:, 1:].reshape(-1)
    total = TF.cross_entropy(lg, tg, ignore_index=IGNORE_INDEX, reduction="sum")
    count = int((tg != IGNORE_INDEX).sum())
    return float(total) / count, count


# ----------------------------------------------------------------------------- VTG


@pytest.mark.parametrize("scale", [3.0, 1e4])  # 1e4: stability with huge logits
def test_vtg_matches_torch_cross_entropy(scale):
    logits, labels = _vtg_batch(scale=scale)
    loss, count = vtg_loss(jnp.asarray(logits), jnp.asarray(labels))
    expected, n = _torch_vtg(logits, labels)
    print(f"vtg scale={scale}: jax {float(loss):.8f} torch(f64) {expected:.8f}")
    assert int(count) == n and n > 0
    assert _rel(loss, expected) <= 1e-6


def test_vtg_terms_support_global_normalisation():
    logits, labels = _vtg_batch(seed=1)
    full, n = _torch_vtg(logits, labels)
    s0, c0 = vtg_loss_terms(jnp.asarray(logits[:2]), jnp.asarray(labels[:2]))
    s1, c1 = vtg_loss_terms(jnp.asarray(logits[2:]), jnp.asarray(labels[2:]))
    assert int(c0 + c1) == n
    assert _rel((s0 + s1) / (c0 + c1), full) <= 1e-6
    # Each shard divides its local sum by the global count; the parts add to the global mean.
    part0, _ = vtg_loss(jnp.asarray(logits[:2]), jnp.asarray(labels[:2]), num_supervised=n)
    part1, _ = vtg_loss(jnp.asarray(logits[2:]), jnp.asarray(labels[2:]), num_supervised=n)
    assert _rel(part0 + part1, full) <= 1e-6


def test_vtg_without_supervised_tokens_is_zero_not_nan():
    logits, labels = _vtg_batch()
    labels = np.full_like(labels, IGNORE_INDEX)

    def f(z):
        return vtg_loss(z, jnp.asarray(labels))[0]

    loss, grad = jax.value_and_grad(f)(jnp.asarray(logits))
    assert float(loss) == 0.0 and int(vtg_loss(jnp.asarray(logits), jnp.asarray(labels))[1]) == 0
    assert float(jnp.max(jnp.abs(grad))) == 0.0


def test_vtg_bfloat16_logits_use_float32_math():
    logits, labels = _vtg_batch(seed=2)
    bf16 = jnp.asarray(logits, jnp.bfloat16)
    loss, _ = vtg_loss(bf16, jnp.asarray(labels))
    expected, _ = _torch_vtg(np.asarray(bf16.astype(jnp.float32)), labels)
    assert loss.dtype == jnp.float32
    assert _rel(loss, expected) <= 1e-6


# ----------------------------------------------------------------------------- KL


def _kl_inputs(seed: int = 0, b: int = 2, s: int = 6, d: int = 10):
    rng = np.random.default_rng(seed)
    y = (2 * rng.standard_normal((b, s, d))).astype(np.float32)
    fx = (2 * rng.standard_normal((b, s, d))).astype(np.float32)
    mask = rng.random((b, s)) < 0.6
    mask[0, 0] = True
    return y, fx, mask


def _torch_kl(y, fx, tau, mask=None) -> float:
    y64, fx64 = torch.from_numpy(y).double(), torch.from_numpy(fx).double()
    per_elem = TF.kl_div(
        TF.log_softmax(fx64 / tau, dim=-1), TF.softmax(y64 / tau, dim=-1), reduction="none"
    )
    per_token = per_elem.sum(-1)
    if mask is None:
        return float(per_token.mean())
    m = torch.from_numpy(mask)
    return float(per_token[m].mean())


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_kl_matches_torch_kl_div(tau, masked):
    y, fx, mask = _kl_inputs()
    m = mask if masked else None
    got = kl_migration_loss(
        jnp.asarray(y), jnp.asarray(fx), tau, None if m is None else jnp.asarray(m)
    )
    expected = _torch_kl(y, fx, tau, m)
    print(f"kl tau={tau} masked={masked}: jax {float(got):.8f} torch(f64) {expected:.8f}")
    assert expected > 0.05
    assert _rel(got, expected) <= 1e-6
    scaled = kl_migration_loss(
        jnp.asarray(y), jnp.asarray(fx), tau, None if m is None else jnp.asarray(m),
        scale_by_t2=True,
    )  # fmt: skip
    assert _rel(scaled, tau**2 * expected) <= 1e-6


def test_kl_gradient_flows_only_into_fx():
    y, fx, mask = _kl_inputs(seed=3)
    grad_y, grad_fx = jax.grad(
        lambda a, b: kl_migration_loss(a, b, 2.0, jnp.asarray(mask)), argnums=(0, 1)
    )(jnp.asarray(y), jnp.asarray(fx))
    assert float(jnp.max(jnp.abs(grad_y))) == 0.0  # stop_gradient: exactly zero
    # d/dfx against torch autograd (y detached there by construction).
    fx_t = torch.from_numpy(fx).double().requires_grad_(True)
    p = TF.softmax(torch.from_numpy(y).double() / 2.0, dim=-1)
    per_token = TF.kl_div(TF.log_softmax(fx_t / 2.0, dim=-1), p, reduction="none").sum(-1)
    per_token[torch.from_numpy(mask)].mean().backward()
    np.testing.assert_allclose(np.asarray(grad_fx), fx_t.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert float(jnp.max(jnp.abs(grad_fx))) > 1e-3
    # Masked-out tokens get no gradient.
    assert float(jnp.max(jnp.abs(grad_fx[~mask]))) == 0.0


def test_kl_identical_is_zero_and_empty_mask_is_zero():
    y, fx, mask = _kl_inputs(seed=4)
    assert abs(float(kl_migration_loss(jnp.asarray(y), jnp.asarray(y)))) < 1e-6
    empty = jnp.zeros(mask.shape, bool)
    assert float(kl_migration_loss(jnp.asarray(y), jnp.asarray(fx), token_mask=empty)) == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        kl_migration_loss(jnp.asarray(y), jnp.asarray(fx[:, :-1]))


# ----------------------------------------------------------------------------- CCL


def test_cycle_consistency_matches_numpy():
    rng = np.random.default_rng(5)
    x, gfx, y, fgy = (rng.standard_normal((2, 6, 10)).astype(np.float32) for _ in range(4))
    fwd = np.mean(np.abs(gfx.astype(np.float64) - x))
    bwd = np.mean(np.abs(fgy.astype(np.float64) - y))
    both = cycle_consistency_loss(*map(jnp.asarray, (x, gfx, y, fgy)))
    only = cycle_consistency_loss(jnp.asarray(x), jnp.asarray(gfx), forward_only=True)
    print(f"ccl: jax {float(both):.8f} numpy {fwd + bwd:.8f}; forward {float(only):.8f}")
    assert _rel(both, fwd + bwd) <= 1e-6
    assert _rel(only, fwd) <= 1e-6
    with pytest.raises(ValueError, match="needs y and F\\(G\\(y\\)\\)"):
        cycle_consistency_loss(jnp.asarray(x), jnp.asarray(gfx))


def test_cycle_consistency_target_gradient_option():
    rng = np.random.default_rng(6)
    x, gfx = (jnp.asarray(rng.standard_normal((2, 4, 3)), jnp.float32) for _ in range(2))

    def grad_x(stop: bool) -> jax.Array:
        return jax.grad(
            lambda a: cycle_consistency_loss(a, gfx, forward_only=True, stop_gradient_targets=stop)
        )(x)

    n = x.size
    np.testing.assert_allclose(np.asarray(grad_x(False)), -np.sign(np.asarray(gfx - x)) / n)
    assert float(jnp.max(jnp.abs(grad_x(True)))) == 0.0
