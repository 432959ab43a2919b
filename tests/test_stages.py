"""Stage definitions: trainable subsets, gradient isolation, loss composition, and learning."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from exo2ego_jax import stages
from exo2ego_jax.models import exo2ego
from exo2ego_jax.models.lora import LoRAConfig

SENTINEL = -201
LORA = LoRAConfig(rank=4, alpha=8, dropout=0.0)


def _caption(rng, b, length=12, vocab=256):
    ids = rng.integers(3, vocab, (b, length)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1] = SENTINEL
    mask = np.ones((b, length), np.int32)
    mask[1, -3:] = 0  # a right-padded row
    ids[1, -3:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    return dict(input_ids=ids, labels=labels, attention_mask=mask)


@pytest.fixture(scope="module")
def setup():
    cfg = exo2ego.with_lora(exo2ego.tiny(), LORA)
    model = exo2ego.Exo2Ego(cfg)
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    shape = (2, cfg.num_frames, 32, 32, 3)
    ego = rng.normal(size=shape).astype(np.float32)
    exo = rng.normal(size=shape).astype(np.float32)
    cap = _caption(rng, 2)
    batch = {
        "ego_caption": dict(frames=ego, **cap),
        "exo_caption": dict(frames=exo, **_caption(rng, 2)),
        "pair": dict(ego_frames=ego, exo_frames=exo, **cap),
        "instruct": dict(frames=ego, **_caption(rng, 2)),
    }
    return model, params, jax.tree.map(jnp.asarray, batch)


EXPECTED_TOP = {
    0: {"ego_encoder/connector", "exo_encoder/connector"},
    1: {"exo_encoder/connector"},
    2: {"ego_encoder/connector", "F", "G"},
    3: {"ego_encoder/connector", "F", "llm"},
}


def _groups(paths):
    out = set()
    for p in paths:
        parts = p.split("/")
        out.add("/".join(parts[:2]) if parts[0].endswith("_encoder") else parts[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_learns_and_touches_only_its_subtree(setup, stage):
    model, params, batch = setup
    st = stages.StageConfig(stage=stage, train_clip=False)
    patterns = stages.trainable_patterns(st, model)
    paths = stages.trainable_paths(params, patterns)
    assert _groups(paths) == EXPECTED_TOP[stage]
    if stage == 3:  # only the adapters of the LLM
        assert all(p.endswith(("lora_a", "lora_b")) for p in paths if p.startswith("llm/"))
    trainable, frozen = stages.split_params(params, patterns)
    flat_t = traverse_util.flatten_dict(trainable, sep="/")
    assert sorted(flat_t) == paths

    if stage == 3:
        # LoRA B = 0: the first forward equals the plain frozen LLM's.
        base_model = exo2ego.Exo2Ego(exo2ego.with_lora(model.config, None))
        base = traverse_util.flatten_dict(params, sep="/")
        base = {k: v for k, v in base.items() if not k.endswith(("lora_a", "lora_b"))}
        base = traverse_util.unflatten_dict(base, sep="/")
        b = batch["instruct"]
        args = (b["frames"], b["input_ids"], b["attention_mask"])
        np.testing.assert_array_equal(
            np.asarray(model(params, *args)[0]), np.asarray(base_model(base, *args)[0])
        )

    # The gradient tree has exactly the trainable leaves.
    sub = {k: batch[k] for k in st.batches}
    grads = jax.grad(lambda t: stages.stage_loss(model, st, t, frozen, sub)[0])(trainable)
    assert sorted(traverse_util.flatten_dict(grads, sep="/")) == paths

    opt = optax.adam(1e-2)
    step = jax.jit(stages.make_train_step(model, st, opt))
    opt_state = opt.init(trainable)
    losses = []
    for _ in range(100):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, sub)
        losses.append(float(metrics["loss"]))
    print(
        f"stage {stage}: loss {losses[0]:.4f} -> {losses[-1]:.4f}",
        {k: float(v) for k, v in metrics.items() if k in ("vtg", "kl", "ccl")},
    )
    assert np.isfinite(losses).all()
    assert losses[-1] <= 0.5 * losses[0]
    # Frozen leaves are bitwise identical afterwards; every trainable leaf group moved.
    after = traverse_util.flatten_dict(stages.merge_params(trainable, frozen), sep="/")
    before = traverse_util.flatten_dict(params, sep="/")
    for k, v in before.items():
        if k not in flat_t:
            np.testing.assert_array_equal(np.asarray(after[k]), np.asarray(v), err_msg=k)
    moved = {k for k in flat_t if not np.array_equal(np.asarray(after[k]), np.asarray(before[k]))}
    assert _groups(moved) == EXPECTED_TOP[stage]


def _np(a):
    return np.asarray(a, np.float64)


def _nll_by_hand(logits, labels):
    """Mean next-token NLL over supervised tokens, float64 numpy: logits[:, t] scores
    labels[:, t + 1]; -100 is not supervised."""
    z, y = _np(logits)[:, :-1], np.asarray(labels)[:, 1:]
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    rows, cols = np.nonzero(y != -100)
    return -logp[rows, cols, y[rows, cols]].mean()


def _vtg_by_hand(model, params, visual, b):
    """The caption loss of ``visual`` tokens spliced into ``b``'s text, NLL in numpy."""
    embeds, mask, labels = model.embed_multimodal(
        params, b["input_ids"], visual, b["attention_mask"], b["labels"]
    )
    return _nll_by_hand(model.lm_logits(params, embeds, mask), labels)


def _kl_by_hand(y, fx):
    """mean over tokens of KL(softmax(y) || softmax(F(x))) over channels, float64."""

    def log_softmax(a):
        a = _np(a) - _np(a).max(-1, keepdims=True)
        return a - np.log(np.exp(a).sum(-1, keepdims=True))

    lp, lq = log_softmax(y), log_softmax(fx)
    return (np.exp(lp) * (lp - lq)).sum(-1).mean()


@pytest.fixture(scope="module")
def stage2_terms(setup):
    """Stage 2's terms assembled in the test from the model's parts (E_ego on the ego frames,
    E_exo on the exo frames, F, G) with NLL, KL and L1 written in numpy."""
    model, params, batch = setup
    b = batch["pair"]
    x = model.encode_ego(params, b["ego_frames"])
    y = model.encode_exo(params, b["exo_frames"])
    fx = model.map_ego_to_exo(params, x)
    gfx = model.map_exo_to_ego(params, fx)
    fgy = model.map_ego_to_exo(params, model.map_exo_to_ego(params, y))
    visual = jnp.concatenate([x, fx], axis=1)  # concat_seq: [x ; F(x)]
    return {
        "vtg": _vtg_by_hand(model, params, visual, b),
        "kl": _kl_by_hand(y, fx),
        "ccl_fwd": np.abs(_np(gfx) - _np(x)).mean(),
        "ccl_bwd": np.abs(_np(fgy) - _np(y)).mean(),
    }


def test_stage2_loss_terms_against_an_independent_assembly(setup, stage2_terms):
    model, params, batch = setup
    sub = {"pair": batch["pair"]}
    ref = stage2_terms

    def run(**kw):
        st = stages.StageConfig(stage=2, **kw)
        t, f = stages.split_params(params, stages.trainable_patterns(st, model))
        return stages.stage_loss(model, st, t, f, sub)

    # The terms are far apart, so a swapped or dropped term cannot match by accident.
    print({k: float(v) for k, v in ref.items()})
    assert min(abs(ref[a] - ref[b]) for a in ref for b in ref if a < b) > 1e-3
    total, m = run(lambda_vtg=0.7, lambda_kl=0.5, lambda_ccl=2.0)
    ccl = ref["ccl_fwd"] + ref["ccl_bwd"]
    np.testing.assert_allclose(float(m["vtg"]), ref["vtg"], rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), ref["kl"], rtol=1e-5)
    np.testing.assert_allclose(float(m["ccl"]), ccl, rtol=1e-5)
    want = 0.7 * ref["vtg"] + 0.5 * ref["kl"] + 2.0 * ccl
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    # Ablations: the terms left out are absent from the total.
    total, no_kl = run(use_kl=False)
    assert "kl" not in no_kl
    np.testing.assert_allclose(float(total), ref["vtg"] + ccl, rtol=1e-5)
    total, no_ccl = run(use_ccl=False)
    assert "ccl" not in no_ccl
    np.testing.assert_allclose(float(total), ref["vtg"] + ref["kl"], rtol=1e-5)
    st = stages.StageConfig(stage=2, use_ccl=False)
    assert "G" not in _groups(stages.trainable_paths(params, stages.trainable_patterns(st, model)))
    total, fwd = run(ccl_forward_only=True)
    np.testing.assert_allclose(float(fwd["ccl"]), ref["ccl_fwd"], rtol=1e-5)
    np.testing.assert_allclose(float(total), ref["vtg"] + ref["kl"] + ref["ccl_fwd"], rtol=1e-5)
    # No-LoRA ablation of stage 3 leaves the LLM frozen.
    st3 = stages.StageConfig(stage=3, train_lora=False)
    assert "llm" not in _groups(
        stages.trainable_paths(params, stages.trainable_patterns(st3, model))
    )


def test_stage0_and_stage3_losses_against_an_independent_assembly(setup):
    """Stage 0: VTG of each caption batch through its own encoder (ego frames -> E_ego, exo
    -> E_exo); stage 3: VTG of [E_ego(x) ; F(E_ego(x))] on the instruction batch."""
    model, params, batch = setup
    ego = _vtg_by_hand(
        model,
        params,
        model.encode_ego(params, batch["ego_caption"]["frames"]),
        batch["ego_caption"],
    )
    exo = _vtg_by_hand(
        model,
        params,
        model.encode_exo(params, batch["exo_caption"]["frames"]),
        batch["exo_caption"],
    )
    # Through the wrong encoder the numbers differ, so the check below can tell.
    wrong = _vtg_by_hand(
        model,
        params,
        model.encode_exo(params, batch["ego_caption"]["frames"]),
        batch["ego_caption"],
    )
    assert abs(wrong - ego) > 1e-4
    st = stages.StageConfig(stage=0)
    t, f = stages.split_params(params, stages.trainable_patterns(st, model))
    total, m = stages.stage_loss(model, st, t, f, batch)
    np.testing.assert_allclose(float(m["vtg_ego"]), ego, rtol=1e-5)
    np.testing.assert_allclose(float(m["vtg_exo"]), exo, rtol=1e-5)
    np.testing.assert_allclose(float(total), ego + exo, rtol=1e-5)

    b = batch["instruct"]
    x = model.encode_ego(params, b["frames"])
    want = _vtg_by_hand(model, params, jnp.concatenate([x, model.map_ego_to_exo(params, x)], 1), b)
    st = stages.StageConfig(stage=3)
    t, f = stages.split_params(params, stages.trainable_patterns(st, model))
    total, m = stages.stage_loss(model, st, t, f, batch)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    np.testing.assert_allclose(float(m["vtg"]), want, rtol=1e-5)


def test_bad_stage_fields_are_named():
    with pytest.raises(ValueError, match="StageConfig.stage="):
        stages.StageConfig(stage=4)
    with pytest.raises(ValueError, match="stage0_encoders"):
        stages.StageConfig(stage=0, stage0_encoders=("ego", "third"))
    baseline = exo2ego.Exo2Ego(exo2ego.tiny(with_exo=False, with_mapping=False, fusion="x_only"))
    with pytest.raises(ValueError, match="stage 1 trains E_exo"):
        stages.trainable_patterns(stages.StageConfig(stage=1), baseline)
    no_lora = exo2ego.Exo2Ego(exo2ego.tiny())
    with pytest.raises(ValueError, match="train_lora=False"):
        stages.trainable_patterns(stages.StageConfig(stage=3), no_lora)


def test_paper_size_parameter_table():
    """Totals and trainable counts per stage at paper size, from abstract shapes only."""
    cfg = exo2ego.with_lora(exo2ego.paper(), LoRAConfig(rank=128, alpha=256, dropout=0.1))
    model = exo2ego.Exo2Ego(cfg)
    rows = stages.param_table(model, [stages.StageConfig(stage=s) for s in stages.STAGES])
    clip, stc, llm, lora = 303_507_456, 489_188_608, 7_241_732_096, 335_544_320
    mapping = 284_451_328
    total = 2 * (clip + stc) + 2 * mapping + llm + lora
    expected = {
        "stage 0": 2 * stc,
        "stage 1": stc,
        "stage 2": stc + 2 * mapping,
        "stage 3": lora + stc + mapping,
    }
    print("\n| stage | total params | trainable params |\n|---|---:|---:|")
    for name, tot, n in rows:
        print(f"| {name} | {tot:,} | {n:,} |")
        assert tot == total
        assert n == expected[name], name
    # With trainable CLIP towers stage 3 also trains the ego tower.
    rows = stages.param_table(model, [stages.StageConfig(stage=3, train_clip=True)])
    assert rows[0][2] == lora + stc + mapping + clip
    # The paper's no-LoRA ablation trains no LLM weight.
    nolora = dataclasses.replace(stages.StageConfig(stage=3), train_lora=False)
    assert stages.param_table(model, [nolora])[0][2] == stc + mapping


def test_visual_tokens_are_what_each_stage_splices(setup):
    """stages.visual_tokens (the memory plan's sequence length) against the tokens the stage
    losses actually splice: one clip's for the caption stages, the fusion's for 2 and 3."""
    model, params, batch = setup
    one_clip = model.encode_ego(params, batch["ego_caption"]["frames"]).shape[1]
    fused, _, _ = model.ego_visual_tokens(params, batch["instruct"]["frames"], "concat_seq")
    assert fused.shape[1] == 2 * one_clip
    for s, expected in ((0, one_clip), (1, one_clip), (2, 2 * one_clip), (3, 2 * one_clip)):
        assert stages.visual_tokens(stages.StageConfig(stage=s), model) == expected, s
    x_only = stages.StageConfig(stage=3, fusion="x_only")
    assert stages.visual_tokens(x_only, model) == one_clip
