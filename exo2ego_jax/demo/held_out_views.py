"""Exo views of a study world's takes, and their step clips with concept labels.

The synthetic world renders its held-out (EgoBench) takes from the ego camera only. The
study's diagnostics (docs/study.md, "Diagnostics") need the same takes seen from a fixed exo
camera: as synchronized pairs for F (how close does F(x) come to y?), for a linear probe of
the transfer concepts, and for EgoBench read through the exo encoder. The takes are sampled
again from ``world.json``'s seed, sizes and study regime (deterministic), checked against the
take ids it lists, and their exo views rendered with the world's own renderer and encoder
settings, time-aligned with the ego videos.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from exo2ego_jax.demo.study_data import manifest_regime
from input_pipeline import atomic
from input_pipeline.synthetic.concepts import StudyRegime, acted_on, load_manifest
from input_pipeline.synthetic.parallel import map_in_processes
from input_pipeline.synthetic.rendering import render_take, write_mp4
from input_pipeline.synthetic.sampling import BENCH_DIRS, build_specs
from input_pipeline.synthetic.simulation import simulate
from input_pipeline.synthetic.takes import EGO_CAMERA, EXO_RIGS, TakeSpec

DEFAULT_CAMERA = "cam01"  # a rig every pair take is also filmed from


@dataclasses.dataclass(frozen=True)
class StepClip:
    """One object step of a take, seen from both views (``ego`` / ``exo`` video paths).

    ``labels``: for each transfer concept, whether an object of that colour or shape is on
    the table (visible for the whole take, whichever object the step moves);
    ``step_labels``: whether the step acts on one (the object it moves, or the bowl it puts
    into), which is what the step's narration names.
    """

    take: str
    group: str  # "transfer" / "seen" (held-out takes) or "pairs"
    ego: Path
    exo: Path
    start: float
    end: float
    labels: dict[str, bool]
    step_labels: dict[str, bool]


def world_takes(world_dir: str | os.PathLike, split: str) -> list[TakeSpec]:
    """The take specs of one split (``pairs``, ``heldout``, ``val``, ...) of the world at
    ``world_dir``, sampled again from its ``world.json`` and checked against its take ids."""
    manifest = load_manifest(world_dir)
    regime = StudyRegime(**manifest_regime(manifest))
    if split not in manifest["sizes"]:
        have = list(manifest["sizes"])
        raise ValueError(f"{world_dir}/world.json has no {split!r} split (it has {have})")
    specs = build_specs(
        manifest["seed"],
        manifest["sizes"],
        fps=manifest["fps"],
        size=manifest["resolution"][0],
        concepts=regime.concepts,
        transfer_fraction=regime.transfer_heldout_fraction,
    )
    takes = [s for s in specs if s.split == split]
    if [s.uid for s in takes] != list(manifest["splits"][split]):
        raise ValueError(
            f"{world_dir}: the {split} takes sampled from world.json do not match its take ids "
            "(a world of another generator version); generate the world again"
        )
    return takes


def with_exo_camera(take: TakeSpec, camera: str = DEFAULT_CAMERA) -> TakeSpec:
    """``take`` with the exo rig ``camera`` (its nominal pose) added to its cameras."""
    if camera not in EXO_RIGS:
        raise ValueError(f"unknown exo camera {camera!r}; expected one of {sorted(EXO_RIGS)}")
    if camera in take.cameras:
        return take
    pos, target, fov = EXO_RIGS[camera]
    rig = {
        "kind": "exo",
        "model": "pinhole",
        "fov": fov,
        "position": [float(v) for v in pos],
        "target": [float(v) for v in target],
    }
    return dataclasses.replace(take, cameras={**take.cameras, camera: rig})


def _render_job(args: tuple[TakeSpec, str, str, dict]) -> str:
    """Render and encode one take's ``camera`` view to ``path`` (worker entry point)."""
    take, camera, path, video = args
    tmp = Path(f"{path}.tmp-{os.getpid()}.mp4")
    frames = render_take(take, camera, timeline=simulate(take))
    write_mp4(tmp, frames, take.fps, crf=video["crf"], pix_fmt=video["pix_fmt"])
    os.replace(tmp, path)  # a killed run never leaves a half-written video behind
    return path


def render_views(
    world_dir: str | os.PathLike,
    takes: list[TakeSpec],
    out_dir: str | os.PathLike,
    *,
    camera: str = DEFAULT_CAMERA,
    workers: int | None = None,
    progress: bool = False,
) -> dict[str, Path]:
    """Renders the ``camera`` view of each take to ``out_dir/<uid>.mp4`` (kept when present,
    so a rerun renders nothing); returns take uid -> path. Pair takes filmed from ``camera``
    are not rendered: their own exo video is returned."""
    world, out = Path(world_dir), Path(out_dir)
    video = load_manifest(world)["video"]
    paths, jobs = {}, []
    for take in takes:
        if camera in take.videos:
            paths[take.uid] = world / take.videos[camera]
            continue
        paths[take.uid] = out / f"{take.uid}.mp4"
        if not paths[take.uid].exists():
            jobs.append((with_exo_camera(take, camera), camera, str(paths[take.uid]), video))
    if jobs:
        out.mkdir(parents=True, exist_ok=True)
        map_in_processes(
            _render_job,
            jobs,
            workers=workers,
            chunksize=1,
            desc=f"{camera} views",
            unit="take",
            progress=progress,
        )
    return paths


def exo_view_world(
    world_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    camera: str = DEFAULT_CAMERA,
    workers: int | None = None,
    split: str = "heldout",
) -> Path:
    """A world whose EgoBench of ``split`` (``heldout``: ``egobench/``, the test items;
    ``val``: ``egobench_val/``) shows each take from ``camera``: ``world.json`` and the
    split's annotation files copied, the videos rendered from the exo rig at the same paths
    and times. Built in a temporary directory and renamed into place; an existing complete
    one is reused."""
    world, out = Path(world_dir), Path(out_dir)
    if (out / "world.json").exists():
        return out
    if split not in BENCH_DIRS:
        raise ValueError(f"no EgoBench for split {split!r}; expected one of {list(BENCH_DIRS)}")
    bench = BENCH_DIRS[split]
    tmp = out.parent / f"{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(world / bench, tmp / bench, ignore=shutil.ignore_patterns("videos"))
    takes = world_takes(world, split)
    render_views(world, takes, tmp / bench / "videos", camera=camera, workers=workers)
    shutil.copy2(world / "world.json", tmp / "world.json")
    atomic.swap_dir_into_place(tmp, out)
    return out


def step_clips(
    world_dir: str | os.PathLike, takes: list[TakeSpec], exo_videos: dict[str, Path]
) -> list[StepClip]:
    """Every object step of ``takes`` (:func:`world_takes` of the world at ``world_dir``),
    with its ego video, the exo view in ``exo_videos`` (uid -> path) and the
    transfer-concept labels."""
    world = Path(world_dir)
    manifest = load_manifest(world)
    groups = manifest.get("study", {}).get("groups", {})
    concepts = StudyRegime(**manifest_regime(manifest)).concepts
    out = []
    for take in takes:
        labels = concepts.labels(take.objects)
        for step in take.object_steps():
            step_labels = concepts.labels(acted_on(take, step))
            out.append(
                StepClip(
                    take=take.name,
                    group=groups.get(take.name, take.split),
                    ego=world / take.videos[EGO_CAMERA],
                    exo=Path(exo_videos[take.uid]),
                    start=step.t0,
                    end=step.t1,
                    labels=labels,
                    step_labels=step_labels,
                )
            )
    return out
