"""Prepare a data root for training: build every dataset and the demo tokenizer.

CLI::

    python -m input_pipeline.prepare --world demo_data/world --out demo_data/prepared
    python -m input_pipeline.prepare --world W --out D --datasets ego_exo_clip --window 0.68
    python -m input_pipeline.prepare --world /data/egoexo --out D --datasets ego_exo_clip \
        --ego-exo-downscaled 448 --max-bad-fraction 0.05

writes ``<out>/<dataset>/[<config>/]1.0.0/`` (TFDS ArrayRecord, readable with
``tfds.data_source(name, data_dir=out)``) and ``<out>/tokenizer/`` (trained on the text of
the prepared datasets). Each piece is built in a temporary directory and renamed into place;
existing pieces are kept unless ``--overwrite``. At the end it prints, per dataset and split,
the records read, kept, skipped and filtered, by reason, naming the first offenders
(:func:`dataset_summary`); a split with more than ``--max-bad-fraction`` skipped aborts its
build. The reading options (:class:`~input_pipeline.datasets.BuildOptions`) are documented
in docs/data.md, "Reading real downloads".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from input_pipeline import atomic
from input_pipeline.datasets import (
    BUILDERS,
    EGOCLIP_LAYOUTS,
    AnnotationError,
    BuildOptions,
    build,
    open_dataset,
    summary_lines,
)
from input_pipeline.egobench import BENCHMARKS
from input_pipeline.progress import bar as progress_bar
from input_pipeline.tokenizer import DEFAULT_VOCAB_SIZE, train_demo_tokenizer

__all__ = ["corpus_text", "dataset_summary", "prepare", "main"]

TOKENIZER_DIR = "tokenizer"


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def corpus_text(data_dir: str | os.PathLike) -> Iterator[str]:
    """Every text of the prepared datasets (narrations, captions, conversations, EgoBench
    questions / options / answers): what the demo tokenizer is trained on."""
    for name, split, keys in (
        ("ego_exo_clip", "train", ("text",)),
        ("ego_clip", "train", ("text",)),
        ("exo_clip_text", "train", ("prompt", "text")),
    ):
        source, _ = open_dataset(name, data_dir, split)
        for i in range(len(source)):
            r = source[i]
            yield from (_s(r[k]) for k in keys)
    source, _ = open_dataset("ego_it", data_dir)
    for i in range(len(source)):
        yield from map(_s, source[i]["conversations"]["value"])
    for split in BENCHMARKS:
        source, _ = open_dataset("ego_bench", data_dir, split)
        for i in range(len(source)):
            r = source[i]
            yield _s(r["question"])
            yield _s(r["answer"])
            yield from map(_s, r["options"])


def prepare(
    world: str | os.PathLike,
    out: str | os.PathLike,
    *,
    datasets: Sequence[str] | None = None,
    window_s: float | None = None,
    options: BuildOptions | None = None,
    tokenizer: bool = True,
    vocab_size: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Build ``datasets`` (default: all) of the data root ``world`` into ``out``, then the
    demo tokenizer (needs every dataset). ``options`` say how the annotation files are read
    (default :class:`BuildOptions`). Returns ``{name: directory}``; :func:`dataset_summary`
    of a directory tells what was kept and skipped."""
    out = Path(out)
    names = list(datasets or BUILDERS)
    unknown = sorted(set(names) - set(BUILDERS))
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; expected some of {sorted(BUILDERS)}")
    if not progress:
        tfds.disable_progress_bar()
    done: dict[str, Path] = {}
    bar = progress_bar(names, desc="preparing datasets", unit="dataset", disable=not progress)
    for name in bar:
        window = window_s if name == "ego_exo_clip" else None
        done[name] = build(
            name,
            world,
            out,
            window_s=window,
            options=options,
            overwrite=overwrite,
            exist_ok=True,
        )
    if tokenizer:
        done["tokenizer"] = build_tokenizer(out, overwrite=overwrite, vocab_size=vocab_size)
    return done


def dataset_summary(path: str | os.PathLike, options: BuildOptions | None = None) -> list[str]:
    """The build summary of the prepared dataset at ``path`` (its version directory): per
    split, records read, kept, skipped and filtered by reason, with the first offenders.
    With ``options``, a line warns when the dataset was built with other ones."""
    meta_file = Path(path) / "metadata.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    reports = meta.get("build_report", {}).values()
    lines = [line for report in reports for line in summary_lines(report)]
    if not lines:
        lines = [f"{path}: no build report (built before reports were recorded)"]
    wanted = json.loads(json.dumps(dataclasses.asdict(options or BuildOptions())))
    if options is not None and meta.get("build_options") not in (None, wanted):
        lines.append(
            f"  warning: built with other options {meta['build_options']}; pass --overwrite "
            "to rebuild with the requested ones"
        )
    return lines


def build_tokenizer(
    data_dir: str | os.PathLike, *, overwrite: bool = False, vocab_size: int | None = None
) -> Path:
    """Train the demo tokenizer on :func:`corpus_text` into ``<data_dir>/tokenizer`` (atomic)."""
    data_dir = Path(data_dir)
    target = data_dir / TOKENIZER_DIR
    if target.exists() and not overwrite:
        print(f"keeping {target} (pass --overwrite to retrain)", file=sys.stderr)
        return target
    with atomic.staged_dir(target) as stage:
        train_demo_tokenizer(corpus_text(data_dir), stage, vocab_size or DEFAULT_VOCAB_SIZE)
    return target


def _options_parser(p: argparse.ArgumentParser) -> None:
    """The :class:`BuildOptions` flags (dashes or underscores; docs/data.md)."""
    d = BuildOptions()
    g = p.add_argument_group("reading real downloads (docs/data.md)")

    def flag(name: str, **kw) -> None:
        g.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kw)

    flag(
        "max-bad-fraction",
        type=float,
        default=d.max_bad_fraction,
        help="abort a split when more than this fraction of its records is skipped "
        f"(malformed, unusable, missing video; default {d.max_bad_fraction}; 1 = never)",
    )
    flag(
        "missing-videos",
        choices=("skip", "keep"),
        default=d.missing_videos,
        help="skip records whose video file is absent (default), or keep them for the "
        "pipeline's on_bad_video",
    )
    flag(
        "ego-exo-downscaled",
        type=int,
        default=d.ego_exo_downscaled,
        metavar="SIZE",
        help="read Ego-Exo4D's downscaled videos (448: frame_aligned_videos/downscaled/448/); "
        "default: the full-size frame-aligned videos",
    )
    flag(
        "exo-cameras",
        default=d.exo_cameras,
        metavar="REGEX",
        help=f"camera ids that are static exo views (default {d.exo_cameras!r}; the hand-held "
        "'mobile' camera is not)",
    )
    flag(
        "subjects",
        default=",".join(d.subjects),
        help="narration_subject values kept, comma-separated (default C, the camera wearer; "
        "'all' keeps every subject)",
    )
    flag(
        "require-ego-visible",
        action="store_true",
        help="drop atomic descriptions marked ego_visible false (default: keep)",
    )
    flag(
        "drop-unsure",
        action="store_true",
        help="drop atomic descriptions marked unsure (default: keep)",
    )
    flag(
        "egoclip-videos",
        default=d.egoclip_videos,
        metavar="LAYOUT",
        help=f"EgoClip video layout: one of {', '.join(EGOCLIP_LAYOUTS)} (default "
        f"{d.egoclip_videos}) or a template with {{video_uid}} and optionally {{chunk}}",
    )


def _options(a: argparse.Namespace) -> BuildOptions:
    subjects = [x.strip() for x in a.subjects.split(",") if x.strip()]
    return BuildOptions(
        max_bad_fraction=a.max_bad_fraction,
        missing_videos=a.missing_videos,
        ego_exo_downscaled=a.ego_exo_downscaled,
        exo_cameras=a.exo_cameras,
        subjects=() if subjects in ([], ["all"]) else tuple(subjects),
        require_ego_visible=a.require_ego_visible,
        drop_unsure=a.drop_unsure,
        egoclip_videos=a.egoclip_videos,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m input_pipeline.prepare",
        description="Build the ArrayRecord datasets and the demo tokenizer of a data root.",
    )
    p.add_argument("--world", required=True, help="data root (e.g. the synthetic demo world)")
    p.add_argument("--out", required=True, help="TFDS data_dir to write the datasets into")
    p.add_argument(
        "--datasets",
        default=",".join(BUILDERS),
        help=f"comma-separated subset of {','.join(BUILDERS)} (default: all)",
    )
    p.add_argument("--window", type=float, help="ego_exo_clip clip length in seconds (1.0)")
    p.add_argument("--no-tokenizer", action="store_true", help="skip the demo tokenizer")
    p.add_argument("--vocab-size", type=int, help="demo tokenizer vocabulary (1024)")
    p.add_argument("--overwrite", action="store_true", help="rebuild existing datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _options_parser(p)
    a = p.parse_args(argv)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    try:
        options = _options(a)
        done = prepare(
            a.world,
            a.out,
            datasets=names,
            window_s=a.window,
            options=options,
            tokenizer=not a.no_tokenizer,
            vocab_size=a.vocab_size,
            overwrite=a.overwrite,
            progress=not a.quiet,
        )
    except (AnnotationError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in done.items():
        if name != "tokenizer":
            print("\n".join(dataset_summary(path, options)))
    for name, path in done.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
