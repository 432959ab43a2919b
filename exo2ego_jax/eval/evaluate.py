"""EgoBench evaluation of a trained Exo2Ego model (method.md §6), resumable.

``evaluate(config)`` (``python main.py --config=configs/eval.py[:demo|:paper]``):

1. checks the config before any compute (missing stage workdirs, unknown tasks, batch sizes
   that the mesh cannot split) and loads every task's items (loaders never open videos, so
   a missing annotation file fails in seconds);
2. builds the mesh and, only if some item is still unscored, the stage-3 model: random init
   -> pretrained weights -> the four stage checkpoints (``runtime.load_trained``);
3. scores each task with its scorer (``eval/scoring.py``) inside the mesh / logical-rules
   context, so every batch is split over the data-parallel devices, appending predictions
   to ``<out_dir>/<task>.jsonl`` per chunk; a rerun scores only what is missing;
4. computes the metrics and writes ``results.md`` / ``results.csv`` (``report.summarize``),
   and logs the table.

Multi-host: every process loads the items and builds each whole batch (jit splits it over
the mesh); only process 0 writes files, so ``out_dir`` must be one shared directory (every
process reads it to agree on what is left to score).

Predictions of one ``out_dir`` must come from one setting: the scoring-relevant fields
(model, stage checkpoints, mode, prompt switches, EPIC subset) are recorded in
``<out_dir>/eval_settings.json`` and a rerun with different ones is refused.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from exo2ego_jax import config_lib, runtime
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.config_lib import ResolvedConfig
from exo2ego_jax.eval import report, scoring
from exo2ego_jax.runtime import Log, Trained
from exo2ego_jax.training import checkpoints
from input_pipeline import atomic, egobench
from input_pipeline.egobench import EvalItem, RetrievalBenchmark
from input_pipeline.progress import bar as progress_bar

Benchmark = list[EvalItem] | RetrievalBenchmark
MODES = ("loglik", "letters")
# Tasks whose items carry text options (letter mode applies); the rest always use loglik.
LETTER_TASKS = ("egoschema", "qaego4d_close", "egotaskqa", "egoplan", "vlnqa")
SETTINGS_FILE = "eval_settings.json"


# ----------------------------------------------------------------------------- config


def check_eval_config(config: ml_collections.ConfigDict) -> ResolvedConfig:
    """Fails fast, naming the field, on anything evaluation cannot run with; returns the
    resolved config."""
    e = config.eval
    unknown = [t for t in e.tasks if t not in egobench.TASKS]
    if unknown or not e.tasks:
        raise config_lib.ConfigError(
            f"config.eval.tasks={tuple(e.tasks)}: give some of {', '.join(egobench.TASKS)}"
        )
    if e.mode not in MODES:
        raise config_lib.ConfigError(f"config.eval.mode={e.mode!r}: use one of {MODES}")
    if not e.data_root or not Path(e.data_root).is_dir():
        raise config_lib.ConfigError(
            f"config.eval.data_root={e.data_root!r}: no such directory (the EgoBench root; "
            "the demo world is demo_data/world)"
        )
    if not e.out_dir:
        raise config_lib.ConfigError("config.eval.out_dir is empty")
    if e.max_items < 0 or e.retrieval_max_clips < 0:
        raise config_lib.ConfigError("config.eval.max_items / retrieval_max_clips must be >= 0")
    resolved = runtime.resolve_for_inference(config)
    mesh, rules = runtime.make_mesh_and_rules(resolved)
    ways = sharding_lib.batch_ways(mesh, rules)
    for field in ("batch_size", "row_batch"):
        value = e[field]
        if value < 1 or value % ways:
            # An uneven batch split is not an error in XLA:CPU but a crash of the compiler.
            raise config_lib.ConfigError(
                f"config.eval.{field}={value} must be a positive multiple of the {ways} "
                f"devices a batch is split over (mesh {dict(mesh.shape)})"
            )
    return resolved


def settings(config: ml_collections.ConfigDict) -> dict:
    """What the predictions of an ``out_dir`` depend on (compared on every rerun)."""
    e = config.eval
    stages = []
    for wd in config.init.stages:
        step, _ = checkpoints.read_meta(wd)
        stages.append({"workdir": str(Path(wd).absolute()), "step": step})
    return checkpoints.dump_json(
        {
            "model": config.model.to_dict(),
            "init": {"clip": config.init.clip, "llm": config.init.llm},
            "stages": stages,
            "mode": e.mode,
            "task_detail": e.task_detail,
            "first_person": e.first_person,
            "retrieval_max_clips": e.retrieval_max_clips,
            "open_max_new_tokens": e.open_max_new_tokens,
            "data_root": str(Path(e.data_root).absolute()),
        }
    )


def check_settings(out_dir: Path, current: dict) -> None:
    """Record ``current`` in ``out_dir``, or refuse if earlier predictions used others."""
    path = out_dir / SETTINGS_FILE
    if path.exists():
        before = json.loads(path.read_text())
        if before != current:
            keys = set(before) | set(current)
            changed = sorted(k for k in keys if before.get(k) != current.get(k))
            raise config_lib.ConfigError(
                f"{out_dir} holds predictions made with other settings ({', '.join(changed)} "
                "differ); set config.eval.out_dir to a new directory or delete the old one"
            )
        return
    if jax.process_index() != 0:  # one writer; atomic, so no process reads half a file
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(current, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- tasks


def load_benchmark(config: ml_collections.ConfigDict, task: str) -> Benchmark:
    """A task's items (``max_items`` of them) or EPIC MIR's (sub)benchmark."""
    e = config.eval
    kwargs = e.loader_kwargs[task].to_dict() if task in e.loader_kwargs else {}
    bench = egobench.load_task(task, e.data_root, **kwargs)
    if isinstance(bench, RetrievalBenchmark):
        return bench.subset(e.retrieval_max_clips or None)
    return list(bench[: e.max_items] if e.max_items else bench)


def _items(bench: Benchmark) -> Sequence[EvalItem]:
    return bench.clips if isinstance(bench, RetrievalBenchmark) else bench


def make_scorer(
    config: ml_collections.ConfigDict, task: str, bench: Benchmark, trained: Trained
) -> Callable[[Sequence[EvalItem]], list[dict]]:
    """``items -> predictions`` for ``task``, with the configured prompt and batch sizes."""
    e = config.eval
    common: dict[str, Any] = dict(
        task_detail=scoring.TASK_DETAILS[task] if e.task_detail else None,
        first_person=e.first_person,
        batch_size=e.batch_size,
        progress=False,  # one bar per task (evaluate) instead of one per call
    )
    loglik = dict(common, row_batch=e.row_batch)
    args = (trained.model, trained.params, trained.tokenizer)
    if task == "epic_mir":
        return lambda items: scoring.score_retrieval(*args, items, bench.sentences, **loglik)
    if task == "charades_ego":
        return lambda items: scoring.score_classes(*args, items, **loglik)
    if task == "qaego4d_open":
        return lambda items: scoring.answer_open(
            *args, items, max_new_tokens=e.open_max_new_tokens, **common
        )
    if e.mode == "letters" and task in LETTER_TASKS:
        return lambda items: scoring.answer_with_letters(*args, items, **common)
    return lambda items: scoring.score_multiple_choice(*args, items, **loglik)


def run_task(
    config: ml_collections.ConfigDict,
    task: str,
    bench: Benchmark,
    get_trained: Callable[[], Trained],
    *,
    progress: bool = True,
) -> tuple[list[dict], int]:
    """Scores the task's missing items; returns (all predictions, number newly scored)."""
    e = config.eval
    path = report.predictions_path(e.out_dir, task)
    items = _items(bench)
    done = {r["item_id"] for r in report.read_predictions(path)}
    todo = sum(it.item_id not in done for it in items)
    # The model is built only when something is left to score (a finished rerun never
    # loads it), and before the bar opens so its log lines do not cut through the bar.
    scorer = make_scorer(config, task, bench, get_trained()) if todo else None
    bar = progress_bar(
        total=len(items), initial=len(items) - todo, desc=task, unit="item", disable=not progress
    )
    synced = jax.process_count() == 1

    def score(chunk: Sequence[EvalItem]) -> list[dict]:
        nonlocal synced
        if not synced:  # every process has read the predictions before process 0 appends
            multihost_utils.sync_global_devices(f"eval {task}")
            synced = True
        out = scorer(chunk)
        bar.update(len(chunk))
        return out

    try:
        preds = report.run_resumable(
            path, items, score, chunk_size=4 * e.batch_size, write=jax.process_index() == 0
        )
    finally:
        bar.close()
    return preds, todo


def evaluate(
    config: ml_collections.ConfigDict, *, log: Log = print, progress: bool = True
) -> tuple[list[report.Row], dict[str, dict[str, float]]]:
    """Runs (or resumes) the EgoBench evaluation of ``config``; see the module docstring.

    Returns:
      the results table rows and ``{task: {metric: percent}}``.
    """
    resolved = check_eval_config(config)
    e = config.eval
    out_dir = Path(e.out_dir)
    primary = jax.process_index() == 0  # multi-host: one progress bar, one writer
    progress = progress and primary
    benches = {t: load_benchmark(config, t) for t in e.tasks}
    check_settings(out_dir, settings(config))
    log(
        "EgoBench: "
        + ", ".join(f"{t} {len(_items(b))}" for t, b in benches.items())
        + f" items; predictions in {out_dir}"
    )

    predictions: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as stack:
        trained: Trained | None = None

        def get_trained() -> Trained:
            nonlocal trained
            if trained is None:
                trained = runtime.load_trained(resolved, log=log)  # outside the mesh context
                stack.enter_context(trained.context())  # score inside it
            return trained

        for task, bench in benches.items():
            predictions[task], new = run_task(config, task, bench, get_trained, progress=progress)
            log(f"{task}: {new} scored, {len(predictions[task]) - new} from earlier runs")
    rows, metrics = report.summarize(
        out_dir, predictions, benches, paper=e.paper_column, chance=e.chance_column, write=primary
    )
    log(report.markdown_table(rows, paper=e.paper_column, chance=e.chance_column))
    log(f"results: {out_dir / 'results.md'}, {out_dir / 'results.csv'}")
    return rows, metrics
