"""EgoBench metrics against references: sklearn AP, hand-computed nDCG / mAP / ROUGE-L."""

import math

import numpy as np
import pytest

from exo2ego_jax.eval import metrics as M


@pytest.fixture(scope="module")
def sklearn_metrics():
    """scikit-learn's metrics (a dev dependency); only the tests that compare with it skip
    without it, the hand-computed ones below always run."""
    return pytest.importorskip("sklearn.metrics")


def test_accuracy_and_groups():
    assert M.accuracy([0, 2, -1, 3], [0, 1, 2, 3]) == 0.5
    groups = ["inter", "inter", "intra", "intra", "inter"]
    got = M.grouped_accuracy([1, 0, 2, 2, 4], [1, 1, 2, 0, 4], groups)
    assert got == {"inter": 2 / 3, "intra": 0.5}
    with pytest.raises(ValueError, match="must be"):
        M.accuracy([0, 1], [0])


@pytest.mark.parametrize("seed", range(6))
def test_average_precision_matches_sklearn(seed, sklearn_metrics):
    rng = np.random.default_rng(seed)
    n = 25
    y = rng.integers(0, 2, n)
    y[0] = 1
    # odd seeds: heavy ties (integer scores); even seeds: continuous scores
    scores = rng.integers(0, 4, n).astype(float) if seed % 2 else rng.normal(size=n)
    assert M.average_precision(y, scores) == pytest.approx(
        sklearn_metrics.average_precision_score(y, scores), abs=1e-12
    )


def test_average_precision_hand_value():
    # ranking: pos, neg, pos -> precisions at the positives 1/1 and 2/3 -> AP = 5/6
    assert M.average_precision([1, 0, 1], [0.9, 0.5, 0.1]) == pytest.approx(5 / 6)
    assert math.isnan(M.average_precision([0, 0], [0.3, 0.2]))


def test_charades_map_mean_over_classes_with_positives(sklearn_metrics):
    rng = np.random.default_rng(7)
    labels = (rng.random((12, 6)) < 0.3).astype(int)
    labels[:, 5] = 0  # a class without positives: excluded from the mean
    labels[3] = 0  # a video without labels: dropped (Charades convention)
    labels[0, :5] = 1
    scores = rng.normal(size=(12, 6))
    keep = labels.sum(1) > 0
    ref = np.mean(
        [
            sklearn_metrics.average_precision_score(labels[keep, c], scores[keep, c])
            for c in range(5)
        ]
    )
    assert M.charades_map(labels, scores) == pytest.approx(ref, abs=1e-12)


def test_charades_map_hand_computed():
    # class 0: ranking pos, neg, pos -> AP 5/6; class 1: neg, pos, neg -> 1/2; class 2 has no
    # positive (NaN, left out); the unlabelled video 3 is dropped before ranking.
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.2], [0.1, 0.2, 0.3], [0.95, 0.9, 0.9]])
    ap = M.per_class_ap(labels[:3], scores[:3])
    np.testing.assert_allclose(ap[:2], [5 / 6, 1 / 2])
    assert np.isnan(ap[2])
    assert M.charades_map(labels, scores) == pytest.approx((5 / 6 + 1 / 2) / 2)
    np.testing.assert_array_equal(M.multi_hot([[0, 2], []], 3), [[1, 0, 1], [0, 0, 0]])


# ----------------------------------------------------------------------------- EPIC MIR

REL = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.5, 0.0, 1.0]])
SIM = np.array([[0.1, 0.3, 0.2], [0.0, 0.9, 0.8], [0.6, 0.5, 0.4]])


def test_ndcg_hand_computed_3x3():
    # Each row has k = 2 non-zero relevancies, so only the top-2 ranks count.
    # IDCG (every row) = 1/log2(2) + 0.5/log2(3).
    idcg = 1 + 0.5 / math.log2(3)
    # row 0: ranking 1, 2, 0 -> rel 0.5, 0.0  -> DCG = 0.5
    # row 1: ranking 1, 2, 0 -> rel 1.0, 0.5  -> DCG = IDCG
    # row 2: ranking 0, 1, 2 -> rel 0.5, 0.0  -> DCG = 0.5
    expect = (0.5 / idcg + 1.0 + 0.5 / idcg) / 3
    assert M.mir_ndcg(SIM, REL) == pytest.approx(expect, abs=1e-12)
    assert M.mir_ndcg(REL, REL) == pytest.approx(1.0)


def test_ndcg_matches_epic_published_example():
    # The worked example shipped with EPIC's nDCG code (JPoSE / EgoVLP utils/nDCG.py).
    sim = np.array([[1.0, 0.7, 0.4, 0.0], [0.3, 0.9, 0.6, 0.1], [0.2, 0.5, 0.8, 0.4]])
    rel = np.array([[1.0, 0.5, 0.25, 0.0], [0.0, 1.0, 0.4, 0.0], [0.5, 0.3, 1.0, 0.0]])
    assert M.mir_ndcg(sim, rel) == pytest.approx(0.9371789900735429, abs=1e-15)


def test_mir_map_hand_computed():
    # row 0: ranking 1, 2, 0 -> rel 0.5, 0, 1; the relevant (=1) item is at rank 3 where the
    #        cumulative relevancy is 1.5 -> AP = 1.5 / 3 = 0.5 (EPIC counts partial relevancy)
    # row 1: ranking 1, 2, 0 -> rel 1, 0.5, 0 -> AP = 1/1 = 1
    # row 2: ranking 0, 1, 2 -> rel 0.5, 0, 1 -> AP = 1.5 / 3 = 0.5
    assert M.mir_map(SIM, REL) == pytest.approx((0.5 + 1 + 0.5) / 3)
    binary = np.array([[1.0, 0.0, 1.0]])
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert M.mir_map(np.array([[0.9, 0.5, 0.1]]), binary) == pytest.approx((1 + 2 / 3) / 2)


def test_mir_metrics_both_directions():
    got = M.mir_metrics(SIM, REL)
    assert got["mAP_v2t"] == M.mir_map(SIM, REL)
    assert got["mAP_t2v"] == M.mir_map(SIM.T, REL.T)
    assert got["nDCG_t2v"] == M.mir_ndcg(SIM.T, REL.T)
    assert got["mAP"] == pytest.approx((got["mAP_v2t"] + got["mAP_t2v"]) / 2)
    assert got["nDCG"] == pytest.approx((got["nDCG_v2t"] + got["nDCG_t2v"]) / 2)
    # t2v column 0 of SIM ranks rows 2, 0, 1 -> rel 0.5, 1, 0 -> AP = 1.5 / 2
    assert M.mir_map(SIM.T[:1], REL.T[:1]) == pytest.approx(0.75)
    perfect = M.mir_metrics(REL + 1e-3 * np.eye(3), REL)
    assert perfect["mAP"] == pytest.approx(1.0) and perfect["nDCG"] == pytest.approx(1.0)
    chance = M.mir_chance(REL, trials=50)
    assert 0.3 < chance["mAP"] < 0.9 and chance["nDCG"] < perfect["nDCG"]
    with pytest.raises(ValueError, match="NaN"):
        M.mir_map(np.full((3, 3), np.nan), REL)


# ----------------------------------------------------------------------------- open-ended


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 of 6)
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # P = 3/4, R = 3/3 -> F = 2 * 0.75 / 1.75
    assert M.rouge_l("On the red table.", "on the table") == pytest.approx(1.5 / 1.75)
    assert M.rouge_l("blue", "green") == 0.0 and M.rouge_l("", "x") == 0.0
    assert M.lcs_length("abcbdab", "bdcaba") == 4


def test_exact_and_normalized_match():
    assert M.exact_match(" red cup ", "red cup") == 1.0
    assert M.exact_match("The red cup.", "red cup") == 0.0
    assert M.normalized_match("The red cup.", "red cup") == 1.0
    assert M.normalize_answer("In  the Blue bowl!") == "in blue bowl"
    got = M.open_qa_metrics(["The red cup.", "left"], ["red cup", "on the left side"])
    assert got["exact"] == 0.0 and got["normalized"] == 0.5
    # "the red cup" vs "red cup": P = 2/3, R = 1 -> 0.8; "left" vs 4 tokens: P = 1, R = 1/4 -> 0.4
    assert got["rougeL"] == pytest.approx((0.8 + 0.4) / 2)
