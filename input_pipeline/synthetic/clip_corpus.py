"""A labelled "web" corpus for the demo's stand-in CLIP: freshly rendered tabletop clips.

The paper's encoders start from CLIP ViT-L/14-336, pretrained on hundreds of millions of web
images from every kind of viewpoint. The demo cannot download it, so it pretrains a tiny
tower itself (``exo2ego_jax.demo.pretrain_clip``) on this corpus: clips of *new* takes
(their own seeds, never a take of the world, so never a training or EgoBench clip), seen
through the world's head-mounted camera and its fixed exo rigs, each labelled from the
simulator with what happens in it (verb, the acted-on object's colour and shape, the target
bowl's colour, the direction) and with where every object is in every frame. Every clip is
decoded the way the input pipeline decodes video (VideoLLaMA2's uniform frame sampling over
the action window, bicubic resize), minus the near-lossless mp4 round trip.

    corpus = render_corpus(num_takes=1200, seed=0, image_size=64)
    corpus.frames  # uint8[C, F, S, S, 3]
    corpus.labels  # int32[C, len(LABELS)] indices into each LABELS vocabulary
    corpus.object_xy  # float32[C, F, K, 2] where each object is in each frame (dense targets)
"""

from __future__ import annotations

import dataclasses

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from input_pipeline.synthetic.file_formats import clip_window
from input_pipeline.synthetic.parallel import map_in_processes
from input_pipeline.synthetic.rendering import object_screen_positions, render_take
from input_pipeline.synthetic.sampling import sample_take_spec
from input_pipeline.synthetic.simulation import simulate
from input_pipeline.synthetic.takes import DEFAULT_SIZE, EXO_RIGS, Step, TakeSpec
from input_pipeline.synthetic.vocabulary import COLORS, SHAPES, VERBS
from input_pipeline.video import sample_frame_indices

__all__ = ["LABELS", "Corpus", "clip_labels", "render_corpus", "render_take_clips"]

#: Label vocabularies, one per field of a clip's label vector ("none": the step has none).
LABELS: dict[str, tuple[str, ...]] = {
    "verb": VERBS,
    "color": ("none", *COLORS),
    "shape": ("none", *SHAPES),
    "target": ("none", *COLORS),
    "direction": ("none", "left", "right", "forward", "backward"),
}

# Corpus takes come from SeedSequence([seed, _SPLIT_KEY, i]); the world's splits use keys
# 0-3 (input_pipeline.synthetic.sampling.build_specs), so the two never share a take.
_SPLIT_KEY = 1001


@dataclasses.dataclass
class Corpus:
    """A rendered corpus of ``C`` clips of ``F`` frames from takes with up to ``K`` objects.

    ``frames uint8[C, F, S, S, 3]``; ``labels int32[C, len(LABELS)]``; ``takes int32[C]`` (the
    corpus take each clip comes from, 0..num_takes-1); ``views`` (the camera kind of each
    clip: ``"ego"`` / ``"exo"``). Where the objects are, for dense supervision:
    ``object_xy float32[C, F, K, 2]`` (each object's centre in each frame, (x, y) in [0, 1)
    image coordinates, NaN when off the image or padding), ``object_labels int32[C, K, 2]``
    (its colour and shape as indices into ``LABELS["color"]`` / ``LABELS["shape"]``; 0 =
    padding) and ``acted int32[C]`` (which of the K objects the step acts on, -1 none)."""

    frames: np.ndarray
    labels: np.ndarray
    takes: np.ndarray
    views: list[str]
    object_xy: np.ndarray
    object_labels: np.ndarray
    acted: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concatenate(parts: list[Corpus]) -> Corpus:
        """One corpus from ``parts`` (part ``i``'s clips get take id ``i``), objects padded
        to the largest ``K``."""
        k = max(p.object_xy.shape[2] for p in parts)

        def pad(a: np.ndarray, axis: int, value) -> np.ndarray:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, k - a.shape[axis])
            return np.pad(a, widths, constant_values=value)

        return Corpus(
            frames=np.concatenate([p.frames for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            takes=np.concatenate([np.full(len(p), i, np.int32) for i, p in enumerate(parts)]),
            views=[v for p in parts for v in p.views],
            object_xy=np.concatenate([pad(p.object_xy, 2, np.nan) for p in parts]),
            object_labels=np.concatenate([pad(p.object_labels, 1, 0) for p in parts]),
            acted=np.concatenate([p.acted for p in parts]),
        )


def clip_labels(take: TakeSpec, step: Step) -> list[int]:
    """The label vector of one step (one index per :data:`LABELS` field)."""
    obj = take.objects[step.obj] if step.obj is not None else None
    target = take.objects[step.target] if step.target is not None else None
    direction = step.direction if step.verb in ("push", "turn", "step") else None
    values = {
        "verb": step.verb,
        "color": obj.color if obj else "none",
        "shape": obj.shape if obj else "none",
        "target": target.color if target else "none",
        "direction": direction or "none",
    }
    return [LABELS[k].index(values[k]) for k in LABELS]


def _resize(frame: np.ndarray, image_size: int, reformatter: VideoReformatter) -> np.ndarray:
    """Bicubic resize in swscale, as ``input_pipeline.video`` does for square videos:
    ``uint8[H, W, 3]`` -> ``uint8[image_size, image_size, 3]``. ``reformatter`` keeps its
    swscale context from frame to frame (``VideoFrame.reformat`` makes a new one per call,
    which costs twice the scaling itself); the pixels are the same."""
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    return reformatter.reformat(
        vf, width=image_size, height=image_size, format="rgb24", interpolation="BICUBIC"
    ).to_ndarray()


def render_take_clips(
    take_seed: int, *, views: tuple[str, ...], frames_per_clip: int, image_size: int, size: int
) -> Corpus:
    """Every step of one freshly sampled take, from each of ``views`` (``"ego"`` and/or
    ``"exo"``: one random exo rig), as a :class:`Corpus` (take id 0)."""
    rng = np.random.default_rng(take_seed)
    rig = str(rng.choice(sorted(EXO_RIGS)))
    take = sample_take_spec(take_seed, "pairs", 0, size=size, exo_cameras=(rig,))
    timeline = simulate(take)
    frames, labels, kinds, where = [], [], [], []
    windows = [clip_window(take, step) for step in take.steps]
    idx = [
        sample_frame_indices(take.num_frames, take.fps, frames_per_clip, t0, t1)
        for t0, t1 in windows
    ]
    needed = np.unique(np.concatenate(idx))  # render only the frames some clip samples
    reformatter = VideoReformatter()
    for view in views:
        camera = "ego" if view == "ego" else rig
        video = render_take(take, camera, ss=1, timeline=timeline, indices=needed)
        xy = object_screen_positions(take, camera, timeline=timeline, indices=needed)
        row = {int(i): r for r, i in enumerate(needed)}
        small = {
            int(i): _resize(f, image_size, reformatter) for i, f in zip(needed, video, strict=True)
        }
        for step, clip_idx in zip(take.steps, idx, strict=True):
            frames.append(np.stack([small[int(i)] for i in clip_idx]))
            where.append(xy[[row[int(i)] for i in clip_idx]])
            labels.append(clip_labels(take, step))
            kinds.append(view)
    objects = [
        [LABELS["color"].index(o.color), LABELS["shape"].index(o.shape)] for o in take.objects
    ]
    acted = [-1 if s.obj is None else s.obj for s in take.steps] * len(views)
    return Corpus(
        frames=np.stack(frames),
        labels=np.asarray(labels, np.int32),
        takes=np.zeros(len(labels), np.int32),
        views=kinds,
        object_xy=np.stack(where),
        object_labels=np.tile(np.asarray(objects, np.int32), (len(labels), 1, 1)),
        acted=np.asarray(acted, np.int32),
    )


def _job(args) -> Corpus:
    seed, kw = args
    return render_take_clips(seed, **kw)


def render_corpus(
    num_takes: int = 1200,
    seed: int = 0,
    *,
    views: tuple[str, ...] = ("ego", "exo"),
    frames_per_clip: int = 8,
    image_size: int = 64,
    size: int = DEFAULT_SIZE,
    workers: int | None = None,
    progress: bool = True,
) -> Corpus:
    """Render ``num_takes`` new takes (``size`` px, as the world's videos) and cut every step
    of each into a clip per view, decoded to ``image_size`` px. ``workers`` render processes
    (default: up to 2) are spawned, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard. Deterministic from ``seed``, whatever ``workers``."""
    bad = set(views) - {"ego", "exo"}
    if not views or bad:
        raise ValueError(f"views must be a non-empty subset of ('ego', 'exo'); got {views}")
    if num_takes < 1:
        raise ValueError(f"num_takes must be >= 1; got {num_takes}")
    kw = dict(views=tuple(views), frames_per_clip=frames_per_clip, image_size=image_size, size=size)
    seeds = [
        int(np.random.SeedSequence([seed, _SPLIT_KEY, i]).generate_state(1)[0])
        for i in range(num_takes)
    ]
    jobs = [(s, kw) for s in seeds]
    results = map_in_processes(
        _job,
        jobs,
        workers=workers,
        chunksize=4,
        desc="rendering the CLIP corpus",
        progress=progress,
    )
    return Corpus.concatenate(results)
