"""The assembled Exo2Ego model: splicing, fusion, forward, generation and paper-size shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exo2ego_jax.models import exo2ego
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.splice import IGNORE_INDEX, splice_batch

SENTINEL = -201


def _reference_splice(ids, emb, vis, mask, labels):
    """Row-by-row python splice (the obvious way) for comparison."""
    out_e, out_m, out_l = [], [], []
    for i in range(ids.shape[0]):
        p = int(np.where(ids[i] == SENTINEL)[0][0])
        n = vis.shape[1]
        out_e.append(np.concatenate([emb[i, :p], vis[i], emb[i, p + 1 :]]))
        out_m.append(np.concatenate([mask[i, :p], np.ones(n, mask.dtype), mask[i, p + 1 :]]))
        out_l.append(np.concatenate([labels[i, :p], np.full(n, IGNORE_INDEX), labels[i, p + 1 :]]))
    return np.stack(out_e), np.stack(out_m), np.stack(out_l)


def test_splice_matches_row_by_row_reference():
    rng = np.random.default_rng(0)
    b, length, n, d = 4, 9, 5, 3
    lengths = np.array([9, 6, 3, 7])
    ids = rng.integers(3, 50, (b, length))
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    for i, p in enumerate([0, 3, 2, 6]):
        ids[i, p] = SENTINEL
    ids = np.where(mask == 1, ids, 0)
    labels = np.where(mask == 1, ids, IGNORE_INDEX)
    labels[ids == SENTINEL] = IGNORE_INDEX
    emb = rng.normal(size=(b, length, d)).astype(np.float32)
    vis = rng.normal(size=(b, n, d)).astype(np.float32)
    got = jax.jit(splice_batch, static_argnums=5)(
        jnp.asarray(ids),
        jnp.asarray(emb),
        jnp.asarray(vis),
        jnp.asarray(mask),
        jnp.asarray(labels),
        SENTINEL,
    )
    want = _reference_splice(ids, emb, vis, mask, labels)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), w)
    # Right padding stays at the right: each row's mask is ones then zeros.
    m = np.asarray(got[1])
    assert (np.diff(m, axis=1) <= 0).all() and (m.sum(1) == lengths + n - 1).all()


@pytest.fixture(scope="module")
def tiny():
    cfg = exo2ego.tiny()
    model = exo2ego.Exo2Ego(cfg)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(2, cfg.num_frames, 32, 32, 3)).astype(np.float32)
    ids = np.array([[1, 5, SENTINEL, 7, 8, 0], [1, SENTINEL, 9, 10, 11, 12]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 0], [1] * 6], np.int32)
    return model, params, jnp.asarray(frames), jnp.asarray(ids), jnp.asarray(mask)


def test_forward_equals_llm_on_hand_built_sequence(tiny):
    model, params, frames, ids, mask = tiny
    cfg = model.config
    logits, labels = jax.jit(model.__call__)(params, frames, ids, mask, ids)
    s = cfg.tokens_per_clip
    assert logits.shape == (2, 6 + 2 * s - 1, cfg.llm.vocab_size)
    # Build [text_before ; x ; F(x) ; text_after] by hand and run the LLM directly (jitted
    # too, so both sides see the same XLA numerics).
    places = [int(np.where(np.asarray(ids[i]) == SENTINEL)[0][0]) for i in range(2)]

    @jax.jit
    def by_hand(params, frames, ids, mask):
        x = model.encode_ego(params, frames)
        fx = model.map_ego_to_exo(params, x)
        emb = model.llm.apply({"params": params["llm"]}, jnp.where(ids < 0, 0, ids), method="embed")
        rows, masks = [], []
        for i, p in enumerate(places):
            rows.append(jnp.concatenate([emb[i, :p], x[i], fx[i], emb[i, p + 1 :]]))
            ones = jnp.ones(2 * s, mask.dtype)
            masks.append(jnp.concatenate([mask[i, :p], ones, mask[i, p + 1 :]]))
        logits = model.llm.apply(
            {"params": params["llm"]},
            inputs_embeds=jnp.stack(rows),
            attention_mask=jnp.stack(masks),
        ).logits
        return x, fx, logits, jnp.stack(masks)

    x, fx, ref, masks = by_hand(params, frames, ids, mask)
    assert x.shape == fx.shape == (2, s, cfg.llm.hidden_size)
    valid = np.asarray(masks).astype(bool)
    np.testing.assert_allclose(
        np.asarray(logits)[valid], np.asarray(ref)[valid], atol=1e-4, rtol=1e-4
    )
    assert (np.asarray(labels)[0, 2 : 2 + 2 * s] == IGNORE_INDEX).all()
    assert (np.asarray(labels)[1, 1 : 1 + 2 * s] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(np.asarray(labels)[1, 2 * s + 1 :], np.asarray(ids)[1, 2:])


@pytest.mark.parametrize("fusion, factor", [("x_only", 1), ("fx_only", 1), ("concat_seq", 2)])
def test_fusion_variants(tiny, fusion, factor):
    model, params, frames, _, _ = tiny
    visual, x, fx = model.ego_visual_tokens(params, frames, fusion)
    assert visual.shape[1] == factor * model.config.tokens_per_clip
    if fusion == "x_only":
        assert fx is None
        np.testing.assert_array_equal(np.asarray(visual), np.asarray(x))
    elif fusion == "fx_only":
        np.testing.assert_array_equal(np.asarray(visual), np.asarray(fx))


def test_generate_first_token_is_forward_argmax(tiny):
    model, params, frames, ids, mask = tiny
    out = model.generate(params, frames, ids, mask, max_new_tokens=4)
    logits, _ = model(params, frames, ids, mask)
    s = model.config.visual_tokens_in_prompt
    last = np.asarray(mask).sum(1) + s - 2  # index of the last real prompt token
    expect = np.argmax(np.asarray(logits)[np.arange(2), last], axis=-1)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, 0], expect)
    assert out.tokens.shape == (2, 4)


def test_baseline_without_exo_or_mapping():
    cfg = exo2ego.tiny(with_exo=False, with_mapping=False, fusion="x_only")
    model = exo2ego.Exo2Ego(cfg)
    abstract = model.abstract_params()
    assert sorted(abstract) == ["ego_encoder", "llm"]
    with pytest.raises(ValueError, match="needs F"):
        exo2ego.tiny(with_mapping=False)


def test_bad_widths_are_named():
    cfg = exo2ego.tiny()
    with pytest.raises(ValueError, match="connector.out_size"):
        dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, hidden_size=32))


# Component counts measured against transformers / the torch references in their own tests.
CLIP_L14_336 = 303_507_456
STC_PAPER = 489_188_608
MISTRAL_7B = 7_241_732_096
LORA_R128 = 335_544_320


def _resnet_generator_count(d, ngf, n_blocks):
    conv = lambda k, cin, cout: k * k * cin * cout + cout  # noqa: E731
    return (
        conv(7, d, ngf)
        + conv(3, ngf, 2 * ngf)
        + conv(3, 2 * ngf, 4 * ngf)
        + n_blocks * 2 * conv(3, 4 * ngf, 4 * ngf)
        + conv(3, 4 * ngf, 2 * ngf)
        + conv(3, 2 * ngf, ngf)
        + conv(7, ngf, d)
    )


def test_paper_size_shapes_without_allocation():
    cfg = exo2ego.with_lora(exo2ego.paper(), LoRAConfig(rank=128, alpha=256, dropout=0.1))
    model = exo2ego.Exo2Ego(cfg)
    abstract = model.abstract_params()
    count = lambda t: sum(int(x.size) for x in jax.tree.leaves(t))  # noqa: E731
    mapping = _resnet_generator_count(4096, 256, 9)
    assert count(abstract["ego_encoder"]["clip"]) == CLIP_L14_336
    assert count(abstract["exo_encoder"]["connector"]) == STC_PAPER
    assert count(abstract["F"]) == count(abstract["G"]) == mapping
    assert count(abstract["llm"]) == MISTRAL_7B + LORA_R128
    assert cfg.tokens_per_clip == 1521 and cfg.visual_tokens_in_prompt == 3042
    frames = jax.ShapeDtypeStruct((1, 16, 336, 336, 3), jnp.float32)
    x = jax.eval_shape(model.encode_ego, abstract, frames)
    assert x.shape == (1, 1521, 4096)
    assert jax.eval_shape(model.map_ego_to_exo, abstract, x).shape == (1, 1521, 4096)
