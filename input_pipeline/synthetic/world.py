"""Writing a whole world: every take's videos, the annotation files and ``world.json``.

The world is written to a temporary sibling directory and renamed into place at the end, so
an interrupted run never leaves a complete-looking world behind. Layout: ``docs/data.md``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from input_pipeline import atomic
from input_pipeline.synthetic.concepts import TransferConcepts, involves, take_group
from input_pipeline.synthetic.corpora import (
    egoclip_file,
    egoexo_files,
    egoit_file,
    exo_caption_file,
)
from input_pipeline.synthetic.egobench import egobench_files
from input_pipeline.synthetic.file_formats import FORMAT_VERSION, json_bytes
from input_pipeline.synthetic.language import EGOIT_TEMPLATES
from input_pipeline.synthetic.parallel import map_in_processes
from input_pipeline.synthetic.rendering import (
    DEFAULT_CRF,
    DEFAULT_PIX_FMT,
    render_take,
    write_mp4,
)
from input_pipeline.synthetic.sampling import (
    BENCH_DIRS,
    DEFAULT_NUM_TAKES,
    build_specs,
    split_sizes,
)
from input_pipeline.synthetic.simulation import simulate
from input_pipeline.synthetic.takes import (
    DEFAULT_FPS,
    DEFAULT_SIZE,
    EGO_CAMERA,
    EXO_RIGS,
    TakeSpec,
)
from input_pipeline.synthetic.vocabulary import (
    ACTION_CLASSES,
    COLORS,
    NAV_MOTIONS,
    SHAPES,
    VERBS,
)

__all__ = ["generate_world"]

# The generator as recorded in world.json and the world's README.md: the module's name from
# before the package split (``python -m input_pipeline.synthetic_world`` still runs the CLI),
# kept so that worlds stay byte-identical across the move.
_RECORDED_GENERATOR = "input_pipeline.synthetic_world"
# The validation EgoBench draws its questions from streams of its own (the test's: 201-206).
_VAL_BENCH_STREAM = 300


def generate_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_takes: int | None = None,
    *,
    pair_takes: int | None = None,
    ego_takes: int | None = None,
    exo_takes: int | None = None,
    heldout_takes: int | None = None,
    transfer_colors: tuple[str, ...] = (),
    transfer_shapes: tuple[str, ...] = (),
    val_takes: int = 0,
    transfer_heldout_fraction: float = 0.5,
    fps: int = DEFAULT_FPS,
    size: int = DEFAULT_SIZE,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    ss: int = 2,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate the demo world into ``out_dir`` and return its path.

    ``num_takes`` (default 64) is split 25% / 10% / 50% / 15% into pair / ego-corpus /
    exo-corpus / held-out takes; the ``*_takes`` arguments override single splits. Videos
    are rendered by ``workers`` processes (default: up to 2). The world is written to a
    temporary sibling directory and renamed into place at the end, so an interrupted run
    never leaves a complete-looking world behind.

    The study regime (``docs/data.md``, "Transfer concepts"): ``transfer_colors`` /
    ``transfer_shapes`` (names from ``COLORS`` / ``SHAPES``) never occur in a ``pairs`` or
    ``ego`` take; ``transfer_heldout_fraction`` of the held-out takes (the first ones) act on
    one and the rest hold none; ``val_takes`` more held-out-style takes, grouped alike, get
    their own EgoBench files under ``egobench_val/``. With all of them off the world is the
    default one, byte for byte.
    """
    t_start = time.time()
    out = Path(out_dir)
    concepts = TransferConcepts(transfer_colors, transfer_shapes)
    if not 0.0 <= transfer_heldout_fraction <= 1.0:
        raise ValueError(
            f"transfer_heldout_fraction must be in [0, 1], got {transfer_heldout_fraction}"
        )
    _prepare_out(out, overwrite)
    overrides = {"pairs": pair_takes, "ego": ego_takes, "exo": exo_takes, "heldout": heldout_takes}
    sizes = _split_sizes(num_takes or DEFAULT_NUM_TAKES, overrides, val_takes)
    fraction = transfer_heldout_fraction
    specs = build_specs(
        seed, sizes, fps=fps, size=size, concepts=concepts, transfer_fraction=fraction
    )
    video = {"codec": "h264", "container": "mp4", "pix_fmt": pix_fmt, "crf": crf}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files, bench_counts = _annotation_files(specs, sizes, seed)
        _render_all(specs, tmp, crf=crf, ss=ss, pix_fmt=pix_fmt, workers=workers, progress=progress)
        for rel, data in files.items():
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        manifest = _manifest(
            seed, sizes, specs, files, bench_counts, fps=fps, size=size, video=video
        )
        if concepts or val_takes:
            manifest["study"] = _study_record(specs, sizes, concepts, fraction)
        (tmp / "README.md").write_text(
            f"Synthetic Exo2Ego demo world generated by `python -m {_RECORDED_GENERATOR}`"
            f" (seed {seed}). Layout: docs/data.md of exo2ego-jax; manifest: world.json.\n"
        )
        (tmp / "world.json").write_bytes(json_bytes(manifest))
        atomic.swap_dir_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"wrote {out} ({len(specs)} takes) in {time.time() - t_start:.1f}s", file=sys.stderr)
    return out


def _split_sizes(
    num_takes: int, overrides: dict[str, int | None], val_takes: int = 0
) -> dict[str, int]:
    """Takes per split: ``num_takes`` split by the default fractions, then ``overrides``,
    then a ``val`` split when ``val_takes`` > 0 (absent otherwise, as in the default
    ``world.json``)."""
    sizes = split_sizes(num_takes)
    for key, val in overrides.items():
        if val is not None:
            if val < 1:
                raise ValueError(f"{key} takes must be >= 1, got {val}")
            sizes[key] = int(val)
    if val_takes < 0:
        raise ValueError(f"val takes must be >= 0, got {val_takes}")
    if val_takes:
        sizes["val"] = int(val_takes)
    return sizes


def _annotation_files(
    specs: list[TakeSpec], sizes: dict[str, int], seed: int
) -> tuple[dict[str, bytes], dict]:
    """Every annotation file ({path: bytes}) and the EgoBench record counts (``egobench``,
    and ``egobench_val`` when there are validation takes)."""
    by_split = {k: [s for s in specs if s.split == k] for k in sizes}
    files: dict[str, bytes] = {}
    files.update(egoexo_files(by_split["pairs"], seed))
    files.update(egoclip_file(by_split["ego"]))
    files.update(exo_caption_file(by_split["exo"], seed))
    files.update(egoit_file(by_split["pairs"] + by_split["ego"], seed))
    bench, counts = egobench_files(by_split["heldout"], seed)
    files.update(bench)
    bench_counts = {"egobench": counts}
    if "val" in sizes:
        bench, counts = egobench_files(
            by_split["val"], seed, prefix=BENCH_DIRS["val"], stream=_VAL_BENCH_STREAM
        )
        files.update(bench)
        bench_counts.update(val_takes=sizes["val"], egobench_val=counts)
    return files, bench_counts


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; pass --overwrite (overwrite=True) to "
            "replace it, or choose another --out"
        )


def _render_all(
    specs: list[TakeSpec],
    root: Path,
    *,
    crf: int,
    ss: int,
    pix_fmt: str,
    workers: int | None,
    progress: bool,
) -> None:
    """Render and encode every take's videos under ``root`` (one job per take)."""
    jobs = [(s, str(root), crf, ss, pix_fmt) for s in specs]
    map_in_processes(
        _render_job,
        jobs,
        workers=workers,
        chunksize=1,
        desc="rendering takes",
        unit="take",
        progress=progress,
    )


def _render_job(args: tuple[TakeSpec, str, int, int, str]) -> str:
    """Render and encode every camera of one take into ``root`` (worker entry point)."""
    take, root, crf, ss, pix_fmt = args
    tl = simulate(take)
    for cam, rel in take.videos.items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mp4(
            path, render_take(take, cam, ss=ss, timeline=tl), take.fps, crf=crf, pix_fmt=pix_fmt
        )
    return take.uid


def _manifest(seed, sizes, specs, files, bench_counts, *, fps, size, video) -> dict:
    """``world.json``: parameters, splits, cameras, vocabulary, counts and file lists."""
    videos = sorted(v for s in specs for v in s.videos.values())
    splits = {k: [s.uid for s in specs if s.split == k] for k in sizes}
    egoit = json.loads(files["egoit/egoit_instructions.json"])
    counts = {
        "takes": len(specs),
        "videos": len(videos),
        "pair_takes": sizes["pairs"],
        "ego_takes": sizes["ego"],
        "exo_takes": sizes["exo"],
        "heldout_takes": sizes["heldout"],
        "atomic_descriptions": sum(len(s.steps) for s in specs if s.split == "pairs"),
        "egoclip_rows": sum(len(s.steps) for s in specs if s.split == "ego"),
        "exo_captions": len(json.loads(files["exo_web/exo_captions.json"])),
        "egoit": len(egoit),
        "egoit_by_kind": {k: sum(r["kind"] == k for r in egoit) for k in EGOIT_TEMPLATES},
        **bench_counts,
    }
    return {
        "format_version": FORMAT_VERSION,
        "generator": _RECORDED_GENERATOR,
        "seed": seed,
        "fps": fps,
        "resolution": [size, size],
        "video": video,
        "sizes": sizes,
        "splits": splits,
        "cameras": {
            "ego": EGO_CAMERA,
            "ego_model": "fisheye",
            "exo": sorted(EXO_RIGS),
            "pair_exo": ["cam01", "cam02"],
        },
        "vocab": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "verbs": list(VERBS),
            "nav_motions": list(NAV_MOTIONS),
            "action_classes": list(ACTION_CLASSES),
        },
        "counts": counts,
        "annotation_files": sorted(files) + ["world.json", "README.md"],
        "video_files": videos,
    }


def _study_record(
    specs: list[TakeSpec], sizes: dict[str, int], concepts: TransferConcepts, fraction: float
) -> dict:
    """``world.json``'s ``study``: the transfer concepts, the group of every held-out and
    validation take, which take each of their videos shows, and how often exo takes act on
    a transfer concept."""
    bench = [s for s in specs if s.split in BENCH_DIRS]
    exo = [s for s in specs if s.split == "exo"]
    exo_transfer = sum(involves(s, concepts) for s in exo) if concepts else 0
    return {
        "transfer_colors": list(concepts.colors),
        "transfer_shapes": list(concepts.shapes),
        "transfer_heldout_fraction": fraction,
        "val_takes": sizes.get("val", 0),
        "bench_dirs": {k: v for k, v in BENCH_DIRS.items() if k in sizes},
        "groups": {
            s.name: take_group(s.split, s.index, sizes[s.split], concepts, fraction) for s in bench
        },
        "video_takes": {v: s.name for s in bench for v in sorted(s.videos.values())},
        "exo_transfer_takes": int(exo_transfer),
        "exo_transfer_rate": round(exo_transfer / len(exo), 4) if exo else 0.0,
    }
