"""LoRADense / merge_lora / adapter selection, on a Mistral loaded from an HF checkpoint."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_helpers import norm_weights_distinct, perturb_

from exo2ego_jax.models import mistral as M
from exo2ego_jax.models.lora import LoRAConfig, LoRADense, lora_mask, lora_param_filter, merge_lora
from exo2ego_jax.weights.hf_mistral import load_mistral

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mistral")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        initializer_range=0.1,
        sliding_window=None,
    )
    hf = transformers.MistralForCausalLM(config)
    perturb_(hf, seed=0)  # every norm weight != 1 and distinct per layer
    assert norm_weights_distinct(hf)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, 128, (2, 10))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames=("module", "deterministic"))
def _logits(module, params, ids, mask, deterministic=True, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    out = module.apply(
        {"params": params}, ids, attention_mask=mask, deterministic=deterministic, rngs=rngs
    )
    return out.logits


def _paths(params):
    return ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]


def test_zero_b_gives_base_outputs_exactly(ckpt, batch):
    base_mod, base = load_mistral(ckpt)
    lora_mod, adapted = load_mistral(ckpt, lora=LORA, lora_rng=jax.random.key(7))
    # Adapters are initialised like PEFT: B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)).
    a = adapted["layers"]["mlp"]["down_proj"]["lora_a"]
    assert a.shape == (2, 96, 4) and float(jnp.abs(a).max()) <= 96**-0.5
    assert float(jnp.abs(a).max()) > 0.5 * 96**-0.5
    assert float(jnp.abs(adapted["layers"]["self_attn"]["q_proj"]["lora_b"]).max()) == 0.0
    ids, mask = batch
    diff = float(
        jnp.abs(_logits(lora_mod, adapted, ids, mask) - _logits(base_mod, base, ids, mask)).max()
    )
    print(f"LoRA with B=0 vs base: max diff = {diff:.3e}")
    assert diff == 0.0


def _randomize_b(params, seed=1, scale=0.05):
    leaves = jax.tree_util.tree_leaves_with_path(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))

    def f(path, x):
        k = next(keys)
        if path[-1].key == "lora_b":
            return scale * jax.random.normal(k, x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(f, params)


def test_merge_matches_unmerged_and_removes_adapters(ckpt, batch):
    module, params = load_mistral(ckpt, lora=LORA)
    params = _randomize_b(params)
    merged = merge_lora(params, module.config)
    assert not any("lora" in p for p in _paths(merged))
    assert sorted(_paths(merged)) == sorted(p for p in _paths(params) if "lora" not in p)
    plain = M.MistralLM(dataclasses.replace(module.config, lora=None))
    ids, mask = batch
    unmerged_out = _logits(module, params, ids, mask)
    merged_out = _logits(plain, merged, ids, mask)
    base_mod, base = load_mistral(ckpt)
    moved = float(jnp.abs(unmerged_out - _logits(base_mod, base, ids, mask)).max())
    diff = float(jnp.abs(unmerged_out - merged_out).max())
    print(f"LoRA merged vs unmerged: max diff = {diff:.3e} (adapters moved logits by {moved:.3e})")
    assert moved > 1e-2
    assert diff < 1e-5
    # merge_lora also accepts a LoRAConfig and the {'params': ...} wrapper.
    wrapped = merge_lora({"params": params}, LORA)["params"]
    for x, y in zip(
        jax.tree_util.tree_leaves(wrapped), jax.tree_util.tree_leaves(merged), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="no LoRA config"):
        merge_lora(params, None)


def test_filter_selects_only_adapters(ckpt):
    module, params = load_mistral(ckpt, lora=LORA)
    selected = [p for p, _ in jax.tree_util.tree_leaves_with_path(params) if lora_param_filter(p)]
    names = sorted("/".join(k.key for k in p) for p in selected)
    assert len(names) == 14  # 7 projections x (lora_a, lora_b), layers stacked
    assert all(n.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for n in names)
    mask = lora_mask(params)
    assert sum(jax.tree_util.tree_leaves(mask)) == 14
    assert not mask["layers"]["self_attn"]["q_proj"]["kernel"]
    assert mask["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert not mask["embed_tokens"]["embedding"]
    assert lora_param_filter(("params", "layers", "mlp", "up_proj", "lora_b"))
    assert not lora_param_filter(("params", "layers", "mlp", "up_proj", "kernel"))
    # Boxed (freshly initialised) params: the box's .value entry is skipped.
    boxed = jax.eval_shape(
        M.MistralLM(M.tiny(lora=LORA)).init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32)
    )
    n_boxed = sum(lora_param_filter(p) for p, _ in jax.tree_util.tree_leaves_with_path(boxed))
    assert n_boxed == 14


def test_gradients_flow_only_where_masked(ckpt, batch):
    module, params = load_mistral(ckpt, lora=LORA)
    ids, mask = batch

    def loss(p):
        return jnp.mean(module.apply({"params": p}, ids, attention_mask=mask).logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    g = grads["layers"]["self_attn"]["v_proj"]
    # With B == 0 the gradient reaches B (not A): the standard LoRA start.
    assert float(jnp.abs(g["lora_b"]).max()) > 0
    assert float(jnp.abs(g["lora_a"]).max()) == 0
    trainable = jax.tree_util.tree_map(lambda gr, m: gr if m else None, grads, lora_mask(params))
    assert len(jax.tree_util.tree_leaves(trainable)) == 14


def test_targets_subset_and_dropout(ckpt, batch):
    cfg = LoRAConfig(rank=2, alpha=2.0, dropout=0.5, targets=("q_proj", "v_proj"), a_init="normal")
    module, params = load_mistral(ckpt, lora=cfg)
    names = [p for p in _paths(params) if "lora" in p]
    assert sorted(names) == sorted(
        f"layers/self_attn/{t}/lora_{x}" for t in ("q_proj", "v_proj") for x in "ab"
    )
    ids, mask = batch
    # B == 0 with dropout on: only the adapter branch is dropped, so the base model's logits
    # come out exactly (a dropout on the layer's input or output would change them).
    base_mod, base = load_mistral(ckpt)
    base_out = _logits(base_mod, base, ids, mask)
    for key in (1, 2):
        dropped = _logits(module, params, ids, mask, deterministic=False, rng=jax.random.key(key))
        np.testing.assert_array_equal(np.asarray(dropped), np.asarray(base_out))
    params = _randomize_b(params, scale=0.5)
    det = _logits(module, params, ids, mask)
    d1 = _logits(module, params, ids, mask, deterministic=False, rng=jax.random.key(1))
    d1b = _logits(module, params, ids, mask, deterministic=False, rng=jax.random.key(1))
    d2 = _logits(module, params, ids, mask, deterministic=False, rng=jax.random.key(2))
    np.testing.assert_array_equal(d1, d1b)
    assert float(jnp.abs(d1 - det).max()) > 1e-4 and float(jnp.abs(d1 - d2).max()) > 1e-4
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoRAConfig(targets=("qkv",))


def test_lora_dense_standalone():
    layer = LoRADense(features=6, kernel_axes=("embed", "mlp"), lora=LoRAConfig(rank=3, alpha=6.0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    v = layer.init(jax.random.key(1), x)
    p = nn_unbox(v["params"])
    assert {k: a.shape for k, a in p.items()} == {
        "kernel": (4, 6),
        "lora_a": (4, 3),
        "lora_b": (3, 6),
    }
    assert v["params"]["lora_a"].names == ("embed", "lora_rank")
    assert v["params"]["lora_b"].names == ("lora_rank", "mlp")
    p = {**p, "lora_b": jnp.ones((3, 6))}
    y = layer.apply({"params": p}, x)
    ref = x @ p["kernel"] + 2.0 * (x @ p["lora_a"] @ p["lora_b"])
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_lora_dense_dropout_only_on_the_adapter_input():
    """y = x @ W + scale * (m * x / (1 - p)) @ A @ B with m a Bernoulli(1 - p) mask on x:
    recovered here by inverting a square A and B, so the base path, where the dropout sits
    and the inverted-dropout scaling are all pinned down."""
    p = 0.5
    layer = LoRADense(features=4, lora=LoRAConfig(rank=4, alpha=2.0, dropout=p))
    x = jax.random.normal(jax.random.key(0), (3, 7, 4))
    params = nn_unbox(layer.init(jax.random.key(1), x)["params"])
    b = jax.random.normal(jax.random.key(2), (4, 4)) + 2.0 * jnp.eye(4)
    params = {**params, "lora_b": b}
    y = layer.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    x64 = np.asarray(x, np.float64)
    base = x64 @ np.asarray(params["kernel"], np.float64)
    a64, b64 = np.asarray(params["lora_a"], np.float64), np.asarray(b, np.float64)
    dropped_x = (np.asarray(y, np.float64) - base) / 0.5 @ np.linalg.inv(b64) @ np.linalg.inv(a64)
    # Each entry of the recovered adapter input is 0 or x / (1 - p): read the mask off it
    # (inverting A and B loses a few digits), then check y forward at full precision.
    kept = np.abs(dropped_x - x64 / (1 - p)) < np.abs(dropped_x)
    np.testing.assert_allclose(dropped_x[kept], x64[kept] / (1 - p), rtol=1e-2, atol=1e-3)
    np.testing.assert_allclose(dropped_x[~kept], 0.0, atol=1e-3)
    assert 0.3 < kept.mean() < 0.7, kept.mean()  # about 1 - p of the entries kept
    want = base + 0.5 * (kept * x64 / (1 - p)) @ a64 @ b64
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # Deterministic: no dropout at all.
    y_det = layer.apply({"params": params}, x)
    ref = base + 0.5 * x64 @ a64 @ b64
    np.testing.assert_allclose(np.asarray(y_det), ref, rtol=1e-5, atol=1e-5)


def nn_unbox(tree):
    return jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        tree,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )
