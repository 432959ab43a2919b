"""Why Exo2Ego wins or loses in the study: docs/study.md's diagnostics, each a number.

``python -m exo2ego_jax.demo.study_diagnostics --config=configs/study.py`` (the study's own
config and flags) reads a finished study and, per seed, measures on its test takes:

* **mapping**: on the held-out takes seen from both views (the exo view rendered from a fixed
  rig by :mod:`exo2ego_jax.demo.held_out_views`), how close ``F(x)`` comes to ``y`` against
  ``x`` itself and against the ``y`` of a clip of another take: relative L2
  ``‖a − y‖ / ‖y‖`` and stage 2's KL (per token, mean). The same on pair takes F trained on,
  for the final model and for the model as stage 2 left it (stage 3 trains F and E_ego by
  VTG alone).
* **probe**: a linear probe of each transfer concept, with two labels per clip (an object
  of that colour / shape is on the table; the step acts on one), from the mean-pooled tokens
  ``y``, ``F(x)`` and ``x`` of the full model, ``x`` of the baseline's, and the CLIP
  features each connector reads (exo view through E_exo's tower, ego view through E_ego's),
  with cross-validation over takes; balanced accuracy (chance 50).
* **losses**: stage 2's VTG, KL and CCL of the full arm, first and last logged values.
* **exo view**: EgoBench on the same held-out items shown from the exo rig and read by
  ``E_exo`` alone (``y`` replaces ``<video>``, as stage 1 trained the LLM), beside the ego
  view's score of the full model and the baseline's; for the final model and the model
  after stage 2 (the LLM E_exo was trained to talk to, without stage 3's LoRA).

Writes ``<root>/diagnostics/diagnostics.json`` and ``diagnostics.md``; rendered views and
exo-view predictions are kept there, so a rerun only recomputes the features. With
``--config.eval.split=val`` the held-out takes are the validation takes (the only split a
change may be chosen on), under ``<root>/diagnostics_val/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax import losses, runtime
from exo2ego_jax.demo import held_out_views as views
from exo2ego_jax.demo.study import Plan, make_plan
from exo2ego_jax.demo.study_data import data_dir_of
from exo2ego_jax.demo.study_groups import GROUPS, group_metrics
from exo2ego_jax.demo.study_report import AVERAGE, format_score, mean_std, task_scores
from exo2ego_jax.eval import report, scoring
from exo2ego_jax.eval.evaluate import check_eval_config, load_benchmark, run_task
from exo2ego_jax.models import clip as clip_lib
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.runtime import Trained
from input_pipeline import atomic
from input_pipeline.egobench.items import Clip
from input_pipeline.synthetic.takes import EGO_CAMERA

Log = Callable[[str], None]
STAGE2_LOSSES = ("vtg", "kl", "ccl", "loss")


class ExoViewModel(Exo2Ego):
    """The model reading each clip with ``E_exo``: ``y`` alone replaces ``<video>``."""

    def ego_visual_tokens(self, params, frames, fusion=None):
        y = self.encode_exo(params, frames)
        return y, y, None


def exo_view(trained: Trained) -> Trained:
    """``trained`` with the same weights, scoring clips as exo views (:class:`ExoViewModel`)."""
    config = dataclasses.replace(trained.model.config, fusion="x_only")  # S visual tokens
    return dataclasses.replace(trained, model=ExoViewModel(config))


# ----------------------------------------------------------------------------- features


def encode_clips(
    trained: Trained, clips: Sequence[views.StepClip], *, batch_size: int = 8
) -> dict[str, np.ndarray]:
    """``{"x", "fx", "y"}`` (those the model has) of every clip: ``float32[N, S, D]``; and
    ``{"clip_x", "clip_y"}``: the CLIP features the connectors read (``select_layer``),
    averaged over frames and patches, ``float32[N, 1, C]``.

    Call inside ``trained.context()``. The last batch is padded (one compiled program)."""
    model, params = trained.model, trained.params
    frames_of = scoring.clip_frames_fn(model.config)
    with_exo, with_f = "exo_encoder" in params, "F" in params

    def pooled_clip(encoder, frames):  # [B, T, P, C] -> [B, 1, C]
        feats = clip_lib.clip_features(
            model.config.clip, params[encoder]["clip"], frames, model.config.select_layer
        )
        return feats.mean(axis=(1, 2))[:, None, :]

    @jax.jit
    def encode(params, ego, exo):
        x = model.encode_ego(params, ego)
        out = {"x": x, "clip_x": pooled_clip("ego_encoder", ego)}
        if with_f:
            out["fx"] = model.map_ego_to_exo(params, x)
        if with_exo:
            out["y"] = model.encode_exo(params, exo)
            out["clip_y"] = pooled_clip("exo_encoder", exo)
        return out

    chunks: list[dict] = []
    for i in range(0, len(clips), batch_size):
        part = list(clips[i : i + batch_size])
        n = len(part)
        part += [part[-1]] * (batch_size - n)
        ego = np.stack([frames_of(Clip(c.ego, c.start, c.end)) for c in part])
        exo = np.stack([frames_of(Clip(c.exo, c.start, c.end)) for c in part]) if with_exo else ego
        out = jax.device_get(encode(params, ego, exo))
        chunks.append({k: np.asarray(v[:n], np.float32) for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def other_take_order(takes: Sequence[str]) -> np.ndarray:
    """For each clip, the index of a clip of another take (the list rolled by half its
    length, moved on where that lands in the same take)."""
    n = len(takes)
    order = np.roll(np.arange(n), n // 2)
    for i in range(n):
        start = int(order[i])
        others = [(start + k) % n for k in range(n) if takes[(start + k) % n] != takes[i]]
        if not others:
            raise ValueError("every clip belongs to one take: no other take to compare with")
        order[i] = others[0]
    return order


def mapping_distances(feats: Mapping[str, np.ndarray], takes: Sequence[str]) -> dict:
    """How close ``F(x)`` comes to ``y`` (same clip) against ``x`` and against another take's
    ``y``, and how far apart the ``y`` of two takes are: ``{"rel_l2": {...}, "kl": {...}}``,
    means over clips; and the scale of each of ``x``, ``F(x)``, ``y``: ``"token_norm"`` (mean
    L2 norm of a token) and ``"spread"`` (mean ``‖a_i − ā‖ / ‖ā‖``, ``ā`` the mean clip: how
    much the tokens vary between clips, 0 for a constant)."""
    x, fx, y = feats["x"], feats["fx"], feats["y"]
    other = y[other_take_order(takes)]

    def rel_l2(a, b):
        return float(np.mean(np.linalg.norm(a - b, axis=(1, 2)) / np.linalg.norm(b, axis=(1, 2))))

    def kl(target, a):
        return float(jnp.mean(losses.kl_per_token(jnp.asarray(target), jnp.asarray(a))))

    pairs = {
        "F(x) vs y": (fx, y),
        "x vs y": (x, y),
        "F(x) vs another take's y": (fx, other),
        "another take's y vs y": (other, y),  # how much y itself varies between clips
    }
    named = {"x": x, "F(x)": fx, "y": y}
    return {
        "rel_l2": {k: rel_l2(a, b) for k, (a, b) in pairs.items()},
        "kl": {k: kl(b, a) for k, (a, b) in pairs.items()},
        "token_norm": {k: float(np.linalg.norm(a, axis=-1).mean()) for k, a in named.items()},
        "spread": {k: rel_l2(a, np.broadcast_to(a.mean(0), a.shape)) for k, a in named.items()},
    }


def probe_accuracy(
    feats: np.ndarray,
    labels: Sequence[bool],
    takes: Sequence[str],
    *,
    folds: int = 4,
    ridge: float = 1.0,
) -> float | None:
    """Balanced accuracy (percent) of a ridge linear probe ``feats float[N, D] -> labels``
    (one label per clip), cross-validated over ``folds`` groups of takes: a take's clips are
    never split, and takes with a positive clip and takes without are dealt to the folds
    separately, so each fold has both. None if either kind has < ``folds`` takes."""
    labels = np.asarray(labels, bool)
    positive: dict[str, bool] = {}
    for t, lab in zip(takes, labels, strict=True):
        positive[t] = positive.get(t, False) or bool(lab)
    by_kind = [sorted(t for t, pos in positive.items() if pos == c) for c in (True, False)]
    if min(len(b) for b in by_kind) < folds:
        return None
    fold_of = {t: k % folds for b in by_kind for k, t in enumerate(b)}
    fold = np.asarray([fold_of[t] for t in takes])
    target = np.where(labels, 1.0, -1.0)
    pred = np.zeros(len(labels), bool)
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = feats[tr].mean(0), feats[tr].std(0) + 1e-6
        a = np.c_[(feats[tr] - mu) / sd, np.ones(tr.sum())]
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ target[tr])
        pred[te] = np.c_[(feats[te] - mu) / sd, np.ones(te.sum())] @ w > 0
    tpr = np.mean(pred[labels]) if labels.any() else 0.0
    tnr = np.mean(~pred[~labels]) if (~labels).any() else 0.0
    return float(50.0 * (tpr + tnr))


# The probe's two labels of a clip (held_out_views.StepClip): the take's table holds an object
# of the concept, or the step acts on one (what its narration, and a question about it, name).
PROBE_LABELS = {"on the table": "labels", "acted on": "step_labels"}


def probes(features: Mapping[str, np.ndarray], clips: Sequence[views.StepClip]) -> dict:
    """``{"<concept> (<label kind>)": {feature name: balanced accuracy}}`` on mean-pooled
    tokens, for each label kind of :data:`PROBE_LABELS`."""
    takes = [c.take for c in clips]
    out = {}
    for kind, field in PROBE_LABELS.items():
        for concept in getattr(clips[0], field):
            labels = [getattr(c, field)[concept] for c in clips]
            out[f"{concept} ({kind})"] = {
                name: probe_accuracy(f.mean(axis=1), labels, takes) for name, f in features.items()
            }
    return out


# ----------------------------------------------------------------------------- the rest


def loss_curve(workdir: Path) -> dict[str, dict[str, float]]:
    """Stage losses of ``workdir/metrics.jsonl``: ``{name: {"first", "last", "first_step",
    "last_step"}}`` for each of :data:`STAGE2_LOSSES` that was logged."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for name in STAGE2_LOSSES:
        got = [(r["step"], r[name]) for r in rows if name in r]
        if got:
            out[name] = {
                "first": got[0][1],
                "last": got[-1][1],
                "first_step": got[0][0],
                "last_step": got[-1][0],
            }
    return out


def exo_view_scores(
    eval_config: ml_collections.ConfigDict, exo_world: Path, out_dir: Path, trained: Trained
) -> dict[str, dict]:
    """EgoBench task scores of ``trained`` read as exo views on ``exo_world``'s items:
    ``{"all": ..., "transfer": ..., "seen": ...}`` (predictions kept in ``out_dir``)."""
    c = ml_collections.ConfigDict(eval_config.to_dict())
    c.eval.data_root = str(exo_world)
    c.eval.out_dir = c.workdir = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    view = exo_view(trained)
    benches = {t: load_benchmark(c, t) for t in c.eval.tasks}
    preds = {t: run_task(c, t, b, lambda: view, progress=False)[0] for t, b in benches.items()}
    _, metrics = report.summarize(
        out_dir, preds, benches, paper=c.eval.paper_column, chance=c.eval.chance_column
    )
    return {"all": task_scores(metrics), **{g: task_scores(m) for g, m in group_metrics(c).items()}}


def _study_scores(job_id: str, plan: Plan) -> dict[str, dict]:
    """The study's own scores of an evaluation (``study_metrics.json``): ``{"all", groups}``,
    or ``{}`` when the study has not run it (e.g. on the validation split)."""
    path = plan.evals[job_id].out_dir / "study_metrics.json"
    if not path.exists():
        return {}
    rec = json.loads(path.read_text())
    return {"all": rec["scores"], **rec.get("groups", {})}


def _stage_workdir(plan: Plan, arm: str, seed: int, stage: int) -> Path:
    job = plan.evals[plan.arm_evals[(arm, seed)]]
    return next(plan.stages[j].workdir for j in job.needs if plan.stages[j].stage == stage)


def _full_models(plan: Plan, seed: int) -> dict[str, str]:
    """The full arm's evaluated models: ``{"final": job id}``, and ``"after stage 2"`` (F and
    E_ego as stage 2 left them, the LLM without stage 3's LoRA) when the study's stage curve
    has it."""
    models = {"final": plan.arm_evals[("full", seed)]}
    if (2, seed) in plan.curve_evals:
        models["after stage 2"] = plan.curve_evals[(2, seed)]
    return models


def diagnose_seed(
    plan: Plan,
    seed: int,
    split: str,
    clips: Mapping[str, list[views.StepClip]],
    exo_world: Path,
    out: Path,
    *,
    log: Log = print,
) -> dict[str, Any]:
    """Every diagnostic of one seed's full and baseline arms (see the module docstring)."""
    mapping, feats, egobench = {}, {}, {}
    takes = {part: [c.take for c in cl] for part, cl in clips.items()}
    for name, job_id in _full_models(plan, seed).items():
        cfg = plan.evals[job_id].config
        trained = runtime.load_trained(check_eval_config(cfg), log=logging.info)
        with trained.context():
            feats[name] = {part: encode_clips(trained, cl) for part, cl in clips.items()}
            log(f"[diagnostics] seed {seed}: exo-view EgoBench of full ({name})")
            # Named by the model's own evaluation (its config's digest): the predictions kept
            # there are reused by a rerun of the same model, never by a changed one.
            exo_dir = out / f"seed{seed}" / f"exo_view_{plan.evals[job_id].out_dir.name}"
            exo = exo_view_scores(cfg, exo_world, exo_dir, trained)
        del trained
        mapping[name] = {p: mapping_distances(f, takes[p]) for p, f in feats[name].items()}
        egobench[f"full ({name}), ego view"] = _study_scores(job_id, plan)
        egobench[f"full ({name}), exo view (E_exo alone)"] = exo
    base_id = plan.arm_evals[("baseline", seed)]
    trained = runtime.load_trained(check_eval_config(plan.evals[base_id].config), log=logging.info)
    with trained.context():
        base = encode_clips(trained, clips[split])
    del trained
    egobench["baseline, ego view"] = _study_scores(base_id, plan)
    held = feats["final"][split]
    named = {
        "y": held["y"],
        "F(x)": held["fx"],
        "x": held["x"],
        "baseline x": base["x"],
        "E_exo CLIP, exo view": held["clip_y"],
        "E_ego CLIP, ego view": held["clip_x"],
    }
    return {
        "mapping": mapping,
        "probe": probes(named, clips[split]),
        "stage2_losses": loss_curve(_stage_workdir(plan, "full", seed, 2)),
        "egobench": egobench,
    }


def run(config: ml_collections.ConfigDict, *, log: Log = print, pair_takes: int = 24) -> dict:
    """Diagnostics of every seed of the finished study ``config``; writes the JSON and the
    markdown report under ``<root>/diagnostics/`` (``diagnostics_val/`` on the validation
    split)."""
    missing = [a for a in ("full", "baseline") if a not in config.arms]
    if missing:
        raise ValueError(f"the diagnostics compare full with baseline; config.arms lacks {missing}")
    plan = make_plan(config)
    world = data_dir_of(config) / "world"
    split = config.eval.get("split", "test")  # the study's: held-out test or validation takes
    takes_split = {"test": "heldout", "val": "val"}[split]
    out = Path(config.root) / ("diagnostics" if split == "test" else f"diagnostics_{split}")
    log(f"[diagnostics] rendering the {split} takes' exo views under {out}")
    exo_world = views.exo_view_world(world, out / "exo_world", split=takes_split)
    held_out = views.world_takes(world, takes_split)  # sampled once, used twice
    exo_videos = {t.uid: exo_world / t.videos[EGO_CAMERA] for t in held_out}
    pairs = views.world_takes(world, "pairs")[:pair_takes]
    pair_videos = views.render_views(world, pairs, out / "pair_views")
    clips = {
        split: views.step_clips(world, held_out, exo_videos),
        "pairs": views.step_clips(world, pairs, pair_videos),
    }
    per_seed = {}
    for seed in config.seeds:
        log(f"[diagnostics] seed {seed}: features, probes and losses")
        per_seed[seed] = diagnose_seed(plan, seed, split, clips, exo_world, out, log=log)
    payload = {
        "split": split,
        "clips": {s: len(c) for s, c in clips.items()},
        "camera": views.DEFAULT_CAMERA,
        "seeds": {str(s): v for s, v in per_seed.items()},
    }
    atomic.write_text(out / "diagnostics.json", json.dumps(payload, indent=2))
    atomic.write_text(out / "diagnostics.md", markdown(payload))
    log(f"[diagnostics] wrote {out / 'diagnostics.md'}")
    return payload


# ----------------------------------------------------------------------------- report


def _cell(values: Sequence[float | None], digits: int = 2) -> str:
    s = mean_std([v for v in values if v is not None])
    if s["mean"] is None:
        return "n/a"
    sd = f" ± {s['std']:.{digits}f}" if s["std"] is not None else ""
    return f"{s['mean']:.{digits}f}{sd}"


def markdown(payload: Mapping[str, Any]) -> str:
    """The report: mean ± sd over seeds of every number (per-seed values in the JSON)."""
    seeds = list(payload["seeds"].values())
    n, split = len(seeds), payload["split"]
    lines = [
        f"# Study diagnostics ({n} seeds; mean ± sd over seeds)",
        "",
        f"Clips: {payload['clips'][split]} object steps of the held-out {split} takes, "
        f"{payload['clips']['pairs']} of pair takes; exo views from `{payload['camera']}`.",
        "",
        "## How close F(x) comes to y",
        "",
        f"| model | comparison | rel. L2, {split} | KL, {split} | rel. L2, pairs | KL, pairs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model in seeds[0]["mapping"]:
        for name in seeds[0]["mapping"][model][split]["rel_l2"]:
            cells = [
                _cell([s["mapping"][model][part][m][name] for s in seeds], 3)
                for part in (split, "pairs")
                for m in ("rel_l2", "kl")
            ]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    lines += ["", f"## Scale of the tokens ({split} takes)", ""]
    lines += ["| model | tokens | token norm | spread between clips |", "|---|---|---:|---:|"]
    for model in seeds[0]["mapping"]:
        for name in seeds[0]["mapping"][model][split]["token_norm"]:
            cells = [
                _cell([s["mapping"][model][split][m][name] for s in seeds], 3)
                for m in ("token_norm", "spread")
            ]
            lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Linear probe of the transfer concepts (balanced accuracy, %; chance 50)", ""]
    names = list(next(iter(seeds[0]["probe"].values())))
    lines += ["| concept | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for concept in seeds[0]["probe"]:
        cells = [_cell([s["probe"][concept][k] for s in seeds], 1) for k in names]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    lines += ["", "## Stage 2 losses of the full arm (first → last logged)", ""]
    lines += ["| loss | first | last |", "|---|---:|---:|"]
    for name in seeds[0]["stage2_losses"]:
        first = _cell([s["stage2_losses"][name]["first"] for s in seeds], 3)
        last = _cell([s["stage2_losses"][name]["last"] for s in seeds], 3)
        lines.append(f"| {name} | {first} | {last} |")
    lines += ["", "## EgoBench 8-task average by view (%)", ""]
    parts = ("all", *GROUPS)
    lines += ["| model, view | " + " | ".join(parts) + " |", "|---|" + "---:|" * len(parts)]
    for row in seeds[0]["egobench"]:
        got = [[s["egobench"][row].get(p, {}).get(AVERAGE) for s in seeds] for p in parts]
        cells = [_cell(values, 1) for values in got]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")

    def average(row: Mapping[str, Any]) -> str:
        return format_score(row.get("all", {}).get(AVERAGE))

    per_seed = [
        f"seed {k}: " + ", ".join(f"{name} {average(v)}" for name, v in s["egobench"].items())
        for k, s in payload["seeds"].items()
    ]
    return "\n".join(lines + ["", *per_seed, ""])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.WARNING)
    run(flags.FLAGS.config)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", "configs/study.py", "Study config file.")
    app.run(main)
