"""Attention kernels: selection per backend, parity with the reference path, the splash and
cuDNN plumbing (run on CPU through the Pallas interpreter / XLA stand-ins), config fields."""

from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage0
from exo2ego_jax import config_lib
from exo2ego_jax.models import attention as A
from exo2ego_jax.models import clip
from exo2ego_jax.models import mistral as M
from exo2ego_jax.models.decode import llm_extend, llm_prefill
from exo2ego_jax.sharding import make_mesh, sharding_context

TOL = 1e-5  # float32 parity of every CPU kernel with the reference path

# ----------------------------------------------------------------------------- selection

ERR = "error"
# backend -> requested -> kernel, for bfloat16 inputs, head width 128, 512 queries, no cache.
TABLE = {
    "cpu": dict(auto="xla", xla="xla", cudnn=ERR, splash=ERR, reference="reference"),
    "gpu": dict(auto="cudnn", xla="xla", cudnn="cudnn", splash=ERR, reference="reference"),
    "cuda": dict(auto="cudnn", xla="xla", cudnn="cudnn", splash=ERR, reference="reference"),
    "rocm": dict(auto="xla", xla="xla", cudnn=ERR, splash=ERR, reference="reference"),
    "tpu": dict(auto="splash", xla="xla", cudnn=ERR, splash="splash", reference="reference"),
}


@pytest.mark.parametrize("backend", list(TABLE))
@pytest.mark.parametrize("requested", A.ATTENTION_IMPLS)
def test_selection_table(backend, requested):
    expected = TABLE[backend][requested]
    kw = dict(dtype=jnp.bfloat16, head_dim=128, q_len=512)
    if expected == ERR:
        with pytest.raises(A.AttentionImplError, match=f"'{requested}'.*{backend}"):
            A.resolve_attention_impl(requested, backend, **kw)
        return
    assert A.resolve_attention_impl(requested, backend, **kw) == expected
    # Over a KV cache (prefill / decode) every kernel but the reference is XLA's.
    cached = A.resolve_attention_impl(requested, backend, cached=True, **kw)
    assert cached == ("reference" if requested == "reference" else "xla")


def test_selection_by_shape_and_dtype():
    r = A.resolve_attention_impl
    # auto falls back to XLA where the fused kernel cannot take the inputs...
    assert r("auto", "gpu", dtype=jnp.float32, head_dim=128) == "xla"
    assert r("auto", "gpu", dtype=jnp.bfloat16, head_dim=100) == "xla"
    assert r("auto", "gpu", dtype=jnp.float16, head_dim=64) == "cudnn"
    assert r("auto", "tpu", dtype=jnp.bfloat16, head_dim=128, q_len=64) == "xla"
    assert r("splash", "tpu", dtype=jnp.bfloat16, head_dim=128, q_len=64) == "splash"
    # ... an explicit request says why it cannot.
    with pytest.raises(A.AttentionImplError, match="bfloat16 / float16.*not float32"):
        r("cudnn", "gpu", dtype=jnp.float32, head_dim=128)
    with pytest.raises(A.AttentionImplError, match="head width 100"):
        r("cudnn", "gpu", dtype=jnp.bfloat16, head_dim=100)
    with pytest.raises(A.AttentionImplError, match="'flash' is not one of auto, xla, cudnn"):
        r("flash", "cpu")
    # Tracing for a TPU slice from this host (memory_plan --tpu): auto picks splash inside.
    with A.target_backend("tpu"):
        assert A.current_backend() == "tpu"
        assert r("auto", A.current_backend(), dtype=jnp.bfloat16, q_len=512) == "splash"
    # The model path on this (CPU) backend refuses accelerator kernels with the same error.
    assert A.current_backend() == "cpu"
    q = jnp.zeros((1, 8, 2, 8))
    with pytest.raises(A.AttentionImplError, match="needs a TPU"):
        A.attend(q, q, q, None, impl="splash")


# ----------------------------------------------------------------------------- masks


def _brute_force_mask(q_pos, key_len, window, key_valid):
    b, t = q_pos.shape
    out = np.zeros((b, t, key_len), bool)
    for i in range(b):
        for j in range(t):
            for s in range(key_len):
                ok = s <= q_pos[i, j] and (window is None or q_pos[i, j] - s < window)
                out[i, j, s] = ok and (key_valid is None or key_valid[i, s])
    return out


@pytest.mark.parametrize("window", [None, 3])
def test_mask_spec_dense(window):
    cfg = M.tiny(sliding_window=window)
    valid = np.arange(6)[None] < np.array([[6], [4], [0]])
    pos = np.broadcast_to(np.arange(6), (3, 6))
    dense = M.attention_mask_for(cfg, jnp.asarray(pos), jnp.asarray(valid), 6, cached=False)
    np.testing.assert_array_equal(dense, _brute_force_mask(pos, 6, window, valid))
    cache_pos = np.array([[7], [2], [9]])  # one decode step per row, 10 cache slots
    dense = M.attention_mask_for(cfg, jnp.asarray(cache_pos), None, 10, cached=True)
    np.testing.assert_array_equal(dense, _brute_force_mask(cache_pos, 10, window, None))


# ----------------------------------------------------------------------------- parity

LENGTHS = (16, 11, 3)  # right padding
CPU_IMPLS = ("auto", "xla")


def _batch(cfg, lengths=LENGTHS, total=16, seed=0):
    rs = np.random.RandomState(seed)
    ids = np.zeros((len(lengths), total), np.int32)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = rs.randint(3, cfg.vocab_size, n)
        mask[i, :n] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


def nn_unbox(tree):
    return jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        tree,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )


def _run_mistral(cfg, params, ids, mask, steps=4):
    """Logits of a padded forward, a cached prefill and ``steps`` cached decode steps, and
    the gradient of a masked loss."""
    module = M.MistralLM(cfg)

    @jax.jit
    def run(params, ids, mask):
        full = module.apply({"params": params}, ids, attention_mask=mask).logits
        cache = M.init_cache(cfg, ids.shape[0], ids.shape[1] + steps)
        last, cache, lengths = llm_prefill(module, params, mask, cache, input_ids=ids)
        decoded = []
        for t in range(steps):
            tok = (ids[:, t] + 7) % cfg.vocab_size  # fixed inputs: no sampling differences
            logits, cache = llm_extend(module, params, tok[:, None], (lengths + t)[:, None], cache)
            decoded.append(logits[:, 0])
        return full, last, jnp.stack(decoded, 1)

    def loss(params):
        logits = module.apply({"params": params}, ids, attention_mask=mask).logits
        return jnp.sum(jnp.where(mask[..., None] > 0, logits**2, 0.0)) / jnp.sum(mask)

    return (*run(params, ids, mask), jax.jit(jax.grad(loss))(params))


def test_cpu_kernels_match_reference_gqa_window_padding_decode():
    """Random tiny Mistral: GQA (4 query / 2 KV heads), sliding window 5 < 16 tokens, right
    padding, a cached prefill and four decode steps past the window; logits and gradients of
    every CPU kernel against the reference path."""
    cfg = M.tiny(sliding_window=5, vocab_size=128, initializer_range=0.1)
    ids, mask = _batch(cfg)
    params = jax.jit(M.MistralLM(cfg).init)(jax.random.key(0), ids)["params"]
    params = nn_unbox(params)
    ref = _run_mistral(dataclasses.replace(cfg, attention_impl="reference"), params, ids, mask)
    valid = np.asarray(mask, bool)
    for impl in CPU_IMPLS:
        out = _run_mistral(dataclasses.replace(cfg, attention_impl=impl), params, ids, mask)
        diffs = {
            "forward (real tokens)": np.abs(np.asarray(out[0] - ref[0]))[valid].max(),
            "prefill": float(jnp.abs(out[1] - ref[1]).max()),
            "decode": float(jnp.abs(out[2] - ref[2]).max()),
            "grad": max(
                float(jnp.abs(a - b).max())
                for a, b in zip(jax.tree.leaves(out[3]), jax.tree.leaves(ref[3]), strict=True)
            ),
        }
        print(impl, {k: f"{v:.2e}" for k, v in diffs.items()})
        assert max(diffs.values()) < TOL, (impl, diffs)


def test_cpu_kernels_match_reference_clip():
    cfg = clip.tiny()
    x = jax.random.normal(jax.random.key(1), (2, cfg.image_size, cfg.image_size, 3))
    params = nn_unbox(jax.jit(clip.CLIPVisionTower(cfg).init)(jax.random.key(0), x))
    out = {}
    for impl in ("reference", *CPU_IMPLS):
        module = clip.CLIPVisionTower(cfg.replace(attention_impl=impl))
        out[impl] = jax.jit(module.apply)(params, x).last_hidden_state
    for impl in CPU_IMPLS:
        diff = float(jnp.abs(out[impl] - out["reference"]).max())
        print(f"CLIP {impl} vs reference: {diff:.2e}")
        assert diff < TOL


def test_softmax_logits_not_rounded_to_bf16():
    """bf16 inputs: the XLA kernel keeps the logits in float32 (the reference rounds them),
    so it is closer to a float32 computation on the same bf16 inputs."""
    rs = np.random.RandomState(0)
    q, k, v = (jnp.asarray(rs.randn(2, 64, 4, 32) * 3, jnp.bfloat16) for _ in range(3))
    spec = A.MaskSpec(causal=True)
    exact = A.reference_attention(*(a.astype(jnp.float32) for a in (q, k, v)), spec)
    err = {
        impl: float(jnp.abs(A.attend(q, k, v, spec, impl=impl).astype(jnp.float32) - exact).max())
        for impl in ("xla", "reference")
    }
    print("bf16 inputs, max error vs float32:", err)
    assert err["xla"] < err["reference"]


# ----------------------------------------------------------------------------- GPU / TPU plumbing


def _qkv(b=8, t=40, n=4, k=2, h=16, seed=0):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.randn(b, t, n, h), jnp.float32)
    kv = [jnp.asarray(rs.randn(b, t, k, h), jnp.float32) for _ in range(2)]
    return q, *kv


# Right-padded rows, including an empty row and a one-token row (window 7 < 40 tokens).
PAD_LENGTHS = np.array([40, 33, 5, 1, 20, 40, 12, 0])


def _padded_spec(t=40, window=7):
    valid = jnp.asarray(np.arange(t)[None] < PAD_LENGTHS[:, None])
    return A.MaskSpec(key_valid=valid, causal=True, window=window), np.asarray(valid)


def test_cudnn_arguments_through_xla_standin():
    """The cuDNN call (is_causal, window, per-row lengths) run by XLA matches the reference
    on every real query."""
    q, k, v = _qkv()
    spec, valid = _padded_spec()
    ref = A.reference_attention(q, k, v, spec)
    out = jax.jit(lambda q, k, v, s: A.cudnn_attention(q, k, v, s, implementation="xla"))(
        q, k, v, spec
    )
    diff = float(np.abs(np.asarray(out - ref))[valid].max())
    print(f"cudnn arguments via XLA vs reference (real queries): {diff:.2e}")
    assert diff < TOL


def _splash_loss(impl, **kw):
    def loss(q, k, v, spec, weights):
        return jnp.sum(A.attend(q, k, v, spec, impl=impl, **kw) * weights)

    return loss


@pytest.mark.parametrize("preset", [None, "fsdp", "fsdp_tp"])
def test_splash_under_shard_map_matches_reference(preset):
    """The splash path on 'TPU' (Pallas interpreter): padded segment ids, a local-window
    static mask and GQA under shard_map over the mesh axes of the preset's `batch` and
    `act_heads` rules (fsdp: batch over all 8 devices; fsdp_tp: heads over `tensor`).
    Outputs and gradients on real queries equal the reference path's."""
    q, k, v = _qkv()
    spec, valid = _padded_spec()
    weights = jnp.asarray(np.random.RandomState(1).randn(*q.shape), jnp.float32)
    weights = weights * valid[:, :, None, None]  # the loss reads real queries only
    ref_loss = _splash_loss("reference")
    splash_loss = _splash_loss("splash", backend="tpu", interpret=True)
    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
    mesh = make_mesh((2, 2, 2))
    ctx = sharding_context(mesh, preset) if preset else contextlib.nullcontext()
    with ctx:
        fwd = jax.jit(
            lambda q, k, v, s: A.attend(q, k, v, s, impl="splash", backend="tpu", interpret=True)
        )
        jaxpr = str(jax.make_jaxpr(fwd)(q, k, v, spec))
        out = fwd(q, k, v, spec)
        (l1, g1) = grad(splash_loss)(q, k, v, spec, weights)
    ref = A.reference_attention(q, k, v, spec)
    (l0, g0) = grad(ref_loss)(q, k, v, spec, weights)
    assert "pallas_call" in jaxpr
    assert ("shard_map" in jaxpr) == (preset is not None)
    out = np.asarray(out)
    assert not np.isnan(out).any()  # the empty row and the pads beyond the window included
    diffs = {
        "out": float(np.abs(out - np.asarray(ref))[valid].max()),
        "loss (relative)": abs(float(l1 - l0)) / abs(float(l0)),
        "grad": max(float(jnp.abs(a - b).max()) for a, b in zip(g1, g0, strict=True)),
    }
    print(f"splash ({preset}) vs reference:", {k: f"{d:.2e}" for k, d in diffs.items()})
    assert max(diffs.values()) < TOL


def test_splash_bidirectional_padded_to_a_block():
    """CLIP's case: no mask, 40 tokens padded to 128 inside the kernel; pads stay hidden."""
    q, k, v = _qkv(b=2, n=4, k=4)
    ref = A.reference_attention(q, k, v, None)
    out = jax.jit(lambda q, k, v: A.attend(q, k, v, impl="splash", backend="tpu", interpret=True))(
        q, k, v
    )
    diff = float(jnp.abs(out - ref).max())
    print(f"splash, bidirectional, 40 -> 128 tokens: {diff:.2e}")
    assert diff < TOL


def test_splash_refuses_a_sharded_sequence():
    q, k, v = _qkv()
    with sharding_context(make_mesh((2, 2, 2)), None):
        with nn.logical_axis_rules([("length", "fsdp")]):
            with pytest.raises(A.AttentionImplError, match="sequence unsharded.*'length'"):
                jax.jit(
                    lambda q, k, v: A.attend(q, k, v, impl="splash", backend="tpu", interpret=True)
                )(q, k, v)


# ----------------------------------------------------------------------------- config


def test_config_field_reaches_both_towers_and_the_llm():
    c = stage0.get_config("demo")
    assert c.model.attention_impl == "auto"
    c.model.attention_impl = "xla"
    model = config_lib.build_model_config(c.model)
    assert model.clip.attention_impl == model.llm.attention_impl == "xla"
    c.model.attention_impl = "flash"
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.attention_impl='flash'"):
        config_lib.build_model_config(c.model)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_config_refuses_kernels_this_backend_lacks(impl):
    c = stage0.get_config("demo")
    c.model.attention_impl = impl
    with pytest.raises(config_lib.ConfigError, match=r"config\.model\.attention_impl.*'cpu'"):
        config_lib.check_backend(c.model)
    config_lib.check_backend(c.model, backend="tpu" if impl == "splash" else "gpu")
    with pytest.raises(ValueError, match="attention_impl"):
        M.tiny(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_impl"):
        clip.tiny(attention_impl="flash")
