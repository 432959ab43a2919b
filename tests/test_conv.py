"""models/conv.py: every fast form equals ``jax.lax.conv_general_dilated`` (values and
gradients), and the form chosen is the one the docstring names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exo2ego_jax.models import conv as conv_lib


def _reference(x, kernel, strides, pairs, groups):
    n = kernel.ndim - 2
    spatial = "DHW"[-n:]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pairs,
        feature_group_count=groups,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=jax.lax.Precision.HIGHEST,
    )


# (input shape, kernel shape, strides, padding pairs, groups, the form conv() must take)
CASES = {
    "pointwise 2d": ((2, 5, 6, 8), (1, 1, 8, 12), (1, 1), [(0, 0)] * 2, 1, "_matmul"),
    "depthwise 3x3 same": ((2, 5, 6, 8), (3, 3, 1, 8), (1, 1), [(1, 1)] * 2, 8, "_depthwise"),
    "depthwise 3x3x3 valid": (
        (1, 4, 5, 6, 4),
        (3, 3, 3, 1, 4),
        (1,) * 3,
        [(0, 0)] * 3,
        4,
        "_depthwise",
    ),
    "patch 2d (CLIP)": ((3, 16, 16, 3), (8, 8, 3, 10), (8, 8), [(0, 0)] * 2, 1, "_patchify"),
    "patch 3d padded (sampler)": (
        (2, 4, 8, 8, 6),
        (2, 2, 2, 6, 5),
        (2, 2, 2),
        [(1, 1)] * 3,
        1,
        "_patchify",
    ),
    "patch 3d, a ragged edge": (
        (1, 5, 7, 6, 3),
        (2, 2, 2, 3, 4),
        (2, 2, 2),
        [(1, 1)] * 3,
        1,
        "_patchify",
    ),
    "dense 3x3 stride 2 (generic)": ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), [(1, 1)] * 2, 1, "lax"),
    "grouped (generic)": ((2, 6, 6, 8), (3, 3, 2, 8), (1, 1), [(1, 1)] * 2, 4, "lax"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_matches_conv_general_dilated_in_value_and_gradient(name, monkeypatch):
    x_shape, k_shape, strides, pairs, groups, form = CASES[name]
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape)

    def ours(x, kernel):
        return conv_lib.conv(x, kernel, strides=strides, padding=pairs, groups=groups)

    want = _reference(x, kernel, strides, pairs, groups)
    got = jax.jit(ours)(x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(kg, want.shape)
    grads = jax.jit(jax.grad(lambda a, b: jnp.vdot(ours(a, b), cot), argnums=(0, 1)))(x, kernel)
    ref = jax.grad(
        lambda a, b: jnp.vdot(_reference(a, b, strides, pairs, groups), cot), argnums=(0, 1)
    )(x, kernel)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)

    # The dispatch: the named fast form runs (and the generic conv does not), or vice versa.
    called = []
    for fn in ("_depthwise", "_patchify"):
        original = getattr(conv_lib, fn)
        monkeypatch.setattr(
            conv_lib, fn, lambda *a, _f=original, _n=fn, **k: called.append(_n) or _f(*a, **k)
        )
    lax_conv = jax.lax.conv_general_dilated
    monkeypatch.setattr(
        conv_lib.jax.lax,
        "conv_general_dilated",
        lambda *a, **k: called.append("lax") or lax_conv(*a, **k),
    )
    jax.eval_shape(lambda a, b: ours(a, b), x, kernel)  # a fresh trace; computes nothing
    assert called == ([] if form == "_matmul" else [form])


def test_conv_module_keeps_nn_conv_parameters():
    """Same parameter names, shapes and initial values as ``flax.linen.Conv`` (checkpoints
    and weight maps written for it load unchanged), and the same output."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 6, 4))
    kw = dict(features=4, kernel_size=(3, 3), padding=[(1, 1), (1, 1)], use_bias=True)
    ours = conv_lib.Conv(groups=4, **kw)
    theirs = nn.Conv(feature_group_count=4, **kw)
    p_ours = ours.init(jax.random.PRNGKey(2), x)
    p_theirs = theirs.init(jax.random.PRNGKey(2), x)
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
    jax.tree.map(np.testing.assert_array_equal, p_ours, p_theirs)
    np.testing.assert_allclose(
        ours.apply(p_ours, x), theirs.apply(p_theirs, x), rtol=1e-5, atol=1e-5
    )


def test_bad_padding_and_groups_are_named():
    x = jnp.zeros((1, 4, 4, 6))
    with pytest.raises(ValueError, match="padding 'SAME'"):
        conv_lib.conv(x, jnp.zeros((3, 3, 6, 2)), padding="SAME")
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        conv_lib.Conv(4, (3, 3), groups=4).init(jax.random.PRNGKey(0), x)
