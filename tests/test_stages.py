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


def test_stage2_loss_is_weighted_sum_and_ablations(setup):
    model, params, batch = setup
    sub = {"pair": batch["pair"]}

    def run(**kw):
        st = stages.StageConfig(stage=2, **kw)
        t, f = stages.split_params(params, stages.trainable_patterns(st, model))
        return stages.stage_loss(model, st, t, f, sub)

    total, m = run(lambda_vtg=1.0, lambda_kl=0.5, lambda_ccl=2.0)
    np.testing.assert_allclose(total, m["vtg"] + 0.5 * m["kl"] + 2.0 * m["ccl"], rtol=1e-6)
    _, no_kl = run(use_kl=False)
    assert "kl" not in no_kl
    _, no_ccl = run(use_ccl=False)
    assert "ccl" not in no_ccl
    st = stages.StageConfig(stage=2, use_ccl=False)
    assert "G" not in _groups(stages.trainable_paths(params, stages.trainable_patterns(st, model)))
    _, fwd = run(ccl_forward_only=True)
    assert float(fwd["ccl"]) < float(m["ccl"])  # one of the two L1 terms
    # No-LoRA ablation of stage 3 leaves the LLM frozen.
    st3 = stages.StageConfig(stage=3, train_lora=False)
    assert "llm" not in _groups(
        stages.trainable_paths(params, stages.trainable_patterns(st3, model))
    )


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
