"""The study's numbers: per-task scores over seeds, the results tables, CSV and plots.

``exo2ego_jax.demo.study`` runs the jobs; this module turns their EgoBench metrics into
``mean ± std`` per arm and per stage-curve point beside the paper's Table 3 and chance.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from exo2ego_jax.eval import report
from exo2ego_jax.eval.evaluate import load_benchmark

PAPER_AVERAGE = {
    "full": 55.6,
    "no_lora": 53.2,
    "forward_cycle": 54.9,
    "no_g_ccl": 54.4,
    "no_kl": 51.4,
    "fc_mapping": 54.7,
}
# method.md §6: EgoSchema accuracy after initialization, stage 2 and stage 3.
PAPER_CURVE_EGOSCHEMA = {0: 49.2, 2: 56.7, 3: 61.3}
TASK_LABELS = tuple(report.PRIMARY)  # the eight tasks, in the paper's order
AVERAGE = "Average"
COLUMNS = (*TASK_LABELS, AVERAGE)
GROUP_TITLES = {
    "transfer": "held-out takes acting on a transfer-concept object, which no ego-labelled "
    "take shows",
    "seen": "held-out takes with no transfer-concept object",
}
ARM_TITLES = {
    "baseline": "ego-only baseline (stages 0, 3)",
    "full": "Exo2Ego (stages 0-3)",
    "no_kl": "w/o KL",
    "no_g_ccl": "w/o G and CCL",
    "forward_cycle": "forward cycle only",
    "fc_mapping": "FC layers for F / G",
    "no_lora": "w/o LoRA",
}


# ----------------------------------------------------------------------------- scores


def task_scores(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float | None]:
    """Each task's headline score (``report.PRIMARY``: the eval report's average inputs) and
    their mean (None when a task is missing)."""
    out: dict[str, float | None] = {}
    for label, (task, keys) in report.PRIMARY.items():
        got = metrics.get(task, {})
        out[label] = float(np.mean([got[k] for k in keys])) if all(k in got for k in keys) else None
    present = [v for v in out.values() if v is not None]
    out[AVERAGE] = float(np.mean(present)) if len(present) == len(TASK_LABELS) else None
    return out


def mean_std(values: Sequence[float], ddof: int = 1) -> dict[str, Any]:
    """``{"mean", "std", "n", "values"}``; std is None when fewer than ``ddof + 1`` values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=ddof)) if len(vals) > ddof else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def aggregate(
    per_seed: Mapping[str, Mapping[int, Mapping[str, float | None]]], ddof: int = 1
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{row: {seed: {column: score}}}`` -> ``{row: {column: mean_std(...)}}``."""
    return {
        row: {col: mean_std([s.get(col) for s in seeds.values()], ddof) for col in COLUMNS}
        for row, seeds in per_seed.items()
    }


def format_cell(cell: Mapping[str, Any]) -> str:
    """``"27.9 ± 1.2"``; a single seed shows its mean only; nothing shows "—"."""
    if cell.get("mean") is None:
        return "—"
    if cell.get("std") is None:
        return f"{cell['mean']:.1f}"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}"


def paper_task_scores() -> dict[str, float | None]:
    """The paper's full Exo2Ego per task, combined as :func:`task_scores` combines ours."""
    paper = {}
    for task, key, *_, value in report.LAYOUT:
        if isinstance(value, int | float):
            paper.setdefault(task, {})[key] = float(value)
    out = task_scores(paper)
    out[AVERAGE] = report.PAPER_AVERAGE  # the paper's own average
    return out


def chance_scores(config: ml_collections.ConfigDict) -> dict[str, float | None]:
    """Random guessing on the evaluated items (what the numbers must beat)."""
    chance = {t: report.chance_metrics(t, load_benchmark(config, t)) for t in config.eval.tasks}
    return task_scores(chance)


def paired_difference(
    per_seed: Mapping[str, Mapping[int, Mapping[str, float | None]]],
    arm: str,
    ref: str,
    ddof: int = 1,
) -> dict[str, dict[str, Any]]:
    """Per column, ``arm`` minus ``ref`` seed by seed over the seeds both have: ``mean``,
    ``std``, ``se`` (std / sqrt(n)), ``n``, ``values`` and ``wins`` (the pre-registered rule
    of docs/study.md: the mean difference exceeds twice its standard error; None below two
    seeds)."""
    a, b = per_seed.get(arm, {}), per_seed.get(ref, {})
    out = {}
    for col in COLUMNS:
        diffs = [
            a[s][col] - b[s][col]
            for s in sorted(set(a) & set(b))
            if a[s].get(col) is not None and b[s].get(col) is not None
        ]
        cell = mean_std(diffs, ddof)
        se = cell["std"] / np.sqrt(cell["n"]) if cell["std"] is not None else None
        wins = None if se is None else bool(cell["mean"] > 2 * se)
        out[col] = {**cell, "se": None if se is None else float(se), "wins": wins}
    return out


# ----------------------------------------------------------------------------- tables


def results_tables(
    config: ml_collections.ConfigDict,
    arms: Mapping[str, Mapping[str, dict]],
    curve: Mapping[int, Mapping[str, dict]],
    chance: Mapping[str, float | None] | None,
    seeds: Sequence[int],
    groups: Mapping[str, Mapping[str, Mapping[str, dict]]] | None = None,
    comparisons: Mapping[str, Mapping[str, dict]] | None = None,
) -> str:
    """The Markdown of ``results.md``: every arm on all items, then (study regime) on each
    item group, the full-minus-baseline differences, and the stage curve."""
    head = "| Arm | " + " | ".join(COLUMNS) + " | Paper avg |"
    rule = "|---|" + "---:|" * (len(COLUMNS) + 1)
    lines = [
        f"# Exo2Ego study: synthetic EgoBench ({config.eval.get('split', 'test')} items), "
        f"mean ± std over seeds {list(seeds)}",
        "",
        "Per-task headline score (the eval report's average inputs) and their average, in "
        "percent. Paper avg: method.md §6, Table 3 (real EgoBench, 7B model).",
        "",
        head,
        rule,
    ]
    for arm, cells in arms.items():
        paper = PAPER_AVERAGE.get(arm)
        title = f"{arm}: {ARM_TITLES.get(arm, arm)}"
        row = [title, *(format_cell(cells[c]) for c in COLUMNS), format_score(paper)]
        lines.append("| " + " | ".join(row) + " |")
    paper_row = paper_task_scores()
    lines.append(
        "| paper: Exo2Ego | "
        + " | ".join(format_score(paper_row[c]) for c in COLUMNS)
        + " | 55.6 |"
    )
    if chance:
        lines.append(
            "| chance | " + " | ".join(format_score(chance.get(c)) for c in COLUMNS) + " | — |"
        )
    for group, group_arms in (groups or {}).items():
        lines += ["", f"## {group.capitalize()} items ({GROUP_TITLES.get(group, group)})", ""]
        lines += [head.replace(" | Paper avg |", " |"), rule[: -len("---:|")]]
        for arm, cells in group_arms.items():
            row = [f"{arm}: {ARM_TITLES.get(arm, arm)}", *(format_cell(cells[c]) for c in COLUMNS)]
            lines.append("| " + " | ".join(row) + " |")
    if comparisons:
        lines += [
            "",
            "## Exo2Ego (full) minus the ego-only baseline, seed by seed",
            "",
            "Mean ± sd of the per-seed difference, its standard error (sd / sqrt(n)), and the "
            "decision rule (docs/study.md): Exo2Ego wins where the mean exceeds 2 standard "
            "errors.",
            "",
            "| Items | " + " | ".join(COLUMNS) + " |",
            "|---|" + "---:|" * len(COLUMNS),
        ]
        for section, diff in comparisons.items():
            cells = [_diff_cell(diff[c]) for c in COLUMNS]
            lines.append(f"| {section} | " + " | ".join(cells) + " |")
    if curve:
        lines += [
            "",
            f"## Stage curve ({config.curve.arm})",
            "",
            "| After | EgoSchema | Average | Paper EgoSchema |",
            "|---|---:|---:|---:|",
        ]
        for after, cells in curve.items():
            name = "init (stage 0)" if after == 0 else f"stage {after}"
            paper = format_score(PAPER_CURVE_EGOSCHEMA.get(after))
            lines.append(
                f"| {name} | {format_cell(cells['EgoSchema'])} | "
                f"{format_cell(cells[AVERAGE])} | {paper} |"
            )
    return "\n".join(lines) + "\n"


def format_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _diff_cell(cell: Mapping[str, Any]) -> str:
    """``"+3.1 ± 1.0 (se 0.6, wins)"``; "—" without two seeds of both arms."""
    if cell.get("mean") is None:
        return "—"
    if cell.get("se") is None:
        return f"{cell['mean']:+.1f}"
    verdict = "wins" if cell["wins"] else "no"
    return f"{cell['mean']:+.1f} ± {cell['std']:.1f} (se {cell['se']:.1f}, {verdict})"


def results_csv(
    arms: Mapping[str, Mapping[str, dict]],
    curve: Mapping[int, Mapping[str, dict]],
    groups: Mapping[str, Mapping[str, Mapping[str, dict]]] | None = None,
) -> str:
    """Long format: one line per (section, row, column) with mean, std, n and the paper;
    the item groups' sections are ``group:<name>``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "row", "column", "mean", "std", "n", "paper"])
    paper_full = paper_task_scores()
    for arm, cells in arms.items():
        for col in COLUMNS:
            paper = PAPER_AVERAGE.get(arm) if col == AVERAGE else None
            if arm == "full":
                paper = paper_full[col]
            w.writerow(["arm", arm, col, *_csv_cell(cells[col]), _csv_num(paper)])
    for group, group_arms in (groups or {}).items():
        for arm, cells in group_arms.items():
            for col in COLUMNS:
                w.writerow([f"group:{group}", arm, col, *_csv_cell(cells[col]), ""])
    for after, cells in curve.items():
        for col in COLUMNS:
            paper = PAPER_CURVE_EGOSCHEMA.get(after) if col == "EgoSchema" else None
            row = ["curve", f"after_stage{after}", col, *_csv_cell(cells[col]), _csv_num(paper)]
            w.writerow(row)
    return buf.getvalue()


def _csv_num(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _csv_cell(cell: Mapping[str, Any]) -> list[str]:
    return [_csv_num(cell["mean"]), _csv_num(cell["std"]), str(cell["n"])]


def _nan(value: float | None) -> float:
    return np.nan if value is None else value


def write_plots(
    root: Path,
    arms: Mapping[str, Mapping[str, dict]],
    curve: Mapping[int, Mapping[str, dict]],
    chance: Mapping[str, float | None] | None = None,
) -> list[Path]:
    """``ablations.png`` (average per arm vs the paper) and ``stage_curve.png``."""
    import matplotlib  # noqa: PLC0415 — optional: the tables are the result

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    if arms:
        names = list(arms)
        x = np.arange(len(names))
        ours = [_nan(arms[a][AVERAGE]["mean"]) for a in names]
        err = [arms[a][AVERAGE]["std"] or 0.0 for a in names]
        paper = [PAPER_AVERAGE.get(a, np.nan) for a in names]
        fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 3.8))
        ax.bar(x - 0.2, ours, 0.4, yerr=err, capsize=3, label="ours (synthetic EgoBench)")
        ax.bar(x + 0.2, paper, 0.4, label="paper Table 3")
        if chance and chance.get(AVERAGE) is not None:
            ax.axhline(chance[AVERAGE], color="gray", ls=":", label="chance (ours)")
        ax.set_xticks(x, names, rotation=20)
        ax.set_ylabel("8-task average (%)")
        ax.set_title("Exo2Ego ablations: mean ± std over seeds")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(root / "ablations.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    if curve:
        afters = sorted(curve)
        x = np.arange(len(afters))  # evenly spaced points, labelled by stage
        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        for col, style in (("EgoSchema", "o-"), (AVERAGE, "s-")):
            ax.errorbar(
                x,
                [_nan(curve[a][col]["mean"]) for a in afters],
                yerr=[curve[a][col]["std"] or 0.0 for a in afters],
                fmt=style,
                capsize=3,
                label=f"ours: {col}",
            )
        ax.plot(
            x,
            [PAPER_CURVE_EGOSCHEMA.get(a, np.nan) for a in afters],
            "^--",
            label="paper: EgoSchema",
        )
        ax.set_xticks(x, ["init" if a == 0 else f"stage {a}" for a in afters])
        ax.set_ylabel("score (%)")
        ax.set_title("Stage curve")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        fig.tight_layout()
        written.append(root / "stage_curve.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written
