"""TFDS builders (ArrayRecord, no TensorFlow needed) for the Exo2Ego corpora and EgoBench.

=================  =====================================================  ==================
name               source files (under the data root)                     used by
=================  =====================================================  ==================
``ego_exo_clip``   takes.json + annotations/atomic_descriptions_*.json    stage 2 (and 0/1)
``ego_clip``       egoclip/egoclip.csv                                    stage 0 (ego)
``exo_clip_text``  exo_web/exo_captions.json                              stage 0/1 (exo)
``ego_it``         egoit/egoit_instructions.json                          stage 3
``ego_bench``      egobench/** (eight benchmarks, one split each)         evaluation
=================  =====================================================  ==================

Build: :func:`build` (or ``python -m input_pipeline.prepare``), with :class:`BuildOptions`
for real downloads (skip ceiling, missing videos, Ego-Exo4D views and filters, EgoClip
layout); each split's :class:`BuildReport` lands in ``metadata.json``. Read:
``tfds.data_source(name, data_dir=...)`` (or :func:`open_dataset`, which also returns the
data root the relative video paths refer to).
"""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError, resolve_in_root
from input_pipeline.datasets.common import build_dataset
from input_pipeline.datasets.ego_bench import EgoBench
from input_pipeline.datasets.ego_clip import EgoClip
from input_pipeline.datasets.ego_exo_clip import EgoExoClip, window_config
from input_pipeline.datasets.ego_it import EgoIt
from input_pipeline.datasets.exo_clip_text import ExoClipText
from input_pipeline.datasets.options import EGOCLIP_LAYOUTS, BuildOptions
from input_pipeline.datasets.report import BuildReport, summary_lines

__all__ = [
    "BUILDERS",
    "EGOCLIP_LAYOUTS",
    "AnnotationError",
    "BuildOptions",
    "BuildReport",
    "build",
    "open_dataset",
    "resolve_in_root",
    "summary_lines",
    "window_config",
]

BUILDERS: dict[str, type] = {
    "ego_exo_clip": EgoExoClip,
    "ego_clip": EgoClip,
    "exo_clip_text": ExoClipText,
    "ego_it": EgoIt,
    "ego_bench": EgoBench,
}


def build(
    name: str,
    world: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    window_s: float | None = None,
    options: BuildOptions | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> Path:
    """Build dataset ``name`` from the data root ``world`` into ``data_dir`` (atomically).

    ``window_s`` selects the clip length of ``ego_exo_clip`` (default config: 1 s);
    ``options`` how the annotation files are read (default :class:`BuildOptions`). An
    existing dataset is replaced (``overwrite``), kept (``exist_ok``) or refused
    (FileExistsError). Returns the dataset's version directory; its ``metadata.json``
    holds the ``build_report`` of every split.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    if window_s is not None and name != "ego_exo_clip":
        raise ValueError("window_s only applies to ego_exo_clip")
    config = window_config(window_s) if window_s is not None else None
    return build_dataset(
        BUILDERS[name],
        world,
        data_dir,
        config=config,
        options=options,
        overwrite=overwrite,
        exist_ok=exist_ok,
    )


def open_dataset(
    name: str, data_dir: str | os.PathLike, split: str = "train"
) -> tuple[tfds.data_sources.ArrayRecordDataSource, dict]:
    """The random-access source of one split, and the dataset's metadata.

    ``name`` may carry a config (``"ego_exo_clip/w680ms"``). The metadata holds
    ``source_root``, the data root the stored relative video paths refer to.
    """
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"dataset {name!r} is not prepared in {data_dir}; run `python -m "
            f"input_pipeline.prepare --world WORLD --out {data_dir}`"
        )
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}"
        )
    return builder.as_data_source(split=split), dict(builder.info.metadata or {})
