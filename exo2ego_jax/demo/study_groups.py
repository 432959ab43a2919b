"""EgoBench scores of one evaluation per item group: ``transfer`` and ``seen`` items.

In the study's regime (docs/study.md) the held-out takes are grouped by the world generator
(``world.json`` ``study.groups``): a *transfer* take acts on an object of a transfer colour or
shape, which no ego-labelled take shows; a *seen* take holds no such object. An EgoBench item
belongs to the group of the take it is about (``input_pipeline.synthetic.concepts.item_take``),
and each task's metrics are recomputed from the evaluation's written predictions over the
items of one group: accuracy over that group's questions, Charades-Ego mAP over its clips,
EPIC-KITCHENS-100 MIR over its clips and the sentences relevant to them.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from exo2ego_jax.eval import metrics as M
from exo2ego_jax.eval import report
from exo2ego_jax.eval.evaluate import load_benchmark
from input_pipeline.egobench import RetrievalBenchmark
from input_pipeline.synthetic.concepts import GROUPS, item_take, load_manifest

__all__ = ["GROUPS", "group_metrics", "has_item_groups"]

Metrics = dict[str, float]


def _retrieval_metrics(predictions: list[dict], bench: RetrievalBenchmark, ids: set) -> Metrics:
    """EPIC MIR over the clips in ``ids`` and the sentences relevant to at least one of
    them (the other sentences have no positive among these clips)."""
    rows = [i for i, clip in enumerate(bench.clips) if clip.item_id in ids]
    by_id = {p["item_id"]: p["scores"] for p in predictions}
    sim = np.asarray([by_id[bench.clips[i].item_id] for i in rows], np.float64)
    rel = np.asarray(bench.relevancy, np.float64)[rows]
    cols = rel.max(axis=0) > 0
    return {k: 100.0 * v for k, v in M.mir_metrics(sim[:, cols], rel[:, cols]).items()}


def has_item_groups(config: ml_collections.ConfigDict) -> bool:
    """Whether the evaluated world (``config.eval.data_root``) groups its held-out takes
    (transfer concepts set)."""
    study = load_manifest(config.eval.data_root).get("study", {})
    return bool(study.get("transfer_colors") or study.get("transfer_shapes"))


def _grouped_tasks(config: ml_collections.ConfigDict):
    """``(task, benchmark, {item_id: group})`` for every task of the evaluation ``config``."""
    e = config.eval
    manifest = load_manifest(e.data_root)
    groups = manifest.get("study", {}).get("groups")
    if not groups:
        raise ValueError(
            f"{e.data_root}/world.json has no take groups: the world was generated without "
            "transfer concepts (config.world.transfer_colors / transfer_shapes)"
        )
    for task in e.tasks:
        bench = load_benchmark(config, task)
        items = bench.clips if isinstance(bench, RetrievalBenchmark) else bench
        yield task, bench, {it.item_id: groups[item_take(task, it, manifest)] for it in items}


def group_metrics(config: ml_collections.ConfigDict) -> dict[str, dict[str, Metrics]]:
    """``{group: {task: metrics}}`` of the evaluation ``config`` (an eval config whose
    predictions are in ``config.eval.out_dir``) over the items of each group; a task with no
    item in a group is left out of that group."""
    out: dict[str, dict[str, Metrics]] = {g: {} for g in GROUPS}
    for task, bench, group_of in _grouped_tasks(config):
        predictions = report.read_predictions(Path(config.eval.out_dir) / f"{task}.jsonl")
        for group in GROUPS:
            ids = {i for i, g in group_of.items() if g == group}
            chosen = [p for p in predictions if p["item_id"] in ids]
            if not chosen:
                continue
            if isinstance(bench, RetrievalBenchmark):
                out[group][task] = _retrieval_metrics(predictions, bench, ids)
            else:
                out[group][task] = report.task_metrics(task, chosen)
    return out
