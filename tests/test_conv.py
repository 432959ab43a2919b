"""models/conv.py: every fast form equals ``jax.lax.conv_general_dilated`` (values and
gradients), and the form chosen is the one the docstring names."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exo2ego_jax.models import attention
from exo2ego_jax.models import conv as conv_lib


def _reference(x, kernel, strides, pairs, groups, dilation=None):
    n = kernel.ndim - 2
    spatial = "DHW"[-n:]
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pairs,
        lhs_dilation=dilation,
        feature_group_count=groups,
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=jax.lax.Precision.HIGHEST,
    )


# name: (input shape, kernel shape, strides, padding pairs, groups, input dilation,
#        the form conv() takes on a CPU, the form it takes for a TPU)
P2, P3 = [(1, 1)] * 2, [(1, 1)] * 3
CASES = {
    "pointwise 2d": ((2, 5, 6, 8), (1, 1, 8, 12), (1, 1), [(0, 0)] * 2, 1, None, "", ""),
    "depthwise 3x3 same": ((2, 5, 6, 8), (3, 3, 1, 8), (1, 1), P2, 8, None, "_depthwise",
                           "_depthwise"),
    "depthwise 3x3x3 valid": ((1, 4, 5, 6, 4), (3, 3, 3, 1, 4), (1,) * 3, [(0, 0)] * 3, 4,
                              None, "_depthwise", "_depthwise"),
    "patch 2d (CLIP)": ((3, 16, 16, 3), (8, 8, 3, 10), (8, 8), [(0, 0)] * 2, 1, None,
                        "_patchify", "_patchify"),
    "patch 3d padded (sampler)": ((2, 4, 8, 8, 6), (2, 2, 2, 6, 5), (2, 2, 2), P3, 1, None,
                                  "_patchify", "_patchify"),
    "patch 3d, a ragged edge": ((1, 5, 7, 6, 3), (2, 2, 2, 3, 4), (2, 2, 2), P3, 1, None,
                                "_patchify", "_patchify"),
    "dense 7x7, 3 -> 6 (mapping head)": ((2, 10, 10, 3), (7, 7, 3, 6), (1, 1), [(0, 0)] * 2,
                                         1, None, "_im2col", "lax"),
    "dense 3x3 stride 2, 4 -> 6": ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), P2, 1, None,
                                   "_im2col", "lax"),
    "transposed 3x3 x2, 4 -> 4": ((2, 3, 3, 4), (3, 3, 4, 4), (1, 1), [(1, 2)] * 2, 1,
                                  (2, 2), "_im2col", "lax"),
    "dense 7x7, 6 -> 3 (mapping stem)": ((2, 10, 10, 6), (7, 7, 6, 3), (1, 1), P2, 1, None,
                                         "lax", "lax"),
    "transposed, 6 -> 3": ((2, 3, 3, 6), (3, 3, 6, 3), (1, 1), [(1, 2)] * 2, 1, (2, 2),
                           "lax", "lax"),
    "grouped": ((2, 6, 6, 8), (3, 3, 2, 8), (1, 1), P2, 4, None, "lax", "lax"),
}  # fmt: skip


def _forms_taken(monkeypatch, fn) -> list[str]:
    """Runs ``fn`` (a fresh trace) and returns which of conv's forms it called."""
    called = []
    for name in ("_depthwise", "_patchify", "_im2col"):
        original = getattr(conv_lib, name)
        monkeypatch.setattr(
            conv_lib, name, lambda *a, _f=original, _n=name, **k: called.append(_n) or _f(*a, **k)
        )
    lax_conv = jax.lax.conv_general_dilated
    monkeypatch.setattr(
        conv_lib.jax.lax,
        "conv_general_dilated",
        lambda *a, **k: called.append("lax") or lax_conv(*a, **k),
    )
    fn()
    monkeypatch.undo()
    return called


@pytest.mark.parametrize("name", list(CASES))
def test_conv_matches_conv_general_dilated_in_value_and_gradient(name, monkeypatch):
    x_shape, k_shape, strides, pairs, groups, dilation, on_cpu, on_tpu = CASES[name]
    kx, kk, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape)
    kernel = jax.random.normal(kk, k_shape)

    def ours(x, kernel):
        return conv_lib.conv(
            x, kernel, strides=strides, padding=pairs, groups=groups, input_dilation=dilation
        )

    def reference(x, kernel):
        return _reference(x, kernel, strides, pairs, groups, dilation)

    want = reference(x, kernel)
    got = jax.jit(ours)(x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cot = jax.random.normal(kg, want.shape)
    grads = jax.jit(jax.grad(lambda a, b: jnp.vdot(ours(a, b), cot), argnums=(0, 1)))(x, kernel)
    ref = jax.grad(lambda a, b: jnp.vdot(reference(a, b), cot), argnums=(0, 1))(x, kernel)
    for g, r in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)

    # The dispatch: the named form runs (and no other); for a TPU target the CPU-only form
    # (im2col) gives way to the generic conv.
    def trace():
        jax.eval_shape(lambda a, b: ours(a, b), x, kernel)  # a fresh trace; computes nothing

    assert _forms_taken(monkeypatch, trace) == ([on_cpu] if on_cpu else [])

    def trace_for_tpu():
        with attention.target_backend("tpu"):
            trace()

    assert _forms_taken(monkeypatch, trace_for_tpu) == ([on_tpu] if on_tpu else [])


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
