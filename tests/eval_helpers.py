"""Shared pieces of the evaluation tests: a tiny trained-looking stage-3 model on a tiny
world (test_evaluate.py, test_web.py), and checks of written EgoBench predictions
(test_evaluate.py, test_study.py)."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

from configs import common
from configs import eval as eval_config
from exo2ego_jax import config_lib, runtime, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.eval import evaluate, report, scoring
from exo2ego_jax.eval import metrics as M
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.training import checkpoints
from input_pipeline import egobench as tasks
from input_pipeline.prepare import prepare
from input_pipeline.synthetic import generate_world


def _save_stage(workdir, stage: int, model, params) -> None:
    """A stage checkpoint as the trainer writes it: the stage's trainable leaves, perturbed
    so that each stage's hand-off changes the model."""
    stage_cfg = config_lib.build_stage_config(common.base_config(stage, "demo").stage)
    trainable, _ = stages.split_params(params, stages.trainable_patterns(stage_cfg, model))
    rng = np.random.default_rng(stage)  # host-side noise: no per-shape device programs
    trainable = jax.tree.map(
        lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32), trainable
    )
    ckpt = checkpoints.StageCheckpointer(workdir, async_save=False)
    meta = {"stage": stage, **checkpoints.param_meta(trainable)}
    ckpt.save(1, trainable, {"count": np.zeros((), np.int32)}, meta, {}, force=True)
    ckpt.close()


def tiny_eval_config(root: Path) -> ml_collections.ConfigDict:
    """``configs/eval.py:demo`` pointed at the world, tokenizer and stage checkpoints that
    :func:`tiny_stage3` makes under ``root`` (no pretrained demo LM / CLIP; chat answers of
    6 new tokens)."""
    root = Path(root)
    world, prepared = root / "world", root / "prepared"
    config = eval_config.get_config("demo")
    config.data.world_dir, config.data.prepared_dir = str(world), str(prepared)
    config.data.tokenizer = str(prepared / "tokenizer")
    config.init.llm = ""  # no pretrained demo LM: random init, then the stage checkpoints
    config.init.clip = ""
    config.init.stages = tuple(str(root / f"stage{i}") for i in range(4))
    config.eval.data_root = str(world)
    config.eval.out_dir = str(root / "eval")
    config.chat.max_new_tokens = 6
    return config


def tiny_stage3(root: Path) -> tuple[ml_collections.ConfigDict, Path]:
    """A tiny world (6 takes, 2 held out) + its tokenizer under ``root``, and stage 0..3
    checkpoints of the demo-size model (random init, each stage's leaves perturbed).

    Returns ``(tiny_eval_config(root), world)``.
    """
    world = generate_world(
        Path(root) / "world",
        seed=0,
        num_takes=6,
        heldout_takes=2,
        size=64,
        fps=6,
        workers=1,
        progress=False,
    )
    prepare(world, Path(root) / "prepared", progress=False)
    config = tiny_eval_config(root)

    model = Exo2Ego(config_lib.build_model_config(config.model))
    mesh, rules = (
        sharding_lib.make_mesh(config.mesh.shape),
        sharding_lib.rules_for(config.mesh.rules),
    )
    with sharding_lib.sharding_context(mesh, rules):
        params, _ = runtime.init_params(model, mesh, rules, config.seed)
        for i, wd in enumerate(config.init.stages):
            _save_stage(wd, i, model, params)
    return config, world


MCQ_TASKS = ("egoschema", "qaego4d_close", "egotaskqa", "egoplan", "vlnqa", "egomcq")


def recompute_metrics(config) -> dict[str, dict[str, float]]:
    """Every task's metrics from its written predictions and the benchmark's own answers,
    with the metric functions (not report.task_metrics); each prediction is checked against
    its item (gold answer, number of options) and its choice against its scores / output."""
    out = {}
    for task in tasks.TASKS:
        bench = evaluate.load_benchmark(config, task)
        items = bench.clips if isinstance(bench, tasks.RetrievalBenchmark) else bench
        preds = report.read_predictions(report.predictions_path(config.eval.out_dir, task))
        by_id = {p["item_id"]: p for p in preds}
        assert sorted(by_id) == sorted(it.item_id for it in items), task
        preds = [by_id[it.item_id] for it in items]
        if task in MCQ_TASKS:
            chosen, gold, groups = [], [], []
            for it, p in zip(items, preds, strict=True):
                n = len(it.option_clips) or len(it.options)
                assert p["answer_index"] == it.answer_index and p["num_options"] == len(it.options)
                if p["mode"] == "loglik":
                    scores = np.asarray(p["scores"])
                    assert len(scores) == n
                    np.testing.assert_allclose(
                        scores, np.asarray(p["logprob_sums"]) / p["num_tokens"], rtol=1e-12
                    )
                    assert p["pred_index"] == int(np.argmax(scores)), (task, p)
                else:  # letter mode: the option named by the generated text
                    assert p["pred_index"] == scoring.extract_letter(p["output"], n), (task, p)
                assert p["correct"] == (p["pred_index"] == it.answer_index)
                chosen.append(p["pred_index"])
                gold.append(it.answer_index)
                groups.append(it.group)
            hits = np.asarray(chosen) == np.asarray(gold)
            out[task] = {"accuracy": 100.0 * hits.mean()}
            for g in sorted({g for g in groups if g}):
                out[task][g] = 100.0 * hits[np.asarray(groups) == g].mean()
        elif task == "charades_ego":
            for it, p in zip(items, preds, strict=True):
                assert len(p["scores"]) == len(it.options) and p["labels"] == list(it.labels)
            scores = np.asarray([p["scores"] for p in preds])
            labels = M.multi_hot([it.labels for it in items], scores.shape[1])
            out[task] = {"mAP": 100.0 * M.charades_map(labels, scores)}
        elif task == "epic_mir":
            sim = np.asarray([p["scores"] for p in preds])  # rows in the benchmark's clip order
            assert sim.shape == bench.relevancy.shape
            out[task] = {k: 100.0 * v for k, v in M.mir_metrics(sim, bench.relevancy).items()}
        else:  # qaego4d_open
            for it, p in zip(items, preds, strict=True):
                assert p["answer"] == it.answer_text and isinstance(p["prediction"], str)
            res = M.open_qa_metrics([p["prediction"] for p in preds], [p["answer"] for p in preds])
            out[task] = {k: 100.0 * v for k, v in res.items()}
    return out


def task_scores_by_hand(m: dict[str, dict[str, float]]) -> dict[str, float]:
    """One score per task as method.md decides (close-ended accuracy for QAEgo4D, the mean of
    direct/indirect, of mAP/nDCG and of inter/intra) and their mean over the eight tasks."""
    out = {
        "EgoSchema": m["egoschema"]["accuracy"],
        "QAEgo4D": m["qaego4d_close"]["accuracy"],
        "EgoTaskQA": (m["egotaskqa"]["direct"] + m["egotaskqa"]["indirect"]) / 2,
        "Charades-Ego": m["charades_ego"]["mAP"],
        "EPIC-KITCHENS-100 MIR": (m["epic_mir"]["mAP"] + m["epic_mir"]["nDCG"]) / 2,
        "EgoPlan-Bench": m["egoplan"]["accuracy"],
        "VLN-QA": m["vlnqa"]["accuracy"],
        "EgoMCQ": (m["egomcq"]["inter"] + m["egomcq"]["intra"]) / 2,
    }
    out["Average"] = sum(out.values()) / 8
    return out
