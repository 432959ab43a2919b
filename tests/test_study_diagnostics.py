"""The study's diagnostics: the linear probe, the mapping distances and the exo-view model
on known values (the end-to-end run on a finished study is in tests/test_study.py)."""

from pathlib import Path

import jax
import numpy as np
import pytest

from exo2ego_jax.demo import held_out_views as views
from exo2ego_jax.demo import study_diagnostics as diag
from exo2ego_jax.models import exo2ego


def _takes(num_takes: int, clips_per_take: int) -> list[str]:
    return [f"take{t}" for t in range(num_takes) for _ in range(clips_per_take)]


def test_probe_finds_a_linear_concept_and_nothing_in_constant_features():
    rng = np.random.default_rng(0)
    takes = _takes(8, 3)
    labels = [int(t[-1]) % 2 == 0 for t in takes]  # 4 positive takes, 4 negative
    signal = np.where(labels, 1.0, -1.0)[:, None]
    feats = np.concatenate([signal + 0.1 * rng.normal(size=(24, 1)), rng.normal(size=(24, 4))], 1)
    assert diag.probe_accuracy(feats, labels, takes) == pytest.approx(100.0)
    # No information: every prediction is the same class, one class right, one wrong.
    assert diag.probe_accuracy(np.ones((24, 5)), labels, takes) == pytest.approx(50.0)
    # Five folds need five takes of each class.
    assert diag.probe_accuracy(feats, labels, takes, folds=5) is None  # 4 takes per class


def test_probe_never_splits_a_take_between_training_and_testing():
    # A feature that identifies each take (and so its label) but carries no concept: a
    # probe that saw a clip of the test take would score 100.
    takes = _takes(8, 3)
    labels = [int(t[-1]) % 2 == 0 for t in takes]
    ident = np.eye(8)[[int(t[-1]) for t in takes]]
    assert diag.probe_accuracy(ident, labels, takes) == pytest.approx(50.0)


def test_probe_takes_a_label_per_clip_and_folds_by_take():
    # Labels that change within a take (only its middle clip is positive in even takes):
    # a feature that carries the clip's label is read perfectly, one that carries the take's
    # ("on the table") is not, and a take is still never split.
    takes = _takes(8, 3)
    labels = [int(t[-1]) % 2 == 0 and i % 3 == 1 for i, t in enumerate(takes)]
    clip_signal = np.where(labels, 1.0, -1.0)[:, None]
    assert diag.probe_accuracy(clip_signal, labels, takes) == pytest.approx(100.0)
    take_signal = np.asarray([[1.0 if int(t[-1]) % 2 == 0 else -1.0] for t in takes])
    # Least squares on the take's sign predicts the mean target of its clips, -1/3 in a
    # positive take: every clip is called negative (tpr 0, tnr 1).
    assert diag.probe_accuracy(take_signal, labels, takes) == pytest.approx(50.0)
    ident = np.eye(8)[[int(t[-1]) for t in takes]]
    assert diag.probe_accuracy(ident, labels, takes) <= 50.0


def test_probes_report_both_label_kinds():
    takes = _takes(8, 3)
    clips = [
        views.StepClip(
            take=t,
            group="seen",
            ego=Path("e"),
            exo=Path("x"),
            start=0.0,
            end=1.0,
            labels={"purple": int(t[-1]) % 2 == 0},
            step_labels={"purple": int(t[-1]) % 2 == 0 and i % 3 == 1},
        )
        for i, t in enumerate(takes)
    ]
    table = np.where([c.labels["purple"] for c in clips], 1.0, -1.0)[:, None, None]
    got = diag.probes({"y": np.repeat(table, 2, axis=1)}, clips)
    assert got["purple (on the table)"]["y"] == pytest.approx(100.0)
    assert got["purple (acted on)"]["y"] == pytest.approx(50.0)  # as above: the take's only


def test_mapping_distances_on_known_arrays():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(2, 6, 4, 3)).astype(np.float32)
    takes = _takes(3, 2)
    got = diag.mapping_distances({"x": x, "fx": y.copy(), "y": y}, takes)
    assert got["rel_l2"]["F(x) vs y"] == 0.0
    assert got["kl"]["F(x) vs y"] == pytest.approx(0.0, abs=1e-6)

    def rel(a, b):
        return np.mean([np.linalg.norm(a[i] - b[i]) / np.linalg.norm(b[i]) for i in range(6)])

    def kl(p_logits, q_logits):
        p = np.exp(p_logits) / np.exp(p_logits).sum(-1, keepdims=True)
        q = np.exp(q_logits) / np.exp(q_logits).sum(-1, keepdims=True)
        return np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))

    assert got["rel_l2"]["x vs y"] == pytest.approx(rel(x, y), rel=1e-5)
    assert got["kl"]["x vs y"] == pytest.approx(kl(y, x), rel=1e-5)
    other = y[[3, 4, 5, 0, 1, 2]]  # rolled by half: every clip meets another take's y
    assert got["rel_l2"]["F(x) vs another take's y"] == pytest.approx(rel(y, other), rel=1e-5)
    assert got["rel_l2"]["another take's y vs y"] == pytest.approx(rel(other, y), rel=1e-5)
    assert got["kl"]["another take's y vs y"] == pytest.approx(kl(y, other), rel=1e-5)
    # Scale: a token's norm, and how far each clip is from the mean clip.
    tokens = [np.linalg.norm(y[i, s]) for i in range(6) for s in range(4)]
    assert got["token_norm"]["y"] == pytest.approx(np.mean(tokens), rel=1e-5)
    mean_clip = np.broadcast_to(x.mean(0), x.shape)
    assert got["spread"]["x"] == pytest.approx(rel(x, mean_clip), rel=1e-5)
    # A constant map: F(x) the same for every clip.
    const = diag.mapping_distances({"x": x, "fx": np.broadcast_to(y[0], y.shape), "y": y}, takes)
    assert const["spread"]["F(x)"] == pytest.approx(0.0, abs=1e-6)


def test_other_take_order_never_pairs_a_clip_with_its_own_take():
    takes = ["a", "a", "a", "a", "b", "c"]
    order = diag.other_take_order(takes)
    assert all(takes[j] != takes[i] for i, j in enumerate(order))
    with pytest.raises(ValueError, match="one take"):
        diag.other_take_order(["a", "a"])


def test_exo_view_model_puts_the_exo_encoders_tokens_in_the_prompt():
    model = exo2ego.Exo2Ego(exo2ego.tiny())
    params = model.init(jax.random.key(0))
    cfg = model.config
    frames = jax.random.normal(jax.random.key(1), (2, cfg.num_frames, 32, 32, 3))
    trained = diag.Trained(model, params, None, None, None)
    view = diag.exo_view(trained).model
    visual, _, _ = view.ego_visual_tokens(params, frames)
    np.testing.assert_array_equal(visual, model.encode_exo(params, frames))
    assert not np.allclose(visual, model.encode_ego(params, frames))
    assert view.config.visual_tokens_in_prompt == cfg.tokens_per_clip


def test_report_leaves_a_row_the_study_has_not_scored_empty():
    # On the validation split the study's own ego-view scores are absent: "n/a", not a crash.
    distances = {
        "rel_l2": {"F(x) vs y": 0.25},
        "kl": {"F(x) vs y": 0.5},
        "token_norm": {"x": 0.9, "y": 12.0},
        "spread": {"x": 0.4, "y": 0.15},
    }
    seed = {
        "mapping": {"final": {"val": distances, "pairs": distances}},
        "probe": {"purple": {"y": 60.0, "x": None}},
        "stage2_losses": {"kl": {"first": 1.0, "last": 0.1}},
        "egobench": {
            "full (final), ego view": {},
            "baseline, ego view": {"all": {"Average": 30.0}},
        },
    }
    md = diag.markdown({"split": "val", "clips": {"val": 3, "pairs": 4}, "camera": "cam01",
                        "seeds": {"0": seed}})  # fmt: skip
    assert "| final | F(x) vs y | 0.250 | 0.500 | 0.250 | 0.500 |" in md
    assert "| final | y | 12.000 | 0.150 |" in md
    assert "| purple | 60.0 | n/a |" in md
    assert "| full (final), ego view | n/a | n/a | n/a |" in md
    assert "| baseline, ego view | 30.0 | n/a | n/a |" in md
    assert "seed 0: full (final), ego view —, baseline, ego view 30.0" in md
