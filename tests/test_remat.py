"""Remat policies by name: same loss and gradients as no remat, and what each one keeps."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from configs import stage0
from exo2ego_jax import config_lib
from exo2ego_jax.models import clip, remat
from exo2ego_jax.models import mistral as M
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.tools import memory_plan

_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "u32": 4, "bool": 1}


def _unbox(tree):
    return jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        tree,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )


def _mistral_loss(cfg, ids):
    module = M.MistralLM(cfg)
    return lambda p: jnp.mean(module.apply({"params": p}, ids).logits ** 2)


@pytest.fixture(scope="module")
def tiny_lm():
    # LoRA on every projection: the named residuals must be the whole (base + adapter) output.
    cfg = M.tiny(sliding_window=5, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 32)))
    params = _unbox(jax.jit(M.MistralLM(cfg).init)(jax.random.key(1), ids)["params"])
    # Nonzero adapters (B starts at zero) so that LoRA changes the gradients.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params
    )
    return cfg, ids, params


def _max_diff(a, b):
    return max(
        float(jnp.abs(x - y).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_every_policy_same_loss_and_gradients_mistral(tiny_lm):
    cfg, ids, params = tiny_lm
    ref_loss, ref_grad = jax.jit(jax.value_and_grad(_mistral_loss(cfg, ids)))(params)
    for name in remat.REMAT_POLICIES[1:]:
        loss_fn = _mistral_loss(dataclasses.replace(cfg, remat_policy=name), ids)
        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(params)
        diff = _max_diff(grad, ref_grad)
        print(
            f"{name}: |loss - none| {abs(float(loss - ref_loss)):.1e}, max |grad - none| {diff:.1e}"
        )
        assert abs(float(loss - ref_loss)) < 1e-6 and diff < 1e-6, name


def test_every_policy_same_gradients_clip():
    cfg = clip.tiny()
    x = jax.random.normal(jax.random.key(2), (2, cfg.image_size, cfg.image_size, 3))
    params = _unbox(jax.jit(clip.CLIPVisionTower(cfg).init)(jax.random.key(0), x))

    def grad(c):
        loss = lambda p: jnp.mean(clip.CLIPVisionTower(c).apply(p, x).last_hidden_state ** 2)
        return jax.jit(jax.grad(loss))(params)

    ref = grad(cfg)
    for name in remat.REMAT_POLICIES[1:]:
        diff = _max_diff(grad(cfg.replace(remat=name)), ref)
        print(f"CLIP {name}: max |grad - none| {diff:.1e}")
        assert diff < 1e-6, name


def residual_bytes(fn, *args) -> tuple[int, int]:
    """(device, host) bytes of the activations ``fn``'s backward pass keeps (arguments,
    i.e. the parameters, excluded), from ``jax.ad_checkpoint.print_saved_residuals``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(fn, *args)
    device = host = 0
    for line in out.getvalue().splitlines():
        m = re.match(r"(\w+)(<host>)?\[([\d,]*)\] (.*)", line)
        if not m or m.group(4).startswith("from the argument"):
            continue
        size = _ITEMSIZE[m.group(1)] * int(np.prod([int(d) for d in m.group(3).split(",") if d]))
        if m.group(2):
            host += size
        else:
            device += size
    return device, host


def test_named_policies_save_between_none_and_full():
    """``save_qkvo_mlp`` keeps fewer activations than ``none`` and recomputes less than
    ``full``; ``offload_qkvo_mlp`` keeps the same ones on the host, ``full``'s on device."""
    cfg = M.tiny(sliding_window=5)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 32)))
    params = _unbox(jax.jit(M.MistralLM(cfg).init)(jax.random.key(1), ids)["params"])
    rows = {}
    for name in remat.REMAT_POLICIES:
        loss = _mistral_loss(dataclasses.replace(cfg, remat_policy=name), ids)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        device, host = residual_bytes(loss, params)
        rows[name] = dict(
            device=device,
            host=host,
            temp=compiled.memory_analysis().temp_size_in_bytes,
            flops=cost["flops"],
        )
        print(name, rows[name])
    none, full, named = rows["none"], rows["full"], rows["save_qkvo_mlp"]
    assert none["device"] > named["device"] > full["device"]
    assert none["temp"] > named["temp"]
    assert full["flops"] > named["flops"] > none["flops"]  # full recomputes the most
    assert rows["save_qkv"]["device"] < rows["save_qkvo"]["device"] < named["device"]
    offload = rows["offload_qkvo_mlp"]
    assert offload["device"] == full["device"]
    assert offload["host"] == named["device"] - full["device"]


def test_unknown_policy_names_the_field_and_the_choices():
    with pytest.raises(ValueError, match="remat_policy='sometimes' is not one of none, full"):
        M.tiny(remat_policy="sometimes")
    c = stage0.get_config("demo")
    c.model.remat_policy = "sometimes"
    with pytest.raises(
        config_lib.ConfigError, match=r"config\.model\.remat_policy='sometimes'.*save_qkvo_mlp"
    ):
        config_lib.build_model_config(c.model)
    assert memory_plan.REMAT_POLICIES is remat.REMAT_POLICIES


def test_offload_refused_without_host_memory(monkeypatch):
    c = stage0.get_config("demo")
    c.model.remat_policy = "offload_qkvo_mlp"
    print("pinned_host on this backend:", remat.host_offload_supported())
    if remat.host_offload_supported():
        config_lib.check_backend(c.model)  # XLA:CPU has a pinned_host memory space
    monkeypatch.setattr(remat, "host_offload_supported", lambda device=None: False)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.model\.remat_policy='offload_qkvo_mlp'.*use 'save_qkvo_mlp'",
    ):
        config_lib.check_backend(c.model)
