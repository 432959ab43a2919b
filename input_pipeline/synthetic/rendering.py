"""Filming a take: its frames from any of its cameras, where its objects appear, mp4 files.

The ego camera is head-mounted (fisheye, following the gaze, with head tremor, bob and roll
replayed from the rig's own noise seed); exo cameras are fixed pinhole rigs. Pixels come from
:mod:`input_pipeline.synthetic.scene` (drawn by :mod:`input_pipeline.synthetic.raycast`).
"""

from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

from input_pipeline.synthetic.raycast import Camera, ShapeCache, look_rotation, object_size
from input_pipeline.synthetic.scene import (
    ObjectState,
    SceneState,
    render_background,
    render_scene,
)
from input_pipeline.synthetic.simulation import ACTOR_Y, Timeline, simulate
from input_pipeline.synthetic.takes import EGO_CAMERA, TakeSpec
from input_pipeline.synthetic.vocabulary import COLORS

__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_PIX_FMT",
    "render_take",
    "object_screen_positions",
    "write_mp4",
]

DEFAULT_CRF = 14
DEFAULT_PIX_FMT = "yuv444p"


def _exo_camera(rig: dict, size: int) -> Camera:
    """The fixed pinhole camera of an exo rig (position, look-at target, horizontal fov)."""
    pos = np.asarray(rig["position"], np.float32)
    f = (size / 2) / np.tan(np.deg2rad(rig["fov"] / 2))
    return Camera(pos, look_rotation(np.asarray(rig["target"]) - pos), f, size, "pinhole")


def _ego_cameras(take: TakeSpec, tl: Timeline) -> list[Camera]:
    """Head-mounted camera per frame: follows the gaze, turns with the head, rolls and jitters."""
    rig = take.cameras[EGO_CAMERA]
    rng = np.random.default_rng(rig["noise_seed"])
    n = len(tl.times)
    # AR(1)-smoothed jitter: small head tremor rather than white noise
    raw = rng.normal(0.0, 1.0, (n, 6)).astype(np.float32)
    jit = np.zeros_like(raw)
    for i in range(n):
        jit[i] = (0.6 * jit[i - 1] if i else 0.0) + raw[i]
    f = (take.size / 2) / np.deg2rad(rig["fov"] / 2)
    cams = []
    for i, t in enumerate(tl.times):
        eye = np.array([0.0, ACTOR_Y + 0.10 + tl.actor_dy[i], 0.62], np.float32)
        eye = eye + 0.004 * jit[i, :3]
        fwd = tl.gaze[i] + [0.0, 0.04, 0.0] - eye
        yaw = tl.head_yaw[i] + 0.012 * jit[i, 3]
        c, s = np.cos(yaw), np.sin(yaw)
        fwd = np.array([c * fwd[0] - s * fwd[1], s * fwd[0] + c * fwd[1], fwd[2]], np.float32)
        pitch = 0.03 * np.sin(2 * np.pi * 0.4 * t + rig["phase"]) + 0.012 * jit[i, 4]
        horiz = float(np.hypot(fwd[0], fwd[1]))
        ang = np.arctan2(fwd[2], horiz) + pitch
        fwd = np.array([fwd[0] / horiz * np.cos(ang), fwd[1] / horiz * np.cos(ang), np.sin(ang)])
        roll = 0.10 * np.sin(2 * np.pi * 0.23 * t + rig["phase"]) + 0.015 * jit[i, 5]
        cams.append(Camera(eye, look_rotation(fwd, roll), f, take.size, "fisheye"))
    return cams


def _scene(take: TakeSpec, tl: Timeline, i: int) -> SceneState:
    """Everything visible in frame ``i``: objects, pour streams, arms and body."""
    dyv = float(tl.actor_dy[i])
    objs = []
    for k, o in enumerate(take.objects):
        objs.append(ObjectState(o.shape, COLORS[o.color], tl.objects[i, k], o.yaw))
    streams = []
    for o, b in tl.streams[i]:
        op, bp = tl.objects[i, o], tl.objects[i, b]
        r, h = object_size(take.objects[o].shape)
        to_bowl = (bp - op)[:2]
        to_bowl = to_bowl / max(float(np.linalg.norm(to_bowl)), 1e-6)
        lip = op + [to_bowl[0] * r, to_bowl[1] * r, h]
        streams.append((lip, bp + [0.0, 0.0, 0.04]))
    return SceneState(
        objects=objs,
        hands=tl.hands[i],
        shoulders=np.array([[-0.19, ACTOR_Y + dyv, 0.38], [0.19, ACTOR_Y + dyv, 0.38]], np.float32),
        head=np.array([0.0, ACTOR_Y + dyv, 0.58], np.float32),
        head_yaw=float(tl.head_yaw[i]),
        hip=np.array([0.0, ACTOR_Y + dyv, -0.10], np.float32),
        shirt=take.shirt,
        pants=take.pants,
        streams=streams,
    )


def render_take(
    take: TakeSpec,
    camera: str,
    *,
    ss: int = 2,
    timeline: Timeline | None = None,
    indices: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Render the frames of ``take`` from ``camera`` (``"aria01"`` / ``"ego"`` or an exo
    camera name of the take): ``uint8[T, size, size, 3]``, every frame or only the frames
    ``indices`` (``T = len(indices)``; the same pixels as in the full render)."""
    camera = EGO_CAMERA if camera == "ego" else camera
    if camera not in take.cameras:
        raise KeyError(f"take {take.name} has no camera {camera!r}; it has {list(take.cameras)}")
    tl = timeline or simulate(take)
    frames = range(take.num_frames) if indices is None else [int(i) for i in indices]
    out = np.empty((len(frames), take.size, take.size, 3), np.uint8)
    rig = take.cameras[camera]
    if rig["kind"] == "ego":
        cams = _ego_cameras(take, tl)  # all of them: the head jitter is a running process
        for k, i in enumerate(frames):
            out[k] = render_scene(
                _scene(take, tl, i),
                cams[i],
                ss=ss,
                body=False,
                tint=(1.06, 1.0, 0.90),
                vignette=0.45,
            )
    else:
        cam = _exo_camera(rig, take.size)
        bg = render_background(cam, ss)
        shapes = ShapeCache()  # the fixed camera films what did not move with the same pixels
        prev = None
        for k, i in enumerate(frames):
            if prev is not None and _same_scene(tl, i, frames[prev]):
                out[k] = out[prev]  # nothing moved and the camera is fixed: the same pixels
                continue
            out[k] = render_scene(_scene(take, tl, i), cam, ss=ss, background=bg, shapes=shapes)
            prev = k
    return out


def _same_scene(tl: Timeline, i: int, j: int) -> bool:
    """Whether frames ``i`` and ``j`` show the same scene (all that :func:`_scene` reads),
    bit for bit (so -0.0 and 0.0 differ)."""
    arrays = (tl.actor_dy, tl.head_yaw, tl.hands, tl.objects)
    return tl.streams[i] == tl.streams[j] and all(a[i].tobytes() == a[j].tobytes() for a in arrays)


def object_screen_positions(
    take: TakeSpec,
    camera: str,
    *,
    timeline: Timeline | None = None,
    indices: np.ndarray | list[int] | None = None,
) -> np.ndarray:
    """Where the centre of each object of ``take`` appears in the frames of ``camera`` (every
    frame or only ``indices``, as :func:`render_take`): ``float32[T, N, 2]``, (x, y) in [0, 1)
    image coordinates (x to the right, y down), NaN where the centre is behind the camera or
    off the image. Occlusion is not checked: an object under the hand still has a position."""
    camera = EGO_CAMERA if camera == "ego" else camera
    if camera not in take.cameras:
        raise KeyError(f"take {take.name} has no camera {camera!r}; it has {list(take.cameras)}")
    tl = timeline or simulate(take)
    frames = range(take.num_frames) if indices is None else [int(i) for i in indices]
    rig = take.cameras[camera]
    per_frame = _ego_cameras(take, tl) if rig["kind"] == "ego" else None
    fixed = None if per_frame is not None else _exo_camera(rig, take.size)
    lift = np.array([[0.0, 0.0, object_size(o.shape)[1] / 2] for o in take.objects], np.float32)
    out = np.full((len(frames), len(take.objects), 2), np.nan, np.float32)
    for k, i in enumerate(frames):
        cam = fixed if per_frame is None else per_frame[i]
        uv, in_front = cam.project(tl.objects[i] + lift, 1)
        uv = uv / take.size
        ok = in_front & np.all((uv >= 0.0) & (uv < 1.0), axis=1)
        out[k, ok] = uv[ok]
    return out


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: int,
    *,
    crf: int = DEFAULT_CRF,
    pix_fmt: str = DEFAULT_PIX_FMT,
    gop: int | None = None,
) -> None:
    """Encode ``uint8[T, H, W, 3]`` RGB frames as H.264 mp4 (single-threaded: reproducible)."""
    t, h, w, _ = frames.shape
    with av.open(str(path), "w", format="mp4") as container:
        st = container.add_stream("libx264", rate=Fraction(fps))
        st.width, st.height, st.pix_fmt = w, h, pix_fmt
        st.time_base = Fraction(1, fps)
        st.codec_context.thread_count = 1
        gop = gop or 2 * fps  # short GOPs so that seeking to a clip start is cheap
        # mbtree=0: with x264's macroblock-tree lookahead, identical input gave different
        # bitstreams from run to run (measured); without it the output is byte-identical.
        params = f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0"
        st.codec_context.options = {"crf": str(crf), "preset": "faster", "x264-params": params}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(st.encode(frame))
        container.mux(st.encode(None))
