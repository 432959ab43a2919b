"""The study runner: job sharing, mean ± std aggregation, and the --quick study end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import recompute_metrics, task_scores_by_hand

from configs import study as study_config
from exo2ego_jax.demo import held_out_views, study, study_diagnostics, study_report
from exo2ego_jax.eval import evaluate
from input_pipeline.egobench import TASKS


def test_mean_std_and_aggregate_on_known_numbers():
    cell = study_report.mean_std([1.0, 2.0, 3.0])
    assert cell["mean"] == pytest.approx(2.0)
    assert cell["std"] == pytest.approx(1.0)  # sample std (ddof=1)
    assert cell["n"] == 3
    assert study_report.mean_std([1.0, 2.0, 3.0], ddof=0)["std"] == pytest.approx((2 / 3) ** 0.5)
    assert study_report.mean_std([5.0])["std"] is None  # one seed: no spread
    assert study_report.mean_std([None, 4.0, 6.0])["n"] == 2  # a missing score is left out
    assert study_report.format_cell(cell) == "2.0 ± 1.0"
    assert study_report.format_cell(study_report.mean_std([5.0])) == "5.0"
    assert study_report.format_cell(study_report.mean_std([])) == "—"

    per_seed = {
        "full": {0: {"EgoSchema": 40.0, "Average": 30.0}, 1: {"EgoSchema": 50.0, "Average": 34.0}},
        "no_kl": {0: {"EgoSchema": 20.0}},
    }
    agg = study_report.aggregate(per_seed)
    assert agg["full"]["EgoSchema"]["mean"] == pytest.approx(45.0)
    assert agg["full"]["EgoSchema"]["std"] == pytest.approx(50**0.5)
    assert agg["full"]["Average"]["values"] == [30.0, 34.0]
    assert agg["no_kl"]["VLN-QA"] == {"mean": None, "std": None, "n": 0, "values": []}
    assert set(agg["full"]) == set(study_report.COLUMNS)


def test_task_scores_use_the_reports_headline_metrics():
    metrics = {
        "egoschema": {"accuracy": 20.0},
        "qaego4d_close": {"accuracy": 30.0},
        "qaego4d_open": {"rougeL": 99.0},  # not a headline metric
        "egotaskqa": {"accuracy": 0.0, "direct": 40.0, "indirect": 60.0},
        "charades_ego": {"mAP": 50.0},
        "epic_mir": {"mAP": 10.0, "nDCG": 30.0},
        "egoplan": {"accuracy": 25.0},
        "vlnqa": {"accuracy": 35.0},
        "egomcq": {"inter": 70.0, "intra": 30.0},
    }
    scores = study_report.task_scores(metrics)
    assert scores["EgoTaskQA"] == pytest.approx(50.0)
    assert scores["EPIC-KITCHENS-100 MIR"] == pytest.approx(20.0)
    assert scores["EgoMCQ"] == pytest.approx(50.0)
    assert scores["Average"] == pytest.approx((20 + 30 + 50 + 50 + 20 + 25 + 35 + 50) / 8)
    del metrics["vlnqa"]
    assert study_report.task_scores(metrics)["Average"] is None  # an average of 7 tasks is not one


def test_plan_shares_stage_runs_between_arms(tmp_path):
    config = study_config.get_config()
    config.root, config.data_dir, config.seeds = str(tmp_path), str(tmp_path / "data"), (0, 1)
    plan = study.make_plan(config)
    seed0 = [j for j in plan.stages.values() if j.seed == 0]
    per_stage = {k: [j for j in seed0 if j.stage == k] for k in range(4)}
    # Stage 0: full's (shared by every ablation) and the ego-only baseline's.
    assert len(per_stage[0]) == 2 and len(per_stage[1]) == 1
    shared0 = next(j for j in per_stage[0] if "full" in j.arms)
    assert set(shared0.arms) == set(config.arms) - {"baseline"}
    # Stage 2: full (also no_lora's) + no_kl, no_g_ccl, forward_cycle, fc_mapping.
    assert len(per_stage[2]) == 5
    assert any(set(j.arms) == {"full", "no_lora"} for j in per_stage[2])
    assert len(per_stage[3]) == 7  # every arm has its own stage 3
    baseline3 = next(j for j in per_stage[3] if j.arms == ["baseline"])
    assert len(baseline3.parents) == 1  # stage 3 starts from the ego-only stage 0 alone
    assert baseline3.config.model.with_exo is False
    # 7 arms + the curve's init and stage-2 points (its stage-3 point is full's evaluation).
    assert len([j for j in plan.evals.values() if j.seed == 0]) == 9
    full = plan.evals[plan.arm_evals[("full", 0)]]
    assert "after stage 3" in full.labels
    init = plan.evals[plan.curve_evals[(0, 0)]]
    assert init.config.model.fusion == "x_only" and not init.config.model.lora.enabled
    assert len(plan.stages) == 2 * len(seed0)  # nothing is shared across seeds
    assert study.make_plan(config).order == plan.order  # keys are deterministic


def test_all_arms_sets_a_stage_field_for_every_arm_that_trains_the_stage(tmp_path):
    config = study_config.get_config()
    config.root, config.data_dir, config.seeds = str(tmp_path), str(tmp_path / "data"), (0,)
    before = study.make_plan(config)
    # Unset (None): no override, so every job keeps its id.
    assert "stage.kl_temperature" not in study.stage_overrides(config, "full", 2, 0)
    config.all_arms.stage2.stage.kl_temperature = 0.25
    assert study.stage_overrides(config, "no_kl", 2, 0)["stage.kl_temperature"] == 0.25
    after = study.make_plan(config)
    stage2 = [j for j in after.stages.values() if j.stage == 2]
    assert len(stage2) == 5 and all(j.config.stage.kl_temperature == 0.25 for j in stage2)
    # Stages 0 and 1 and the baseline (no stage 2) are untouched; every stage 2 and 3 is new.
    kept = {k for k, j in before.stages.items() if j.stage in (0, 1) or j.arms == ["baseline"]}
    assert kept == set(before.stages) & set(after.stages)


@pytest.mark.slow
def test_quick_study_end_to_end_and_rerun(tmp_path):
    config = study_config.get_config("quick")
    config.root = str(tmp_path / "study")
    config.eval.plots = False  # matplotlib is optional; the table is the result
    root = Path(config.root)

    t0 = time.time()
    first: list[str] = []
    payload = study.run(config, log=first.append)
    first_seconds = time.time() - t0

    table = (root / "results.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Arm |"))
    for column in study_report.COLUMNS:  # the eight tasks and the average
        assert f" {column} |" in header
    full = payload["arms"]["full"]
    assert all(full[c]["mean"] is not None for c in study_report.COLUMNS), full
    assert "| full: " in table
    assert json.loads((root / "results.json").read_text())["seeds"] == [0]
    assert "arm,full,Average" in (root / "results.csv").read_text()

    # A rerun finds every stage and evaluation on disk: nothing trains, nothing is scored.
    t1 = time.time()
    second: list[str] = []
    study.run(config, log=second.append)
    assert not [line for line in second if "training stage" in line]
    assert any("already finished" in line and "full" in line for line in second)
    assert time.time() - t1 < first_seconds / 2

    assert not payload["errors"], payload["errors"]
    baseline = payload["arms"]["baseline"]
    assert all(baseline[c]["mean"] is not None for c in study_report.COLUMNS), baseline
    assert "| baseline: " in table

    # Every number of each arm's row, recomputed from that arm's written predictions.
    plan = study.make_plan(config)
    for arm in ("baseline", "full"):
        job = plan.evals[plan.arm_evals[(arm, 0)]]
        metrics = recompute_metrics(job.config)
        saved = json.loads((job.out_dir / "study_metrics.json").read_text())["metrics"]
        for task, values in metrics.items():
            for k, v in values.items():
                assert saved[task][k] == pytest.approx(v, abs=1e-9), (arm, task, k)
        hand = task_scores_by_hand(metrics)
        for column, value in hand.items():
            cell = payload["arms"][arm][column]
            assert cell["mean"] == pytest.approx(value, abs=1e-9), (arm, column)
            assert cell["n"] == 1 and cell["std"] is None and cell["values"] == [cell["mean"]]
        row = next(line for line in table.splitlines() if line.startswith(f"| {arm}: "))
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert cells[1 : 1 + len(study_report.COLUMNS)] == [
            f"{hand[c]:.1f}" for c in study_report.COLUMNS
        ]
    # Chance: 1 / options for the multiple-choice tasks (per group where the task has
    # groups), and the average of the eight.
    chance, eval_config = payload["chance"], job.config

    def one_over_n(task, group=None):
        items = [
            it for it in evaluate.load_benchmark(eval_config, task) if group in (None, it.group)
        ]
        return 100.0 * np.mean([1.0 / len(it.option_clips or it.options) for it in items])

    assert chance["EgoSchema"] == pytest.approx(one_over_n("egoschema"))
    assert chance["QAEgo4D"] == pytest.approx(one_over_n("qaego4d_close"))
    assert chance["EgoTaskQA"] == pytest.approx(
        (one_over_n("egotaskqa", "direct") + one_over_n("egotaskqa", "indirect")) / 2
    )
    assert chance["VLN-QA"] == pytest.approx(one_over_n("vlnqa"))
    assert chance["EgoMCQ"] == pytest.approx(
        (one_over_n("egomcq", "inter") + one_over_n("egomcq", "intra")) / 2
    )
    assert chance["Average"] == pytest.approx(
        np.mean([chance[c] for c in study_report.TASK_LABELS])
    )

    # The study regime: the quick world has transfer concepts, so every arm is scored on the
    # transfer and the seen items too (recomputed from the same predictions by group), and
    # the full-minus-baseline table is written.
    for group in ("transfer", "seen"):
        assert f"## {group.capitalize()} items" in table
        assert set(payload["groups"][group]) == {"baseline", "full"}
        for arm in ("baseline", "full"):
            job = plan.evals[plan.arm_evals[(arm, 0)]]
            saved = json.loads((job.out_dir / "study_metrics.json").read_text())["groups"]
            assert payload["groups"][group][arm]["EgoSchema"]["mean"] == saved[group]["EgoSchema"]
    diff = payload["full_minus_baseline"]
    assert set(diff) == {"all", "transfer", "seen"}
    full0, base0 = (payload["per_seed"]["arms"][a][0]["Average"] for a in ("full", "baseline"))
    assert diff["all"]["Average"]["mean"] == pytest.approx(full0 - base0)
    assert diff["all"]["Average"]["wins"] is None  # one seed: no standard error
    assert "## Exo2Ego (full) minus the ego-only baseline" in table
    # The fair baseline: its stage 0 captions every ego clip Exo2Ego sees (EgoClip and the
    # pairs' ego halves) for as many updates as full's stages 0 and 2 together.
    base0_job = next(j for j in plan.stages.values() if j.stage == 0 and j.arms == ["baseline"])
    assert base0_job.config.data.datasets.ego_caption == "ego_clip+ego_exo_clip"
    assert base0_job.config.optim.num_steps == 2 * config.optim.stage0.num_steps

    # The diagnostics of the finished study (docs/study.md, "Diagnostics"): every section is
    # written, the ego-view row is the study's own score, and the exo-view evaluation scored
    # the same items as the ego view, from the exo renders of the same takes.
    diag: list[str] = []
    report = study_diagnostics.run(config, log=diag.append)
    seed0 = report["seeds"]["0"]
    takes = held_out_views.world_takes(root / "data" / "world", "heldout")
    assert report["clips"]["test"] == sum(len(t.object_steps()) for t in takes)
    ego_row = seed0["egobench"]["full (final), ego view"]["all"]["Average"]
    assert ego_row == payload["per_seed"]["arms"]["full"][0]["Average"]
    full_dir = plan.evals[plan.arm_evals[("full", 0)]].out_dir
    # Kept per model (its evaluation's digest), so a changed model is never scored from
    # another's predictions.
    exo_dir = root / "diagnostics" / "seed0" / f"exo_view_{full_dir.name}"
    for task in TASKS:
        ids = [json.loads(line)["item_id"] for line in (exo_dir / f"{task}.jsonl").open()]
        assert ids == [json.loads(line)["item_id"] for line in (full_dir / f"{task}.jsonl").open()]
    assert report["split"] == "test"
    for split in ("test", "pairs"):
        for values in seed0["mapping"]["final"][split].values():
            assert all(np.isfinite(v) and v >= 0 for v in values.values())
    assert set(seed0["stage2_losses"]) == {"vtg", "kl", "ccl", "loss"}
    md = (root / "diagnostics" / "diagnostics.md").read_text()
    for title in ("How close F(x) comes to y", "Linear probe", "Stage 2 losses", "by view"):
        assert title in md
