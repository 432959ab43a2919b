"""EgoBench results: resumable predictions files, per-task metrics and the results table.

* Predictions are JSON lines, one file per task (``<out_dir>/<task>.jsonl``), one line per
  item with its ``item_id``. :func:`run_resumable` scores only the items whose id is not in
  the file yet and appends after every chunk, so an interrupted run loses at most one chunk
  (a half-written last line is cut off on the next start).
* :func:`task_metrics` turns a task's predictions into its metrics (percent);
  :func:`chance_metrics` gives the same metrics for random guessing.
* :func:`results_rows` lays them out as the paper's table (method.md §6): the eight tasks
  with their sub-metrics and the average, with optional "paper Exo2Ego" and "chance"
  columns; :func:`markdown_table` / :func:`csv_table` / :func:`write_report` render it.

Average (a *decision*; the paper reports 55.6 without stating how sub-metrics combine): the
mean over the eight tasks of one score per task — close-ended accuracy for QAEgo4D, the mean
of direct/indirect (EgoTaskQA), of mAP/nDCG (EPIC MIR) and of inter/intra (EgoMCQ). The
paper column shows the paper's own average.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from exo2ego_jax.eval import metrics as M
from input_pipeline import atomic
from input_pipeline.egobench import EvalItem, RetrievalBenchmark

PathLike = str | os.PathLike
Metrics = dict[str, float]

# (task, metric key, task label, metric label, paper Exo2Ego value) in the paper's order.
LAYOUT: tuple[tuple[str, str, str, str, float | str | None], ...] = (
    ("egoschema", "accuracy", "EgoSchema", "accuracy", 61.3),
    ("qaego4d_close", "accuracy", "QAEgo4D", "close-ended accuracy", 62.1),
    ("qaego4d_open", "gpt", "QAEgo4D", "open-ended acc / score (GPT judge)", "28.3 / 2.7"),
    ("qaego4d_open", "normalized", "QAEgo4D", "open-ended normalised match", None),
    ("qaego4d_open", "rougeL", "QAEgo4D", "open-ended ROUGE-L", None),
    ("egotaskqa", "direct", "EgoTaskQA", "direct accuracy", 44.7),
    ("egotaskqa", "indirect", "EgoTaskQA", "indirect accuracy", 50.3),
    ("charades_ego", "mAP", "Charades-Ego", "mAP", 70.9),
    ("epic_mir", "mAP", "EPIC-KITCHENS-100 MIR", "mAP", 49.7),
    ("epic_mir", "nDCG", "EPIC-KITCHENS-100 MIR", "nDCG", 63.6),
    ("egoplan", "accuracy", "EgoPlan-Bench (val)", "accuracy", 42.7),
    ("vlnqa", "accuracy", "VLN-QA", "accuracy", 44.5),
    ("egomcq", "inter", "EgoMCQ", "inter-video accuracy", 88.4),
    ("egomcq", "intra", "EgoMCQ", "intra-video accuracy", 41.2),
)
PAPER_AVERAGE = 55.6
# One score per task for the average: the mean of these metrics.
PRIMARY: dict[str, tuple[str, tuple[str, ...]]] = {
    "EgoSchema": ("egoschema", ("accuracy",)),
    "QAEgo4D": ("qaego4d_close", ("accuracy",)),
    "EgoTaskQA": ("egotaskqa", ("direct", "indirect")),
    "Charades-Ego": ("charades_ego", ("mAP",)),
    "EPIC-KITCHENS-100 MIR": ("epic_mir", ("mAP", "nDCG")),
    "EgoPlan-Bench": ("egoplan", ("accuracy",)),
    "VLN-QA": ("vlnqa", ("accuracy",)),
    "EgoMCQ": ("egomcq", ("inter", "intra")),
}


# ----------------------------------------------------------------------------- predictions


def read_predictions(path: PathLike, *, repair: bool = False) -> list[dict]:
    """Records of a JSON-lines file ([] if it does not exist).

    A last line without its newline that does not parse is a write cut short by a crash:
    it is ignored, and with ``repair`` cut off the file so appends stay valid. Any other bad
    line raises ValueError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_bytes = [], 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # unterminated final line: an interrupted append
                if repair:
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                break
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from e
        good_bytes += len(line) + 1
    return records


def append_predictions(path: PathLike, records: Iterable[dict]) -> None:
    """Append records as JSON lines and flush them to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_resumable(
    path: PathLike,
    items: Sequence[EvalItem],
    score_fn: Callable[[Sequence[EvalItem]], list[dict]],
    *,
    chunk_size: int = 32,
    write: bool = True,
) -> list[dict]:
    """Score the items not yet in ``path`` (by ``item_id``), appending per chunk.

    ``write=False`` (the non-primary processes of a multi-host run) scores in step with the
    writer but leaves the file alone.

    Returns:
      one prediction per item, in ``items`` order (earlier runs' and this run's).
    """
    done = {r["item_id"]: r for r in read_predictions(path, repair=write)}
    todo = [it for it in items if it.item_id not in done]
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start : start + chunk_size]
        records = score_fn(chunk)
        if [r.get("item_id") for r in records] != [it.item_id for it in chunk]:
            raise ValueError("score_fn must return one record per item, in order, with item_id")
        if write:
            append_predictions(path, records)
        done.update((r["item_id"], r) for r in records)
    return [done[it.item_id] for it in items]


# ----------------------------------------------------------------------------- metrics


def task_metrics(
    task: str, predictions: Sequence[dict], *, benchmark: RetrievalBenchmark | None = None
) -> Metrics:
    """Metrics of one task from its predictions, in percent.

    Multiple choice (loglik or letter mode): ``accuracy`` and one entry per group
    (EgoTaskQA ``direct`` / ``indirect``, EgoMCQ ``inter`` / ``intra``). Charades-Ego:
    ``mAP``. EPIC MIR (needs ``benchmark`` for the relevancy): ``mAP``, ``nDCG`` and the two
    directions. Open-ended QA: ``exact``, ``normalized``, ``rougeL``.
    """
    if not predictions:
        raise ValueError(f"no predictions for task {task!r}")
    if task == "qaego4d_open":
        res = M.open_qa_metrics(
            [p["prediction"] for p in predictions], [p["answer"] for p in predictions]
        )
    elif task == "charades_ego":
        scores = np.asarray([p["scores"] for p in predictions], np.float64)
        labels = M.multi_hot([p["labels"] for p in predictions], scores.shape[1])
        res = {"mAP": M.charades_map(labels, scores)}
    elif task == "epic_mir":
        if benchmark is None:
            raise ValueError("epic_mir metrics need the RetrievalBenchmark (its relevancy)")
        by_id = {p["item_id"]: p["scores"] for p in predictions}
        sim = np.asarray([by_id[c.item_id] for c in benchmark.clips], np.float64)
        res = M.mir_metrics(sim, benchmark.relevancy)
    else:
        scored = [p for p in predictions if p.get("answer_index") is not None]
        if not scored:
            raise ValueError(f"task {task!r}: no prediction has a ground-truth answer")
        pred = [p["pred_index"] for p in scored]
        gold = [p["answer_index"] for p in scored]
        res = {"accuracy": M.accuracy(pred, gold)}
        if any(p.get("group") for p in scored):
            groups = [p.get("group") or "" for p in scored]
            res.update(M.grouped_accuracy(pred, gold, groups))
    return {k: 100.0 * v for k, v in res.items()}


def chance_metrics(
    task: str, items: Sequence[EvalItem] | RetrievalBenchmark, *, trials: int = 3
) -> Metrics:
    """What random guessing scores, in percent.

    MCQ: the mean of 1/num_options (per group too). Charades-Ego: the expected AP of random
    scores is the class's positive rate, so mAP ≈ the mean positive rate over classes with a
    positive. EPIC MIR: Monte-Carlo mean over ``trials`` random score matrices (seed 0).
    Open-ended QA: nothing (empty dict).
    """
    if isinstance(items, RetrievalBenchmark):
        return {k: 100.0 * v for k, v in M.mir_chance(items.relevancy, trials).items()}
    if task == "qaego4d_open":
        return {}
    if task == "charades_ego":
        labels = M.multi_hot([it.labels for it in items], len(items[0].options))
        labels = labels[labels.sum(axis=1) > 0]
        rate = labels.mean(axis=0)
        return {"mAP": 100.0 * float(np.mean(rate[labels.sum(axis=0) > 0]))}
    n = np.asarray([len(it.options) for it in items], np.float64)
    out = {"accuracy": 100.0 * float(np.mean(1.0 / n))}
    for g in sorted({it.group for it in items if it.group}):
        sel = np.asarray([it.group == g for it in items])
        out[g] = 100.0 * float(np.mean(1.0 / n[sel]))
    return out


# ----------------------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the results table (values in percent; None renders as "—")."""

    task: str
    metric: str
    ours: float | None
    paper: float | str | None = None
    chance: float | None = None


def _task_score(values: Mapping[str, Mapping[str, float]], task: str, keys: Sequence[str]):
    got = values.get(task, {})
    if not all(k in got for k in keys):
        return None
    return float(np.mean([got[k] for k in keys]))


def _average(values: Mapping[str, Mapping[str, float]]) -> float | None:
    scores = [_task_score(values, t, keys) for t, keys in PRIMARY.values()]
    scores = [s for s in scores if s is not None]
    return float(np.mean(scores)) if scores else None


def results_rows(
    ours: Mapping[str, Mapping[str, float]],
    *,
    chance: Mapping[str, Mapping[str, float]] | None = None,
) -> list[Row]:
    """The table rows in the paper's order plus the average.

    Args:
      ours: ``{task: {metric: percent}}`` as :func:`task_metrics` returns.
      chance: the same for random guessing (:func:`chance_metrics`), or None.
    Returns:
      rows with the paper's Exo2Ego numbers filled in; the last row is the average
      (``metric`` says over how many of the eight tasks ours is computed).
    """
    rows = []
    for task, key, label, metric, paper in LAYOUT:
        rows.append(
            Row(
                task=label,
                metric=metric,
                ours=ours.get(task, {}).get(key),
                paper=paper,
                chance=None if chance is None else chance.get(task, {}).get(key),
            )
        )
    n = sum(_task_score(ours, t, keys) is not None for t, keys in PRIMARY.values())
    rows.append(
        Row(
            task="Average",
            metric=f"mean of {n} of 8 tasks" if n != 8 else "mean of 8 tasks",
            ours=_average(ours),
            paper=PAPER_AVERAGE,
            chance=None if chance is None else _average(chance),
        )
    )
    return rows


def _cell(value: float | str | None, digits: int) -> str:
    if value is None:
        return "—"
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def _columns(paper: bool, chance: bool) -> list[tuple[str, str]]:
    cols = [("task", "Task"), ("metric", "Metric"), ("ours", "Ours")]
    if paper:
        cols.append(("paper", "Paper Exo2Ego"))
    if chance:
        cols.append(("chance", "Chance"))
    return cols


def markdown_table(rows: Sequence[Row], *, paper: bool = True, chance: bool = True) -> str:
    """Markdown table, numbers in percent with one decimal."""
    cols = _columns(paper, chance)
    lines = ["| " + " | ".join(title for _, title in cols) + " |"]
    lines.append(
        "|" + "|".join("---" if k in ("task", "metric") else "---:" for k, _ in cols) + "|"
    )
    for r in rows:
        cells = [_cell(getattr(r, k), 1) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[Row], *, paper: bool = True, chance: bool = True) -> str:
    """CSV with the same columns, numbers with two decimals, empty cells for "—"."""
    cols = _columns(paper, chance)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([k for k, _ in cols])
    for r in rows:
        writer.writerow(["" if getattr(r, k) is None else _cell(getattr(r, k), 2) for k, _ in cols])
    return buf.getvalue()


def write_report(
    out_dir: PathLike, rows: Sequence[Row], *, paper: bool = True, chance: bool = True
) -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.csv`` into ``out_dir`` (atomically, each)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (
        ("results.md", markdown_table(rows, paper=paper, chance=chance)),
        ("results.csv", csv_table(rows, paper=paper, chance=chance)),
    ):
        paths.append(atomic.write_text(out / name, text))
    return paths[0], paths[1]


def predictions_path(out_dir: PathLike, task: str) -> Path:
    """Where a task's predictions live: ``<out_dir>/<task>.jsonl``."""
    return Path(out_dir) / f"{task}.jsonl"


def summarize(
    out_dir: PathLike,
    predictions: Mapping[str, Sequence[dict]],
    items: Mapping[str, Sequence[EvalItem] | RetrievalBenchmark],
    *,
    paper: bool = True,
    chance: bool = True,
    write: bool = True,
) -> tuple[list[Row], dict[str, Metrics]]:
    """Compute every task's metrics (and chance), write ``results.md`` / ``results.csv``
    (unless ``write`` is False: a multi-host run's non-primary processes).

    Args:
      predictions: ``{task: predictions}`` (e.g. from :func:`run_resumable`).
      items: ``{task: items or RetrievalBenchmark}``; EPIC MIR needs its benchmark.
    Returns:
      the table rows and ``{task: metrics}``.
    """
    ours: dict[str, Metrics] = {}
    chances: dict[str, Metrics] = {}
    for task, preds in predictions.items():
        bench = items.get(task)
        retrieval = bench if isinstance(bench, RetrievalBenchmark) else None
        ours[task] = task_metrics(task, preds, benchmark=retrieval)
        if chance and bench is not None:
            chances[task] = chance_metrics(task, bench)
    rows = results_rows(ours, chance=chances if chance else None)
    if write:
        write_report(out_dir, rows, paper=paper, chance=chance)
    return rows, ours
