r"""The Exo2Ego study at demo scale: baseline, full model, Table 3 ablations, stage curve.

::

    python -m exo2ego_jax.demo.study --config=configs/study.py [--quick] \
        [--config.seeds=0,1,2] [--config.arms=full,no_kl] [--plan]

For every seed of ``config.seeds`` and every arm of ``config.arms`` (``configs/study.py``:
``baseline`` ego-only, ``full`` Exo2Ego and one arm per ablation of method.md §6) the runner
trains the arm's stages on the demo pipeline (``demo.stage_config`` with the arm's
overrides, so the demo's defaults flow through) and evaluates the result on the synthetic
EgoBench (``demo.eval_config`` + ``evaluate.evaluate``); the stage curve evaluates the
``curve.arm`` after ``curve.after_stages``.

Sharing: a stage run is identified by a digest of its fully resolved config (paths aside)
and of the runs it starts from, and lives in ``<root>/seed<S>/stage<K>-<digest>``, so arms
with the same config prefix share it (stages 0-1 are common to ``full`` and every ablation;
``no_lora`` differs from ``full`` in stage 3 only). An evaluation is keyed the same way
(``<root>/seed<S>/eval-<digest>``; the ``full`` arm and the curve's stage-3 point are one).
The world, its datasets, the demo LM and the demo CLIP (``config.data_dir``: by default the
demo's, whose regime the default study shares) are shared by every arm and seed: seeds vary
model initialisation and data order only.

Resumable: a finished stage (its checkpoint meta says ``finished``) and a finished
evaluation (``study_metrics.json`` in its directory) are skipped with an
``already finished`` log line; an interrupted stage resumes from its last checkpoint and an
interrupted evaluation scores only the missing items.

Outputs in ``<root>``: ``results.md`` / ``results.csv`` / ``results.json`` (mean ± std over
seeds of each EgoBench task's headline score and of their average, per arm and per stage
curve point, beside the paper's Table 3 numbers), ``ablations.png`` and ``stage_curve.png``
(matplotlib), ``plan.json`` (every job and the arms using it) and ``timings.json`` (seconds
per job, used for the remaining-time estimate). ``--plan`` prints the jobs and that estimate
without running anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import demo as demo_configs
from configs import study as study_configs
from exo2ego_jax import config_lib
from exo2ego_jax.demo.study_data import data_dir_of, prepare_data
from exo2ego_jax.demo.study_groups import group_metrics, has_item_groups
from exo2ego_jax.demo.study_report import (
    AVERAGE,
    PAPER_AVERAGE,
    PAPER_CURVE_EGOSCHEMA,
    aggregate,
    chance_scores,
    format_score,
    paired_difference,
    paper_task_scores,
    results_csv,
    results_tables,
    task_scores,
    write_plots,
)
from exo2ego_jax.eval.evaluate import evaluate
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.loop import TrainingDivergedError, train
from exo2ego_jax.training.streams import dataset_for
from input_pipeline import atomic
from input_pipeline.pipeline import PipelineOptions, record_dataset
from input_pipeline.synthetic.egobench import loader_kwargs

Log = Callable[[str], None]

#: Where each evaluation split's EgoBench files live in the world (``config.eval.split``).
BENCH_PREFIX = {"test": "egobench", "val": "egobench_val"}
#: Errors that stop one job (recorded; the jobs depending on it are skipped).
RECOVERABLE = (config_lib.ConfigError, checkpoints.HandOffError, TrainingDivergedError)


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class StageJob:
    """One stage run, shared by every arm (of one seed) with the same config prefix."""

    seed: int
    stage: int
    key: str
    config: ml_collections.ConfigDict
    parents: tuple[str, ...]  # job ids this stage starts from (init.stages), in order
    arms: list[str] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return f"seed{self.seed}/stage{self.stage}-{self.key}"

    @property
    def workdir(self) -> Path:
        return Path(self.config.workdir)


@dataclasses.dataclass
class EvalJob:
    """One EgoBench evaluation (an arm's final model, or a stage-curve point)."""

    seed: int
    key: str
    config: ml_collections.ConfigDict
    needs: tuple[str, ...]  # stage job ids whose checkpoints it reads
    labels: list[str] = dataclasses.field(default_factory=list)

    @property
    def id(self) -> str:
        return f"seed{self.seed}/eval-{self.key}"

    @property
    def out_dir(self) -> Path:
        return Path(self.config.eval.out_dir)


@dataclasses.dataclass
class Plan:
    """Every job of the study, in run order, and which evaluation answers which question."""

    stages: dict[str, StageJob]
    evals: dict[str, EvalJob]
    order: list[str]  # stage and eval job ids, dependencies first
    arm_evals: dict[tuple[str, int], str]  # (arm, seed) -> eval job id
    curve_evals: dict[tuple[int, int], str]  # (after stage, seed) -> eval job id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (ConfigDicts and dicts alike)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping | ml_collections.ConfigDict):
            out.update(flatten(v, f"{path}."))
        else:
            out[path] = v
    return out


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def stage_overrides(config: ml_collections.ConfigDict, arm: str, stage: int, seed: int) -> dict:
    """The dotted overrides of ``arm``'s stage ``stage``: the study's for every arm (those
    set), the arm's, the study's schedule and the seed."""
    every = flatten(config.all_arms[f"stage{stage}"])
    out = {k: v for k, v in every.items() if v is not None}
    out.update(flatten(config.arm_defs[arm][f"stage{stage}"]))
    sched = config.optim[f"stage{stage}"]
    if sched.num_epochs > 0:
        out["optim.num_epochs"] = sched.num_epochs
    if sched.num_steps > 0:
        out["optim.num_steps"] = sched.num_steps
    out["seed"] = seed
    return out


def planned_steps(c: ml_collections.ConfigDict) -> int | None:
    """The optimizer updates ``training.loop.train`` runs for stage config ``c`` (its formula:
    epochs of the largest input stream), or None while the datasets are not prepared."""
    o = c.optim
    if o.num_steps > 0:
        return int(o.num_steps)
    if not Path(c.data.tokenizer).exists():  # prepare() builds it after every dataset
        return None
    stage = config_lib.build_stage_config(c.stage)
    opts = PipelineOptions(shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
    sizes = [
        len(record_dataset(n, c.data.prepared_dir, opts, dataset=dataset_for(n, stage, c))[0])
        for n in stage.batches
    ]
    return int(o.num_epochs * max(1, math.ceil(max(sizes) / o.batch_size)))


def reference_steps(
    config: ml_collections.ConfigDict, arm: str, stage: int, seed: int, seed_dir, data_dir
) -> int | None:
    """The updates ``arm``'s stage ``stage`` gets under ``steps_like``: the sum over the
    reference arm's stages ``steps_of.stage<stage>`` that it trains (None when none of them
    is trained or the datasets are not prepared yet)."""
    spec = config.arm_defs[arm]
    ref_arm = config.arm_defs[spec.steps_like]
    total = 0
    wanted = spec.steps_of[f"stage{stage}"] if "steps_of" in spec else (stage,)
    ref_stages = [j for j in wanted if j in ref_arm.stages]
    for j in ref_stages:
        ref = stage_overrides(config, spec.steps_like, j, seed)
        steps = planned_steps(demo_configs.stage_config(j, seed_dir, data_dir, **ref))
        if steps is None:
            return None
        total += steps
    return total or None


def make_plan(config: ml_collections.ConfigDict) -> Plan:
    """Resolves every stage run and evaluation of the study (nothing is run or read)."""
    root, data_dir = Path(config.root), data_dir_of(config)
    unknown = [a for a in (*config.arms, config.curve.arm) if a not in config.arm_defs]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; config.arm_defs has {list(config.arm_defs)}")
    stage_jobs: dict[str, StageJob] = {}
    eval_jobs: dict[str, EvalJob] = {}
    order: list[str] = []
    arm_evals: dict[tuple[str, int], str] = {}
    curve_evals: dict[tuple[int, int], str] = {}

    def add_eval(seed, label, chain, model_overrides) -> str:
        seed_dir = root / f"seed{seed}"
        c = demo_configs.eval_config(seed_dir, data_dir)
        c.seed = seed
        c.init.stages = tuple(str(stage_jobs[j].workdir) for j in chain)
        c.update_from_flattened_dict(model_overrides)
        e = config.eval
        c.eval.max_items, c.eval.retrieval_max_clips = e.max_items, e.retrieval_max_clips
        if e.tasks:
            c.eval.tasks = tuple(e.tasks)
        split = e.get("split", "test")
        if split not in BENCH_PREFIX:
            raise ValueError(f"config.eval.split={split!r}; use one of {list(BENCH_PREFIX)}")
        if split != "test":  # the validation takes' EgoBench files (tuning only)
            c.eval.loader_kwargs = ml_collections.ConfigDict(loader_kwargs(BENCH_PREFIX[split]))
        ident = c.to_dict()
        ident["eval"].pop("out_dir")
        key = _digest(ident)
        c.eval.out_dir = c.workdir = str(seed_dir / f"eval-{key}")
        job = eval_jobs.setdefault(f"seed{seed}/eval-{key}", EvalJob(seed, key, c, tuple(chain)))
        if label not in job.labels:
            job.labels.append(label)
        if job.id not in order:
            order.append(job.id)
        return job.id

    arms = list(config.arms)
    if config.curve.after_stages and config.curve.arm not in arms:
        arms.append(config.curve.arm)  # the curve needs its arm's stages (not its table row)
    for seed in config.seeds:
        seed_dir = root / f"seed{seed}"
        for arm in arms:
            spec = config.arm_defs[arm]
            chain: list[str] = []
            prefix_models: dict[int, dict] = {}
            for k in spec.stages:
                overrides = stage_overrides(config, arm, k, seed)
                if spec.steps_like:
                    # As many updates as the reference arm's stages (not the same epochs:
                    # the ego-only stage 0 reads the ego data alone).
                    steps = reference_steps(config, arm, k, seed, seed_dir, data_dir)
                    if steps is not None:
                        overrides["optim.num_steps"] = steps
                c = demo_configs.stage_config(k, seed_dir, data_dir, **overrides)
                c.init.stages = tuple(str(stage_jobs[j].workdir) for j in chain)
                ident = c.to_dict()
                ident.pop("workdir")
                ident["init"].pop("stages")
                key = _digest({"config": ident, "parents": [stage_jobs[j].key for j in chain]})
                c.workdir = str(seed_dir / f"stage{k}-{key}")
                job = stage_jobs.setdefault(
                    f"seed{seed}/stage{k}-{key}", StageJob(seed, k, key, c, tuple(chain))
                )
                if arm not in job.arms:
                    job.arms.append(arm)
                if job.id not in order:
                    order.append(job.id)
                chain.append(job.id)
                prefix_models[k] = {p: v for p, v in overrides.items() if p.startswith("model.")}
            last = spec.stages[-1]
            if arm in config.arms:
                arm_evals[(arm, seed)] = add_eval(seed, arm, chain, prefix_models[last])
            if arm != config.curve.arm:
                continue
            for after in config.curve.after_stages:
                if after not in spec.stages:
                    raise ValueError(
                        f"config.curve.after_stages has {after}; arm {arm!r} trains {spec.stages}"
                    )
                n = list(spec.stages).index(after) + 1
                model = dict(prefix_models[after])
                if after < 3:  # the model as that stage left it: LoRA comes with stage 3
                    model["model.lora.enabled"] = False
                if after < 2:  # F is trained from stage 2 on
                    model["model.fusion"] = config.curve.pre_mapping_fusion
                label = f"after stage {after}"
                curve_evals[(after, seed)] = add_eval(seed, label, chain[:n], model)
    return Plan(stage_jobs, eval_jobs, order, arm_evals, curve_evals)


def plan_json(plan: Plan) -> dict:
    """What ``plan.json`` records: every job, what it starts from and who uses it."""
    return {
        "stages": {
            j.id: {"stage": j.stage, "arms": j.arms, "parents": list(j.parents)}
            for j in plan.stages.values()
        },
        "evals": {j.id: {"labels": j.labels, "stages": list(j.needs)} for j in plan.evals.values()},
        "order": plan.order,
    }


def write_results(
    config: ml_collections.ConfigDict,
    plan: Plan,
    done: Mapping[str, dict],
    errors: Mapping[str, str],
    chance: Mapping[str, float | None] | None,
    *,
    plots: bool = True,
) -> dict:
    """Aggregates the finished evaluations and writes results.md / .csv / .json (+ PNGs)."""
    root = Path(config.root)
    # section ("all", then each item group) -> arm -> seed -> scores
    per_section: dict[str, dict[str, dict[int, dict]]] = {}
    for (arm, seed), job_id in plan.arm_evals.items():
        for section, scores in done.get(job_id, {}).items():
            per_section.setdefault(section, {}).setdefault(arm, {})[seed] = scores
    per_arm = per_section.pop("all", {})
    per_curve: dict[int, dict[int, dict]] = {}
    for (after, seed), job_id in sorted(plan.curve_evals.items()):
        if job_id in done:
            per_curve.setdefault(after, {})[seed] = done[job_id]["all"]
    ddof = config.eval.std_ddof

    def in_order(per: Mapping[str, dict]) -> dict[str, dict]:
        aggregated = aggregate(per, ddof)
        return {a: aggregated[a] for a in config.arms if a in aggregated}  # config order

    arms = in_order(per_arm)
    groups = {g: in_order(per) for g, per in per_section.items()}
    comparisons = {}
    if "full" in config.arms and "baseline" in config.arms:
        for section, per in (("all", per_arm), *per_section.items()):
            comparisons[section] = paired_difference(per, "full", "baseline", ddof)
    curve = dict(sorted(aggregate(per_curve, ddof).items()))
    seeds = list(config.seeds)
    tables = results_tables(config, arms, curve, chance, seeds, groups, comparisons)
    atomic.write_text(root / "results.md", tables)
    atomic.write_text(root / "results.csv", results_csv(arms, curve, groups))
    payload = {
        "seeds": seeds,
        "arms": arms,
        "groups": groups,
        "full_minus_baseline": comparisons,
        "curve": {str(k): v for k, v in curve.items()},
        "per_seed": {
            "arms": per_arm,
            "groups": per_section,
            "curve": {str(k): v for k, v in per_curve.items()},
        },
        "chance": chance,
        "paper": {
            "average": PAPER_AVERAGE,
            "full_per_task": paper_task_scores(),
            "curve_egoschema": PAPER_CURVE_EGOSCHEMA,
        },
        "errors": dict(errors),
    }
    atomic.write_text(root / "results.json", json.dumps(payload, indent=2, default=str))
    if plots:
        try:
            write_plots(root, arms, curve, chance)
        except ImportError:  # matplotlib is optional: the tables are the result
            logging.warning("matplotlib is not installed: no plots")
    return payload


# ----------------------------------------------------------------------------- run


class Timings:
    """``<root>/timings.json``: seconds of every finished job, and remaining-time estimates."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, dict] = json.loads(path.read_text()) if path.exists() else {}

    def record(self, job_id: str, kind: str, seconds: float, **extra: Any) -> None:
        self.data[job_id] = {"kind": kind, "seconds": round(seconds, 1), **extra}
        atomic.write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True))

    def kind_of(self, plan: Plan, job_id: str) -> str:
        return f"stage{plan.stages[job_id].stage}" if job_id in plan.stages else "eval"

    def estimate(self, plan: Plan, remaining: Sequence[str]) -> float | None:
        """Seconds the ``remaining`` jobs take, from the mean of finished jobs of each kind
        (None while some kind has no measurement yet)."""
        by_kind: dict[str, list[float]] = {}
        for t in self.data.values():
            by_kind.setdefault(t["kind"], []).append(t["seconds"])
        total = 0.0
        for job_id in remaining:
            seconds = by_kind.get(self.kind_of(plan, job_id))
            if not seconds:
                return None
            total += float(np.mean(seconds))
        return total


def _stage_finished(workdir: Path) -> bool:
    try:
        _, meta = checkpoints.read_meta(workdir)
    except checkpoints.HandOffError:
        return False
    return bool(meta.get("finished"))


def _eval_finished(job: EvalJob) -> dict | None:
    path = job.out_dir / "study_metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def job_done(plan: Plan, job_id: str) -> bool:
    if job_id in plan.stages:
        return _stage_finished(plan.stages[job_id].workdir)
    return _eval_finished(plan.evals[job_id]) is not None


def run_stage(job: StageJob, *, log: Log, progress: bool) -> dict | None:
    """Trains one stage run (resuming it if interrupted); None if it was already finished."""
    if _stage_finished(job.workdir):
        log(f"[study] {job.id} ({', '.join(job.arms)}): already finished")
        return None
    log(f"[study] {job.id}: training stage {job.stage} for {', '.join(job.arms)}")
    job.workdir.mkdir(parents=True, exist_ok=True)
    (job.workdir / "study_config.json").write_text(job.config.to_json_best_effort(indent=2))
    summary = train(job.config, job.workdir, log=logging.info, progress=progress)
    if summary["first_loss"] is not None:
        log(
            f"[study] {job.id}: {summary['steps']} steps, loss {summary['first_loss']:.3f} -> "
            f"{summary['last_loss']:.3f}"
        )
    return summary


def run_eval(job: EvalJob, *, log: Log, progress: bool) -> dict[str, dict]:
    """Evaluates (or resumes) one model; returns its task scores on all items (``"all"``)
    and, in a world with transfer concepts, on each item group (``"transfer"``, ``"seen"``)."""
    done = _eval_finished(job)
    if done is not None:
        log(f"[study] {job.id} ({', '.join(job.labels)}): already finished")
        return {"all": done["scores"], **done.get("groups", {})}
    log(f"[study] {job.id}: evaluating {', '.join(job.labels)}")
    _, metrics = evaluate(job.config, log=logging.info, progress=progress)
    scores = task_scores(metrics)
    groups = {}
    if has_item_groups(job.config):
        groups = {g: task_scores(m) for g, m in group_metrics(job.config).items()}
    record = {"labels": job.labels, "scores": scores, "groups": groups, "metrics": metrics}
    atomic.write_text(job.out_dir / "study_metrics.json", json.dumps(record, indent=2))
    by_group = "".join(f", {g} {format_score(v[AVERAGE])}" for g, v in groups.items())
    log(f"[study] {job.id}: average {format_score(scores[AVERAGE])}{by_group}")
    return {"all": scores, **groups}


def use_compilation_cache(config: ml_collections.ConfigDict) -> None:
    """A persistent XLA cache: arms and seeds compile the same train / scoring programs
    (only values differ), so most jobs skip compilation. An already configured cache (e.g.
    the test suite's) is left alone."""
    if not config.compilation_cache or jax.config.jax_compilation_cache_dir:
        return
    path = Path(config.compilation_cache.replace("<root>", str(config.root)))
    jax.config.update("jax_compilation_cache_dir", str(path.absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(config: ml_collections.ConfigDict, *, log: Log = print, progress: bool = False) -> dict:
    """Runs (or resumes) the whole study; returns the ``results.json`` payload.

    A job that fails with a configuration / hand-off / divergence error is recorded in
    ``payload["errors"]`` (and the jobs needing it are skipped); the rest still run.
    """
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's INFO chatter
    t0 = time.time()
    root = Path(config.root)
    root.mkdir(parents=True, exist_ok=True)
    use_compilation_cache(config)
    prepare_data(config, log=log)
    plan = make_plan(config)
    atomic.write_text(root / "plan.json", json.dumps(plan_json(plan), indent=2))
    timings = Timings(root / "timings.json")
    log(
        f"[study] {len(plan.stages)} stage runs and {len(plan.evals)} evaluations for seeds "
        f"{list(config.seeds)} and arms {list(config.arms)} in {root}"
    )
    chance = None
    if plan.evals:  # every evaluation reads the same items
        chance = chance_scores(next(iter(plan.evals.values())).config)

    errors: dict[str, str] = {}
    done: dict[str, dict] = {}
    for i, job_id in enumerate(plan.order):
        is_stage = job_id in plan.stages
        needs = plan.stages[job_id].parents if is_stage else plan.evals[job_id].needs
        failed = [j for j in needs if j in errors]
        if failed:
            errors[job_id] = f"skipped: needs {failed[0]}, which failed"
            log(f"[study] {job_id}: {errors[job_id]}")
            continue
        t, cpu = time.time(), time.process_time()
        try:
            if is_stage:
                summary = run_stage(plan.stages[job_id], log=log, progress=progress)
                if summary is not None and summary["first_loss"] is not None:
                    timings.record(
                        job_id,
                        timings.kind_of(plan, job_id),
                        time.time() - t,
                        cpu_seconds=round(time.process_time() - cpu, 1),
                        steps=summary["steps"] - summary.get("start_step", 0),
                    )
            else:
                fresh = _eval_finished(plan.evals[job_id]) is None
                done[job_id] = run_eval(plan.evals[job_id], log=log, progress=progress)
                if fresh:
                    cpu_seconds = round(time.process_time() - cpu, 1)
                    timings.record(job_id, "eval", time.time() - t, cpu_seconds=cpu_seconds)
                write_results(config, plan, done, errors, chance, plots=False)
        except RECOVERABLE as e:
            errors[job_id] = f"{type(e).__name__}: {e}"
            log(f"[study] {job_id} FAILED: {errors[job_id]}")
            continue
        if job_id not in timings.data:
            continue  # nothing ran (finished earlier): no news for the estimate
        left = [j for j in plan.order[i + 1 :] if j not in errors]
        eta = timings.estimate(plan, [j for j in left if not job_done(plan, j)])
        if eta is not None and left:
            log(f"[study] estimated remaining: {eta / 60:.1f} min")
    payload = write_results(config, plan, done, errors, chance, plots=config.eval.plots)
    payload["seconds"] = time.time() - t0
    log((root / "results.md").read_text())
    log(f"[study] finished in {payload['seconds'] / 60:.1f} min; results in {root}")
    if errors:
        log(f"[study] {len(errors)} job(s) failed or were skipped: see results.json 'errors'")
    return payload


def describe_plan(config: ml_collections.ConfigDict, *, log: Log = print) -> Plan:
    """``--plan``: the jobs (done or not, and who uses them) and the remaining-time estimate."""
    plan = make_plan(config)
    timings = Timings(Path(config.root) / "timings.json")
    todo = []
    for job_id in plan.order:
        done = job_done(plan, job_id)
        todo += [] if done else [job_id]
        users = plan.stages[job_id].arms if job_id in plan.stages else plan.evals[job_id].labels
        log(f"{'done' if done else 'todo'}  {job_id:<32} {', '.join(users)}")
    kinds: dict[str, int] = {}
    for job_id in plan.order:
        kinds[timings.kind_of(plan, job_id)] = kinds.get(timings.kind_of(plan, job_id), 0) + 1
    log(f"jobs per kind: {dict(sorted(kinds.items()))}; {len(todo)} to do")
    eta = timings.estimate(plan, todo)
    if eta is None:
        log("no estimate: some kind of job has no timing in timings.json yet")
    else:
        log(f"estimated remaining: {eta / 60:.1f} min (means of {timings.path})")
    return plan


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if flags.FLAGS.quick:
        # The quick preset, then the command line's --config.* overrides on top of it.
        config = study_configs.get_config("quick")
        config.update_from_flattened_dict(config_flags.get_override_values(flags.FLAGS["config"]))
    logging.getLogger().setLevel(logging.WARNING)
    if flags.FLAGS.plan:
        describe_plan(config)
        return
    payload = run(config, progress=flags.FLAGS.progress)
    if payload["errors"]:
        raise SystemExit(1)


def _define_flags() -> None:
    config_flags.DEFINE_config_file("config", "configs/study.py", "Study config file.")
    flags.DEFINE_bool("quick", False, "Run the quick preset (one seed, baseline + full, tiny).")
    flags.DEFINE_bool("plan", False, "Print the jobs and the time estimate; run nothing.")
    flags.DEFINE_bool("progress", True, "Progress bars of training and evaluation.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
