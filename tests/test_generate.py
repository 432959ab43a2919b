"""KV-cached decoding vs transformers' generate on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from hf_helpers import norm_weights_distinct, perturb_

from exo2ego_jax.models import mistral as M
from exo2ego_jax.models.decode import generate, generate_jit, sample_token
from exo2ego_jax.weights.hf_mistral import load_mistral

LENGTHS = (9, 4, 13)  # right-padded prompts of different lengths
N_NEW = 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
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
        sliding_window=8,  # prompt + generation (up to 33 tokens) runs well past the window
    )
    hf = transformers.MistralForCausalLM(config)
    perturb_(hf, seed=0)  # every norm weight != 1 and distinct per layer
    assert norm_weights_distinct(hf)
    hf.eval().save_pretrained(path)
    module, params = load_mistral(path)
    rs = np.random.RandomState(0)
    ids = np.zeros((len(LENGTHS), max(LENGTHS)), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(LENGTHS):
        ids[i, :n] = rs.randint(3, 128, n)
        mask[i, :n] = 1
    return hf, module, params, ids, mask


def hf_greedy(hf, prompt, n_new, eos=None):
    """HF generate on one unpadded prompt (HF's own right-padded batches are not correct)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor(prompt[None]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].numpy()


def test_greedy_matches_hf_generate(setup):
    hf, module, params, ids, mask = setup
    out = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    assert out.tokens.shape == (3, N_NEW) and out.tokens.dtype == jnp.int32
    np.testing.assert_array_equal(out.lengths, [N_NEW] * 3)
    for i, n in enumerate(LENGTHS):
        ref = hf_greedy(hf, ids[i, :n], N_NEW)
        print(f"row {i} (prompt {n}): ours {np.asarray(out.tokens[i]).tolist()}")
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), ref)


def test_one_compilation_for_repeated_calls(setup):
    _, module, params, ids, mask = setup
    generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    before = generate_jit._cache_size()
    a = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    b = generate(module, params, jnp.asarray(ids) + 1, jnp.asarray(mask), N_NEW)
    assert generate_jit._cache_size() == before
    # Sampling settings are traced values: changing them compiles once (greedy -> sampling)
    # and never again.
    generate(
        module,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        N_NEW,
        temperature=0.7,
        rng=jax.random.key(0),
    )
    after_sampling = generate_jit._cache_size()
    generate(
        module,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        N_NEW,
        temperature=1.3,
        top_p=0.5,
        rng=jax.random.key(1),
    )
    assert generate_jit._cache_size() == after_sampling == before + 1
    assert not np.array_equal(a.tokens, b.tokens)


def test_inputs_embeds_prefill_matches_ids(setup):
    _, module, params, ids, mask = setup
    embeds = module.apply({"params": params}, jnp.asarray(ids), method="embed")
    a = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    b = generate(
        module, params, inputs_embeds=embeds, attention_mask=jnp.asarray(mask), max_new_tokens=N_NEW
    )
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_eos_stops_rows_and_pads(setup):
    hf, module, params, ids, mask = setup
    free = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    # Use row 0's 6th greedy token as EOS: row 0 must stop there.
    eos = int(free.tokens[0, 5])
    out = generate(
        module,
        params,
        jnp.asarray(ids),
        jnp.asarray(mask),
        N_NEW,
        eos_token_id=eos,
        pad_token_id=127,
    )
    tokens = np.asarray(out.tokens)
    for i, n in enumerate(LENGTHS):
        ref = hf_greedy(hf, ids[i, :n], N_NEW, eos=eos)  # HF stops at EOS on its own
        k = int(out.lengths[i])
        assert k == len(ref), (i, k, ref)
        np.testing.assert_array_equal(tokens[i, :k], ref)
        assert (tokens[i, k:] == 127).all()
        if k < N_NEW:
            assert tokens[i, k - 1] == eos
    assert int(out.lengths[0]) <= 6


def test_sampling_reproducible_and_tiny_top_p_is_greedy(setup):
    _, module, params, ids, mask = setup
    args = (module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    s1 = generate(*args, temperature=1.0, rng=jax.random.key(3))
    s2 = generate(*args, temperature=1.0, rng=jax.random.key(3))
    s3 = generate(*args, temperature=1.0, rng=jax.random.key(4))
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    assert not np.array_equal(s1.tokens, s3.tokens)
    greedy = generate(*args)
    nucleus = generate(*args, temperature=1.0, top_p=1e-6, rng=jax.random.key(5))
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)
    with pytest.raises(ValueError, match="rng"):
        generate(*args, temperature=0.5)


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.75, greedy=False))(keys)[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4) / len(keys)
    print(f"top_p=0.75 frequencies: {counts.round(3).tolist()}")  # ~[0.625, 0.375, 0, 0]
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.05


def test_cache_decode_matches_full_forward():
    """Token-by-token cached logits == one full forward (random init, GQA, window)."""
    cfg = M.tiny(sliding_window=5)
    module = M.MistralLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    params = jax.jit(module.init)(jax.random.key(1), ids)
    full = jax.jit(lambda p, i: module.apply(p, i).logits)(params, ids)
    step = jax.jit(lambda p, tok, pos, c: module.apply(p, tok, positions=pos, cache=c))
    cache = M.init_cache(cfg, 2, 16)
    out = step(params, ids[:, :7], jnp.broadcast_to(jnp.arange(7), (2, 7)), cache)
    got = [out.logits]
    cache = out.cache
    for t in range(7, 12):
        out = step(params, ids[:, t : t + 1], jnp.full((2, 1), t), cache)
        cache = out.cache
        got.append(out.logits)
    diff = float(jnp.abs(jnp.concatenate(got, axis=1) - full).max())
    print(f"cached decode vs full forward: max diff = {diff:.3e}")
    assert diff < 1e-5
    assert cache.k.shape == (cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)


def test_unstacked_decoding_matches(setup):
    _, module, params, ids, mask = setup
    a = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW)
    b = generate(module, params, jnp.asarray(ids), jnp.asarray(mask), N_NEW, unstack_layers=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    unstacked = M.unstack_layers(params, module.config.num_layers)
    assert "layers" not in unstacked and unstacked["layers_1"]["mlp"]["up_proj"]["kernel"].ndim == 2


def test_the_engine_unstacks_layers_only_when_a_second_copy_is_cheap():
    from exo2ego_jax.models import decode

    assert decode.should_unstack(M.tiny())  # a few MB: unstacked once per generate call
    assert not decode.should_unstack(M.paper())  # 7B: never held twice
    assert not decode.should_unstack(M.tiny(scan_layers=False))  # nothing to unstack
