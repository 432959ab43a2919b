"""The study's item groups: EgoBench scores per group (transfer / seen) recomputed from an
evaluation's predictions, and the full-minus-baseline difference with its decision rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import demo as demo_configs
from exo2ego_jax.demo import study_groups, study_report
from exo2ego_jax.eval.evaluate import load_benchmark
from input_pipeline.egobench import RetrievalBenchmark
from input_pipeline.synthetic import generate_world
from input_pipeline.synthetic.concepts import StudyRegime, item_take, load_manifest


@pytest.fixture(scope="module")
def grouped_eval(tmp_path_factory):
    """A tiny world with transfer concepts and an eval config over it (no model: the
    predictions are written by hand)."""
    data = tmp_path_factory.mktemp("groups")
    generate_world(
        data / "world",
        num_takes=8,
        pair_takes=2,
        ego_takes=1,
        exo_takes=1,
        heldout_takes=4,
        size=64,
        fps=6,
        study=StudyRegime(transfer_colors=("purple",), transfer_shapes=("knife",)),
        progress=False,
    )
    config = demo_configs.eval_config(data / "work", data)
    (data / "work" / "eval").mkdir(parents=True)
    return config


def _write_predictions(config, right_group: str) -> None:
    """Every task's predictions: right on the items of ``right_group``'s takes, wrong on the
    others (MCQ, open QA); perfect scores for the ranking tasks (Charades-Ego, EPIC MIR)."""
    manifest = load_manifest(config.eval.data_root)
    groups = manifest["study"]["groups"]
    for task in config.eval.tasks:
        bench = load_benchmark(config, task)
        rows = []
        if isinstance(bench, RetrievalBenchmark):
            for clip, rel in zip(bench.clips, bench.relevancy, strict=True):
                rows.append({"item_id": clip.item_id, "scores": [float(r) for r in rel]})
        for it in bench if not isinstance(bench, RetrievalBenchmark) else ():
            right = groups[item_take(task, it, manifest)] == right_group
            if task == "charades_ego":
                scores = [1.0 if k in it.labels else 0.0 for k in range(len(it.options))]
                rows.append({"item_id": it.item_id, "scores": scores, "labels": list(it.labels)})
            elif task == "qaego4d_open":
                answer = it.answer_text if right else "nothing at all"
                rows.append({"item_id": it.item_id, "prediction": answer, "answer": it.answer_text})
            else:
                wrong = (it.answer_index + 1) % len(it.options)
                pred = it.answer_index if right else wrong
                rows.append(
                    {
                        "item_id": it.item_id,
                        "pred_index": pred,
                        "answer_index": it.answer_index,
                        "group": it.group,
                    }
                )
        path = f"{config.eval.out_dir}/{task}.jsonl"
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def test_group_scores_follow_the_items_of_each_groups_takes(grouped_eval):
    config = grouped_eval
    assert study_groups.has_item_groups(config)
    _write_predictions(config, right_group="transfer")
    got = study_groups.group_metrics(config)
    assert set(got) == {"transfer", "seen"}
    for task in ("egoschema", "qaego4d_close", "egotaskqa", "egoplan", "vlnqa", "egomcq"):
        assert got["transfer"][task]["accuracy"] == pytest.approx(100.0), task
        assert got["seen"][task]["accuracy"] == pytest.approx(0.0), task
    assert got["transfer"]["qaego4d_open"]["exact"] == pytest.approx(100.0)
    assert got["seen"]["qaego4d_open"]["exact"] == pytest.approx(0.0)
    for group in ("transfer", "seen"):  # perfect ranking within each group's items
        assert got[group]["charades_ego"]["mAP"] == pytest.approx(100.0)
        # graded relevancy: scores equal to it rank ideally (EPIC's mAP counts only
        # relevancy 1 as a hit, so it stays below 100 even then)
        assert got[group]["epic_mir"]["nDCG"] == pytest.approx(100.0)
    # The other way round, the groups swap.
    _write_predictions(config, right_group="seen")
    swapped = study_groups.group_metrics(config)
    assert swapped["seen"]["egoschema"]["accuracy"] == pytest.approx(100.0)
    assert swapped["transfer"]["egoschema"]["accuracy"] == pytest.approx(0.0)


def test_a_world_without_transfer_concepts_has_no_groups(tmp_path):
    generate_world(tmp_path / "world", num_takes=5, heldout_takes=1, size=64, fps=6, progress=False)
    config = demo_configs.eval_config(tmp_path / "work", tmp_path)
    assert not study_groups.has_item_groups(config)
    with pytest.raises(ValueError, match="no take groups"):
        study_groups.group_metrics(config)


def test_paired_difference_and_its_decision_rule():
    base = {s: {c: 30.0 for c in study_report.COLUMNS} for s in (0, 1, 2)}
    full = {
        s: {c: 30.0 + d for c in study_report.COLUMNS}
        for s, d in zip((0, 1, 2), (4, 6, 5), strict=True)
    }
    diff = study_report.paired_difference({"full": full, "baseline": base}, "full", "baseline")
    cell = diff["Average"]
    # differences 4, 6, 5: mean 5, sample sd 1, se 1/sqrt(3) = 0.577 -> 5 > 1.155: wins
    assert cell["mean"] == pytest.approx(5.0) and cell["std"] == pytest.approx(1.0)
    assert cell["se"] == pytest.approx(1 / np.sqrt(3)) and cell["wins"] is True
    noisy = {
        s: {c: 30.0 + d for c in study_report.COLUMNS}
        for s, d in zip((0, 1, 2), (9, -6, 3), strict=True)
    }
    cell = study_report.paired_difference({"full": noisy, "baseline": base}, "full", "baseline")
    # differences 9, -6, 3: mean 2, sd 7.55, se 4.36 -> 2 < 8.7: no win
    assert cell["Average"]["mean"] == pytest.approx(2.0) and cell["Average"]["wins"] is False
    # differences 0, 2, 7: mean 3, sd 3.61, se 2.08 -> above 1 se but not 2: no win
    middle = {
        s: {c: 30.0 + d for c in study_report.COLUMNS}
        for s, d in zip((0, 1, 2), (0, 2, 7), strict=True)
    }
    cell = study_report.paired_difference({"full": middle, "baseline": base}, "full", "baseline")
    assert cell["Average"]["mean"] == pytest.approx(3.0) and cell["Average"]["wins"] is False
    one = study_report.paired_difference(
        {"full": {0: full[0]}, "baseline": base}, "full", "baseline"
    )
    assert one["Average"]["n"] == 1 and one["Average"]["wins"] is None
