"""EgoBench metrics, pure numpy. Every score is a fraction in [0, 1] (the report shows %).

* :func:`accuracy`, :func:`grouped_accuracy` (EgoMCQ inter / intra, EgoTaskQA direct /
  indirect);
* :func:`average_precision` (as ``sklearn.metrics.average_precision_score``) and
  :func:`charades_map` (mean over classes with at least one positive);
* :func:`mir_map`, :func:`mir_ndcg`, :func:`mir_metrics`: EPIC-KITCHENS-100 multi-instance
  retrieval, computed as EPIC's reference code (``mwray/Joint-Part-of-Speech-Embeddings``
  ``evaluation/{mAP,nDCG}.py``, reused by EgoVLP / LaViLa) with its relevancy matrix, in
  both directions (video->text on rows, text->video on the transpose) and averaged;
* :func:`exact_match`, :func:`normalized_match`, :func:`rouge_l` for open-ended answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

# ----------------------------------------------------------------------------- accuracy


def accuracy(predictions: Sequence[int], answers: Sequence[int]) -> float:
    """Fraction of ``predictions[i] == answers[i]`` (a prediction of -1 is always wrong)."""
    pred, gold = np.asarray(predictions), np.asarray(answers)
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"predictions {pred.shape} and answers {gold.shape} must be [N]")
    if pred.size == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float(np.mean(pred == gold))


def grouped_accuracy(
    predictions: Sequence[int], answers: Sequence[int], groups: Sequence[str]
) -> dict[str, float]:
    """Accuracy per group name (e.g. ``{'inter': ..., 'intra': ...}``), groups sorted."""
    pred, gold, grp = np.asarray(predictions), np.asarray(answers), np.asarray(groups)
    return {str(g): accuracy(pred[grp == g], gold[grp == g]) for g in sorted(set(grp.tolist()))}


# ----------------------------------------------------------------------------- mAP (Charades)


def average_precision(y_true: Sequence[int], scores: Sequence[float]) -> float:
    """AP as ``sklearn.metrics.average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n``.

    Thresholds are the distinct scores, so tied scores enter together (no dependence on
    sort order). ``y_true`` is binary; with no positive it is undefined (NaN).
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true {y.shape} and scores {s.shape} differ in shape")
    if not y.any():
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_ap(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``float[C]`` AP of each class column; NaN for classes without a positive.

    Args:
      labels: ``{0,1}[N, C]`` multi-hot targets; scores: ``float[N, C]``.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    if labels.shape != scores.shape or labels.ndim != 2:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be [N, C]")
    return np.array([average_precision(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])


def charades_map(labels: np.ndarray, scores: np.ndarray, drop_empty_rows: bool = True) -> float:
    """Charades mAP: mean per-class AP over classes with at least one positive.

    ``drop_empty_rows`` removes videos without any label first, as the Charades evaluation
    does (it ranks them last with -inf scores, which is the same for AP).
    """
    labels, scores = np.asarray(labels), np.asarray(scores)
    if drop_empty_rows:
        keep = labels.sum(axis=1) > 0
        labels, scores = labels[keep], scores[keep]
    ap = per_class_ap(labels, scores)
    if np.all(np.isnan(ap)):
        raise ValueError("no class has a positive label: mAP is undefined")
    return float(np.nanmean(ap))


def multi_hot(label_lists: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    """``int32[N, C]`` multi-hot matrix from per-item lists of class indices."""
    out = np.zeros((len(label_lists), num_classes), np.int32)
    for i, labels in enumerate(label_lists):
        out[i, list(labels)] = 1
    return out


# ----------------------------------------------------------------------------- EPIC MIR


def mir_map(similarity: np.ndarray, relevancy: np.ndarray) -> float:
    """EPIC MIR mean average precision of the rows (queries) over the columns.

    As EPIC's ``calculate_mAP``: a retrieved item is relevant when its relevancy is exactly
    1; precision at rank k is the *cumulative relevancy* of the first k items over k (so
    partially relevant items ahead of a relevant one count fractionally, as in the
    reference code); AP = mean of that precision at the relevant ranks. A query without any
    relevant item gets AP 0 (the reference divides by zero there).

    Args:
      similarity: ``float[N, M]`` scores, higher = more similar.
      relevancy: ``float[N, M]`` in [0, 1].
    """
    sim, rel = _check_pair(similarity, relevancy)
    order = np.argsort(-sim, axis=1)  # EPIC's (-sim).argsort(): same tie order
    ranked = np.take_along_axis(rel, order, axis=1)
    hits = ranked == 1
    cumulative = np.where(hits, np.cumsum(ranked, axis=1), 0.0)
    precision_sum = np.sum(cumulative / np.arange(1, rel.shape[1] + 1), axis=1)
    return float(np.mean(precision_sum / np.maximum(hits.sum(axis=1), 1)))


def mir_ndcg(similarity: np.ndarray, relevancy: np.ndarray) -> float:
    """EPIC MIR normalised discounted cumulative gain of the rows over the columns.

    As EPIC's ``calculate_nDCG``: ``DCG = sum_{i<k} rel_(i) / log2(i + 2)`` over the first k
    retrieved items, k = the query's number of items with non-zero relevancy; IDCG is the
    same for the items sorted by relevancy; mean of DCG / IDCG over queries (0 where IDCG
    is 0).
    """
    sim, rel = _check_pair(similarity, relevancy)
    n, m = rel.shape
    k = np.sum(rel > 0, axis=1, keepdims=True)
    within = np.arange(m)[None, :] < k  # EPIC's k_counts mask
    discount = 1.0 / np.log2(np.arange(m) + 2.0)
    order = np.argsort(sim, axis=1)[:, ::-1]  # EPIC's argsort(sim)[:, ::-1]: same tie order
    dcg = np.sum(np.take_along_axis(rel, order, axis=1) * within * discount, axis=1)
    ideal = np.sort(rel, axis=1)[:, ::-1]
    idcg = np.sum(ideal * within * discount, axis=1)
    ndcg = np.divide(dcg, idcg, out=np.zeros(n), where=idcg > 0)
    return float(np.mean(ndcg))


def mir_metrics(similarity: np.ndarray, relevancy: np.ndarray) -> dict[str, float]:
    """Both directions and their averages, as EPIC reports them.

    Args:
      similarity, relevancy: ``float[num_clips, num_sentences]`` (rows: videos).
    Returns:
      ``mAP_v2t, mAP_t2v, mAP, nDCG_v2t, nDCG_t2v, nDCG`` (fractions).
    """
    sim, rel = _check_pair(similarity, relevancy)
    out = {
        "mAP_v2t": mir_map(sim, rel),
        "mAP_t2v": mir_map(sim.T, rel.T),
        "nDCG_v2t": mir_ndcg(sim, rel),
        "nDCG_t2v": mir_ndcg(sim.T, rel.T),
    }
    out["mAP"] = (out["mAP_v2t"] + out["mAP_t2v"]) / 2
    out["nDCG"] = (out["nDCG_v2t"] + out["nDCG_t2v"]) / 2
    return out


def mir_chance(relevancy: np.ndarray, trials: int = 3, seed: int = 0) -> dict[str, float]:
    """Expected :func:`mir_metrics` of random scores (mean over ``trials`` draws)."""
    rel = np.asarray(relevancy, np.float64)
    rng = np.random.default_rng(seed)
    runs = [mir_metrics(rng.random(rel.shape), rel) for _ in range(trials)]
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def _check_pair(similarity: np.ndarray, relevancy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim, rel = np.asarray(similarity, np.float64), np.asarray(relevancy, np.float64)
    if sim.shape != rel.shape or sim.ndim != 2 or sim.size == 0:
        raise ValueError(f"similarity {sim.shape} and relevancy {rel.shape} must be [N, M]")
    if not np.all(np.isfinite(sim)):
        raise ValueError("similarity has NaN or infinite entries")
    return sim, rel


# ----------------------------------------------------------------------------- open-ended QA

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the stripped strings are identical, else 0.0."""
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    """1.0 if :func:`normalize_answer` makes them identical, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_tokens(text: str) -> list[str]:
    """Tokens as ``rouge_score``'s default tokenizer: lower case, runs of [a-z0-9]."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure: ``2PR / (P + R)`` with ``P = LCS / |pred|``, ``R = LCS / |ref|``."""
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def open_qa_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``exact``, ``normalized`` match and ``rougeL`` over answer pairs."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-zero counts ({len(predictions)}, {len(references)})")
    pairs = list(zip(predictions, references, strict=True))
    return {
        "exact": float(np.mean([exact_match(p, r) for p, r in pairs])),
        "normalized": float(np.mean([normalized_match(p, r) for p, r in pairs])),
        "rougeL": float(np.mean([rouge_l(p, r) for p, r in pairs])),
    }
