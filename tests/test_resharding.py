"""A stage checkpoint saved under one mesh restores exactly under another (and on one device).

Saved by the trainer's own code path (``checkpoints.StageCheckpointer`` with asynchronous
saving, ``param_meta``) from 8-way FSDP (mesh ``(1, 8, 1)``, preset ``fsdp``); restored
through both ways the trainer reads checkpoints: resuming (``StageCheckpointer.restore``:
trainable params + Adam state) and the stage hand-off (``restore_stage_params``), under 2×4
FSDP × TP (mesh ``(1, 2, 4)``, preset ``fsdp_tp``) and on a single device. Values must be
bit-identical and every array must carry the target sharding.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import traverse_util

from exo2ego_jax import sharding as sh
from exo2ego_jax import stages
from exo2ego_jax.models import exo2ego
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.training import checkpoints

MODEL = exo2ego.Exo2Ego(
    exo2ego.with_lora(exo2ego.tiny(), LoRAConfig(rank=8, alpha=16.0, dropout=0.0))
)
STAGE = stages.StageConfig(stage=3)  # trainable: E_ego connector, F, LoRA adapters
PATTERNS = stages.trainable_patterns(STAGE, MODEL)
OPT = optax.adamw(1e-2)
STEP = 7

TARGETS = {
    "fsdp_tp_2x4": lambda: (sh.make_mesh((1, 2, 4)), "fsdp_tp"),
    "one_device": lambda: (sh.make_mesh((1, 1, 1), devices=jax.devices()[:1]), "fsdp"),
}


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def abstract_state(mesh, rules):
    """``(trainable, frozen, opt_state)`` ShapeDtypeStructs carrying the target shardings,
    built the way the trainer derives them (param_shardings -> split -> optimizer)."""
    shardings = sh.param_shardings(MODEL, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        MODEL.abstract_params(),
        shardings,
    )
    trainable, frozen = stages.split_params(abstract, PATTERNS)
    t_shard = jax.tree.map(lambda a: a.sharding, trainable)
    o_shard = sh.optimizer_state_shardings(OPT, t_shard, trainable)
    opt = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(OPT.init, trainable),
        o_shard,
    )
    return trainable, frozen, opt


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A stage-3 checkpoint written from 8-way FSDP after one Adam update (non-zero moments)."""
    mesh, rules = sh.make_mesh((1, 8, 1)), sh.rules_for("fsdp")
    t_abs, _, _ = abstract_state(mesh, rules)
    # Random values placed shard by shard (``shard_init`` would compile the whole model's
    # initialiser, ~15 s on 2 cores, for nothing this test needs).
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(
        lambda a: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), a.sharding), t_abs
    )
    t_shard = jax.tree.map(lambda a: a.sharding, trainable)
    o_shard = sh.optimizer_state_shardings(OPT, t_shard, trainable)
    opt_state = jax.jit(OPT.init, out_shardings=o_shard)(trainable)

    @jax.jit
    def update(t, o):
        grads = jax.tree.map(lambda a: 0.5 * a + 0.01, t)  # any non-trivial gradient
        updates, o = OPT.update(grads, o, t)
        return optax.apply_updates(t, updates), o

    trainable, opt_state = jax.jit(update, out_shardings=(t_shard, o_shard))(trainable, opt_state)
    q = trainable["llm"]["layers"]["self_attn"]["q_proj"]["lora_a"]
    assert len({str(s.index) for s in q.addressable_shards}) == 8  # really 8 different shards

    workdir = tmp_path_factory.mktemp("stage3")
    ckpt = checkpoints.StageCheckpointer(workdir, keep=2, async_save=True)  # as the trainer
    meta = {
        "stage": 3,
        "model": checkpoints.dump_json(dataclasses.asdict(MODEL.config)),
        **checkpoints.param_meta(trainable),
        "finished": True,
    }
    assert ckpt.save(STEP, trainable, opt_state, meta, {"test": True}, force=True)
    ckpt.close()
    return {
        "workdir": workdir,
        "trainable": jax.device_get(trainable),
        "opt_state": jax.device_get(opt_state),
        "shardings": flat(t_shard),
    }


def assert_same(restored, saved_host, abstract, tag: str) -> None:
    got, want, target = (jax.tree.leaves_with_path(t) for t in (restored, saved_host, abstract))
    got, want, target = list(got), list(want), list(target)
    assert [p for p, _ in got] == [p for p, _ in want] == [p for p, _ in target], tag
    for (path, g), (_, w), (_, t) in zip(got, want, target, strict=True):
        name = f"{tag} {jax.tree_util.keystr(path)}"
        assert isinstance(g, jax.Array), name
        assert g.sharding == t.sharding, name
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert np.array_equal(np.asarray(g), np.asarray(w)), name


@pytest.mark.parametrize("target", list(TARGETS))
def test_resume_reshards_params_and_optimizer_state(saved, target):
    mesh, rules = TARGETS[target]()
    t_abs, _, o_abs = abstract_state(mesh, rules)
    ckpt = checkpoints.StageCheckpointer(saved["workdir"], async_save=False)
    step = ckpt.latest_step()
    assert step == STEP
    trainable, opt_state, meta = ckpt.restore(step, t_abs, o_abs)
    ckpt.close()
    assert meta["stage"] == 3 and meta["step"] == STEP
    assert_same(trainable, saved["trainable"], t_abs, f"{target} params")
    assert_same(opt_state, saved["opt_state"], o_abs, f"{target} opt_state")
    # The layout really changed (not restored in the saved layout by accident).
    k = "llm/layers/self_attn/q_proj/lora_b"
    assert flat(trainable)[k].sharding != saved["shardings"][k]
    if target == "one_device":
        assert all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(trainable))


@pytest.mark.parametrize("target", list(TARGETS))
def test_hand_off_reshards_into_the_full_tree(saved, target):
    mesh, rules = TARGETS[target]()
    t_abs, f_abs, _ = abstract_state(mesh, rules)
    full = stages.merge_params(t_abs, f_abs)
    params, paths = checkpoints.restore_stage_params(saved["workdir"], 3, full)
    assert sorted(paths) == sorted(flat(t_abs))
    restored, rest = stages.split_params(params, PATTERNS)
    assert_same(restored, saved["trainable"], t_abs, f"{target} hand-off")
    # Leaves the checkpoint does not hold are left exactly as given.
    assert all(a is b for a, b in zip(jax.tree.leaves(rest), jax.tree.leaves(f_abs), strict=True))
