"""MistralLM vs transformers' MistralForCausalLM on the same random weights, HF I/O, sizes."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_helpers import norm_weights_distinct, perturb_, perturb_params, right_padded_batch

from exo2ego_jax.models import mistral as M
from exo2ego_jax.models.lora import LoRAConfig, lora_param_filter
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_mistral import load_mistral, param_mappings, save_mistral
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

TINY_HF = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per KV head
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # peakier logits than 0.02: fewer near-ties
    sliding_window=None,
)


def make_hf(tmp_path, seed=0, max_shard_size=None, **overrides):
    torch.manual_seed(seed)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**{**TINY_HF, **overrides}))
    perturb_(model, seed)  # every norm weight != 1 and distinct per layer
    assert norm_weights_distinct(model)
    model.eval()
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(tmp_path, **kwargs)
    return model


def logits_fn(module):
    """Jitted ``(params, ids, mask) -> logits``: one compile instead of op-by-op dispatch."""
    return jax.jit(
        lambda params, ids, mask: module.apply({"params": params}, ids, attention_mask=mask).logits
    )


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


CASES = {
    "gqa": dict(),
    "sliding_window": dict(sliding_window=5),  # shorter than the 16-token sequences
    "tied": dict(tie_word_embeddings=True),
    "sharded": dict(max_shard_size="40KB"),
    "mha_head_dim": dict(num_key_value_heads=4, head_dim=8),  # head_dim != hidden / heads
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_right_padded(tmp_path, case):
    kwargs = dict(CASES[case])
    hf = make_hf(tmp_path, **kwargs)
    if case == "sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    if case == "tied":
        assert "lm_head.weight" not in TensorSource(tmp_path)
    module, params = load_mistral(tmp_path)
    ids, mask = right_padded_batch([16, 11, 3], 16, TINY_HF["vocab_size"])
    ref = hf_logits(hf, ids, mask)
    ours = logits_fn(module)(params, jnp.asarray(ids), jnp.asarray(mask))
    valid = mask.astype(bool)
    diff = np.abs(np.asarray(ours) - ref)[valid].max()
    print(f"{case}: max |logits - HF| on non-pad positions = {diff:.3e}")
    assert diff < 1e-4


def test_unscanned_layers_and_remat_match_scanned(tmp_path):
    make_hf(tmp_path, sliding_window=6)
    ids, mask = right_padded_batch([12, 7], 12, TINY_HF["vocab_size"])
    base_mod, base_params = load_mistral(tmp_path)
    ref = logits_fn(base_mod)(base_params, jnp.asarray(ids), jnp.asarray(mask))
    for overrides in (
        dict(scan_layers=False),
        dict(remat_policy="full"),
        dict(remat_policy="dots"),
    ):
        mod, params = load_mistral(tmp_path, **overrides)
        if not mod.config.scan_layers:
            assert "layers_1" in params and "layers" not in params
        out = logits_fn(mod)(params, jnp.asarray(ids), jnp.asarray(mask))
        diff = float(jnp.abs(out - ref).max())
        print(f"{overrides}: max diff vs scanned = {diff:.3e}")
        assert diff < 1e-5


def test_remat_gradients_equal(tmp_path):
    cfg = M.tiny()
    ids = jnp.asarray(right_padded_batch([8, 5], 8, cfg.vocab_size)[0])
    params = jax.jit(M.MistralLM(cfg).init)(jax.random.key(1), ids)

    def grads(c):
        loss = lambda p: jnp.mean(M.MistralLM(c).apply(p, ids).logits ** 2)
        return jax.jit(jax.grad(loss))(params)

    g0 = grads(cfg)
    g1 = grads(dataclasses.replace(cfg, remat_policy="full"))
    diff = max(
        jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: jnp.abs(a - b).max(), g0, g1))
    )
    print(f"remat full vs none: max grad diff = {float(diff):.3e}")
    assert diff < 1e-6


def test_inputs_embeds_equals_ids(tmp_path):
    make_hf(tmp_path)
    module, params = load_mistral(tmp_path)
    v = {"params": params}
    ids, mask = right_padded_batch([10, 6], 10, TINY_HF["vocab_size"])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    embeds = module.apply(v, ids, method="embed")
    assert embeds.shape == (2, 10, TINY_HF["hidden_size"])
    np.testing.assert_array_equal(
        np.asarray(embeds), np.asarray(params["embed_tokens"]["embedding"])[ids]
    )
    a = jax.jit(lambda v, i, m: module.apply(v, i, attention_mask=m).logits)(v, ids, mask)
    b = jax.jit(lambda v, e, m: module.apply(v, inputs_embeds=e, attention_mask=m).logits)(
        v, embeds, mask
    )
    diff = float(jnp.abs(a - b).max())
    print(f"inputs_embeds vs ids: max diff = {diff:.3e}")
    assert diff == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        module.apply(v, ids, inputs_embeds=embeds)


def test_logits_index_and_logical_axes():
    cfg = M.tiny()
    module = M.MistralLM(cfg)
    ids = jnp.asarray(right_padded_batch([9, 4], 9, cfg.vocab_size)[0])
    variables = jax.jit(module.init)(jax.random.key(0), ids)
    full = jax.jit(lambda v, i: module.apply(v, i).logits)(variables, ids)
    idx = jnp.array([[8, 0], [3, 2]])
    part = jax.jit(lambda v, i, x: module.apply(v, i, logits_index=x).logits)(variables, ids, idx)
    np.testing.assert_allclose(part, jnp.take_along_axis(full, idx[:, :, None], axis=1), atol=1e-6)
    names = {
        "/".join(k.key for k in path): leaf.names
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            variables["params"], is_leaf=lambda x: hasattr(x, "names")
        )
    }
    assert names["embed_tokens/embedding"] == ("vocab", "embed")
    assert names["layers/self_attn/q_proj/kernel"] == ("layers", "embed", "heads")
    assert names["layers/self_attn/k_proj/kernel"] == ("layers", "embed", "kv_heads")
    assert names["layers/mlp/down_proj/kernel"] == ("layers", "mlp", "embed")
    assert names["layers/input_layernorm/scale"] == ("layers", "norm")
    assert names["lm_head/kernel"] == ("embed", "vocab")


@pytest.mark.parametrize("tied", [False, True])
def test_save_roundtrip_through_hf(tmp_path, tied):
    cfg = M.tiny(vocab_size=128, sliding_window=7, tie_word_embeddings=tied)
    module = M.MistralLM(cfg)
    ids, mask = right_padded_batch([12, 9], 12, cfg.vocab_size)
    params = jax.jit(module.init)(jax.random.key(3), jnp.asarray(ids))["params"]
    params = jax.tree_util.tree_map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        params,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )
    params = perturb_params(params, seed=3)  # norm scales != 1, distinct per layer
    save_mistral(module, params, tmp_path / "out", max_shard_bytes=60_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.sliding_window == 7 and hf.config.tie_word_embeddings == tied
    ours = logits_fn(module)(params, jnp.asarray(ids), jnp.asarray(mask))
    diff = np.abs(np.asarray(ours) - hf_logits(hf, ids, mask))[mask.astype(bool)].max()
    print(f"save_mistral -> HF (tied={tied}): max logits diff = {diff:.3e}")
    assert diff < 1e-4
    # And back: identical arrays.
    _, again = load_mistral(tmp_path / "out")
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_save_merges_lora(tmp_path):
    make_hf(tmp_path / "base")
    lora = LoRAConfig(rank=4, alpha=8.0, dropout=0.0)
    module, params = load_mistral(tmp_path / "base", lora=lora)
    # Nonzero B so that the merge actually changes the kernels.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if p[-1].key == "lora_b" else x, params
    )
    save_mistral(module, params, tmp_path / "merged")
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids, mask = right_padded_batch([10, 4], 10, TINY_HF["vocab_size"])
    ours = logits_fn(module)(params, jnp.asarray(ids), jnp.asarray(mask))
    diff = np.abs(np.asarray(ours) - hf_logits(hf, ids, mask))[mask.astype(bool)].max()
    print(f"unmerged LoRA (ours) vs merged LoRA saved to HF: max diff = {diff:.3e}")
    assert diff < 1e-4
    plain = dataclasses.replace(module.config, lora=None)
    with pytest.raises(CheckpointError, match="lora=None"):
        save_mistral(plain, params, tmp_path / "bad")


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_mistral(tmp_path / "nope")

    make_hf(tmp_path / "good")
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())

    bad_type = tmp_path / "llama"
    make_hf(bad_type)
    (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        load_mistral(bad_type)

    bad_arch = tmp_path / "arch"
    make_hf(bad_arch)
    (bad_arch / "config.json").write_text(
        json.dumps({**cfg, "architectures": ["MistralForSequenceClassification"]})
    )
    with pytest.raises(CheckpointError, match="architectures"):
        load_mistral(bad_arch)

    # A checkpoint whose k_proj of layer 1 has the wrong shape.
    index = TensorSource(tmp_path / "good")
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors = [
        (n, np.zeros((8, 64), np.float32) if n == name else index.get(n)) for n in index.names()
    ]
    write_safetensors(tmp_path / "shape", tensors, config=cfg)
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\[8, 64\].*\[32, 64\]"
    ):
        load_mistral(tmp_path / "shape")

    # A missing tensor.
    write_safetensors(
        tmp_path / "missing", [(n, index.get(n)) for n in index.names() if n != name], config=cfg
    )
    with pytest.raises(
        CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*not found"
    ):
        load_mistral(tmp_path / "missing")


def test_name_mapping_covers_every_hf_tensor(tmp_path):
    make_hf(tmp_path)
    hf_names = set(TensorSource(tmp_path).names())
    config = M.from_hf_config(json.loads((tmp_path / "config.json").read_text()))
    ours = {n for m in param_mappings(config) for n in m.hf_names}
    assert ours == hf_names
    unscanned = {
        n
        for m in param_mappings(dataclasses.replace(config, scan_layers=False))
        for n in m.hf_names
    }
    assert unscanned == hf_names


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_paper_preset_param_count():
    cfg = M.paper()
    assert (cfg.head_dim, cfg.num_groups, cfg.sliding_window) == (128, 4, None)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    abstract = jax.eval_shape(M.MistralLM(cfg).init, jax.random.key(0), ids)["params"]
    n = _count(abstract)
    print(f"Mistral-7B-Instruct-v0.2 parameters (eval_shape): {n:,}")
    assert n == 7_241_732_096

    # The same number from HF's own model on the meta device (no memory allocated).
    official = json.loads(json.dumps(M.to_hf_config(cfg)))
    with torch.device("meta"):
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**official))
    assert sum(p.numel() for p in hf.parameters()) == n

    lora_cfg = dataclasses.replace(cfg, lora=LoRAConfig(rank=128, alpha=256.0, dropout=0.1))
    abstract = jax.eval_shape(M.MistralLM(lora_cfg).init, jax.random.key(0), ids)["params"]
    adapters = [x for p, x in jax.tree_util.tree_leaves_with_path(abstract) if lora_param_filter(p)]
    n_lora = _count(adapters)
    print(
        f"LoRA r128 adapters on q,k,v,o,gate,up,down: {n_lora:,} ({len(adapters)} stacked leaves)"
    )
    assert n_lora == 335_544_320
    assert _count(abstract) == n + n_lora


def test_from_hf_config_legacy_rope_theta_and_errors():
    official_v02 = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "vocab_size": 32000,
    }
    cfg = M.from_hf_config(official_v02)
    assert cfg == M.paper(initializer_range=0.02)
    with pytest.raises(ValueError, match="rope_type"):
        M.from_hf_config({**official_v02, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act"):
        M.from_hf_config({**official_v02, "hidden_act": "gelu"})
