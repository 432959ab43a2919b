"""EgoBench report: metrics from predictions, chance levels, the table, resumable runs."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from exo2ego_jax.eval import metrics as M
from exo2ego_jax.eval import report as R
from input_pipeline import egobench as T

FIX = Path(__file__).parent / "fixtures" / "egobench"

OURS = {
    "egoschema": {"accuracy": 50.0},
    "qaego4d_close": {"accuracy": 60.0},
    "qaego4d_open": {"exact": 10.0, "normalized": 20.0, "rougeL": 30.0},
    "egotaskqa": {"accuracy": 45.0, "direct": 40.0, "indirect": 50.0},
    "charades_ego": {"mAP": 70.0},
    "epic_mir": {"mAP": 40.0, "nDCG": 60.0},
    "egoplan": {"accuracy": 30.0},
    "vlnqa": {"accuracy": 35.0},
    "egomcq": {"inter": 90.0, "intra": 40.0},
}


def _item(task, item_id, n_options, answer, group=None):
    opts = tuple(f"option {k}" for k in range(n_options))
    return T.EvalItem(
        task, item_id, Path("/v.mp4"), "q?", options=opts, answer_index=answer, group=group
    )


def test_table_rows_markdown_and_csv():
    chance = {"egoschema": {"accuracy": 20.0}, "egomcq": {"inter": 20.0, "intra": 20.0}}
    rows = R.results_rows(OURS, chance=chance)
    assert len(rows) == len(R.LAYOUT) + 1
    avg = rows[-1]
    # EgoSchema 50, QAEgo4D 60, EgoTaskQA 45, Charades 70, EPIC 50, EgoPlan 30, VLN 35, MCQ 65
    assert avg.ours == pytest.approx((50 + 60 + 45 + 70 + 50 + 30 + 35 + 65) / 8)
    assert (avg.metric, avg.paper) == ("mean of 8 tasks", 55.6)
    assert avg.chance == pytest.approx(20.0)  # only the tasks that have a chance value
    md = R.markdown_table(rows).splitlines()
    assert md[0] == "| Task | Metric | Ours | Paper Exo2Ego | Chance |"
    assert md[1] == "|---|---|---:|---:|---:|"
    assert md[2] == "| EgoSchema | accuracy | 50.0 | 61.3 | 20.0 |"
    assert md[4] == "| QAEgo4D | open-ended acc / score (GPT judge) | — | 28.3 / 2.7 | — |"
    assert md[6] == "| QAEgo4D | open-ended ROUGE-L | 30.0 | — | — |"
    assert md[11] == "| EPIC-KITCHENS-100 MIR | nDCG | 60.0 | 63.6 | — |"
    assert md[-1] == "| Average | mean of 8 tasks | 50.6 | 55.6 | 20.0 |"
    csv_lines = R.csv_table(rows, chance=False).splitlines()
    assert csv_lines[0] == "task,metric,ours,paper"
    assert csv_lines[1] == "EgoSchema,accuracy,50.00,61.30"
    assert csv_lines[3] == "QAEgo4D,open-ended acc / score (GPT judge),,28.3 / 2.7"
    assert csv_lines[-1] == "Average,mean of 8 tasks,50.62,55.60"
    plain = R.markdown_table(
        R.results_rows({"vlnqa": {"accuracy": 35.0}}), paper=False, chance=False
    ).splitlines()
    assert plain[0] == "| Task | Metric | Ours |"
    assert plain[-1] == "| Average | mean of 1 of 8 tasks | 35.0 |"


def test_chance_levels():
    items = [_item("egomcq", "a", 5, 0, "inter"), _item("egomcq", "b", 4, 1, "intra")]
    got = R.chance_metrics("egomcq", items)
    assert got == pytest.approx({"accuracy": 22.5, "inter": 20.0, "intra": 25.0})
    charades = T.load_charades_ego(
        FIX,
        "charades_ego/CharadesEgo_v1_test_only1st.csv",
        "charades_ego/Charades_v1_classes.txt",
    )
    # 2 labelled videos; classes 0, 3, 4 have one positive each -> positive rate 1/2
    assert R.chance_metrics("charades_ego", charades) == pytest.approx({"mAP": 50.0})
    assert R.chance_metrics("qaego4d_open", []) == {}
    bench = T.load_epic_mir(
        FIX,
        "epic_mir/EPIC_100_retrieval_test.csv",
        "epic_mir/EPIC_100_retrieval_test_sentence.csv",
        "epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy",
    )
    # The exact expectation over uniformly random rankings, by hand: nDCG in closed form
    # (each item is equally likely at every rank: E[DCG] = mean(rel) * sum of the first k
    # discounts), mAP over all 4! (v2t) and 5! (t2v) rankings. Monte-Carlo within 0.75.
    rel = bench.relevancy

    def expected_ndcg(rel):
        d = 1.0 / np.log2(np.arange(rel.shape[1]) + 2.0)
        per_row = []
        for r in rel:
            k = int((r > 0).sum())
            idcg = (np.sort(r)[::-1][:k] * d[:k]).sum()
            per_row.append(r.mean() * d[:k].sum() / idcg if idcg > 0 else 0.0)
        return np.mean(per_row)

    def expected_map(rel):
        ranks = itertools.permutations(range(rel.shape[1]))
        return np.mean([M.mir_map(np.tile(np.float64(p), (len(rel), 1)), rel) for p in ranks])

    exact = {
        "mAP_v2t": 100 * expected_map(rel),
        "mAP_t2v": 100 * expected_map(rel.T),
        "nDCG_v2t": 100 * expected_ndcg(rel),
        "nDCG_t2v": 100 * expected_ndcg(rel.T),
    }
    exact["mAP"] = (exact["mAP_v2t"] + exact["mAP_t2v"]) / 2
    exact["nDCG"] = (exact["nDCG_v2t"] + exact["nDCG_t2v"]) / 2
    assert exact["mAP"] == pytest.approx(67.8724, abs=1e-4)
    assert exact["nDCG"] == pytest.approx(73.7904, abs=1e-4)
    mir = R.chance_metrics("epic_mir", bench, trials=2000)
    assert mir == pytest.approx(exact, abs=0.75)


def test_task_metrics_from_predictions():
    mcq = [
        {"item_id": "0", "pred_index": 1, "answer_index": 1, "group": "inter"},
        {"item_id": "1", "pred_index": 0, "answer_index": 3, "group": "intra"},
        {"item_id": "2", "pred_index": 2, "answer_index": 2, "group": "intra"},
        {"item_id": "3", "pred_index": 2, "answer_index": None, "group": "intra"},  # no gold
    ]
    assert R.task_metrics("egomcq", mcq) == pytest.approx(
        {"accuracy": 200 / 3, "inter": 100.0, "intra": 50.0}
    )
    open_ = [{"item_id": "0", "prediction": "The red cup.", "answer": "red cup"}]
    assert R.task_metrics("qaego4d_open", open_) == pytest.approx(
        {"exact": 0.0, "normalized": 100.0, "rougeL": 80.0}
    )
    charades = [
        {"item_id": "a", "scores": [0.9, 0.1], "labels": [0]},
        {"item_id": "b", "scores": [0.2, 0.8], "labels": [1]},
    ]
    assert R.task_metrics("charades_ego", charades) == pytest.approx({"mAP": 100.0})
    bench = T.load_epic_mir(
        FIX,
        "epic_mir/EPIC_100_retrieval_test.csv",
        "epic_mir/EPIC_100_retrieval_test_sentence.csv",
        "epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy",
    )
    perfect = [
        {"item_id": c.item_id, "scores": (row + 1e-3 * np.arange(4)).tolist()}
        for c, row in zip(bench.clips, bench.relevancy, strict=True)
    ]
    got = R.task_metrics("epic_mir", perfect, benchmark=bench)
    assert got["nDCG_v2t"] == pytest.approx(100.0) and got["mAP_v2t"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="RetrievalBenchmark"):
        R.task_metrics("epic_mir", perfect)


def test_run_resumable_skips_done_items_and_survives_interruption(tmp_path):
    items = [_item("vlnqa", f"{i:05d}", 4, i % 4) for i in range(7)]
    path = R.predictions_path(tmp_path, "vlnqa")
    calls = []

    def score(chunk, fail_after=None):
        calls.append([it.item_id for it in chunk])
        if fail_after is not None and len(calls) > fail_after:
            raise RuntimeError("interrupted")
        return [
            {"item_id": it.item_id, "pred_index": 0, "answer_index": it.answer_index}
            for it in chunk
        ]

    with pytest.raises(RuntimeError, match="interrupted"):
        R.run_resumable(path, items, lambda c: score(c, fail_after=1), chunk_size=3)
    assert [r["item_id"] for r in R.read_predictions(path)] == ["00000", "00001", "00002"]
    with open(path, "a") as f:  # a crash in the middle of an append
        f.write('{"item_id": "00003", "pred')
    calls.clear()
    preds = R.run_resumable(path, items, score, chunk_size=3)
    assert calls == [["00003", "00004", "00005"], ["00006"]]  # only the missing ones
    assert [p["item_id"] for p in preds] == [it.item_id for it in items]
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and all(json.loads(line) for line in lines)
    calls.clear()
    assert R.run_resumable(path, items, score) == preds and calls == []  # nothing left
    assert R.task_metrics("vlnqa", preds) == pytest.approx({"accuracy": 200 / 7})


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"item_id": "0"}\nnot json\n{"item_id": "1"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl: line 2"):
        R.read_predictions(path)


def test_summarize_writes_report(tmp_path):
    items = {"vlnqa": [_item("vlnqa", "0", 4, 2), _item("vlnqa", "1", 4, 0)]}
    preds = {
        "vlnqa": [
            {"item_id": "0", "pred_index": 2, "answer_index": 2},
            {"item_id": "1", "pred_index": 3, "answer_index": 0},
        ]
    }
    rows, ours = R.summarize(tmp_path, preds, items)
    assert ours == {"vlnqa": {"accuracy": 50.0}}
    md = (tmp_path / "results.md").read_text().splitlines()
    assert "| VLN-QA | accuracy | 50.0 | 44.5 | 25.0 |" in md
    assert (tmp_path / "results.csv").read_text().splitlines()[-1] == (
        "Average,mean of 1 of 8 tasks,50.00,55.60,25.00"
    )
