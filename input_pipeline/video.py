"""Video decoding for the input pipeline (PyAV): sample T frames of a time window, as
VideoLLaMA2 does, and bring them to the vision tower's square resolution.

Frame sampling follows VideoLLaMA2's ``process_video`` / ``frame_sample(mode="uniform")``
(videollama2/mm_utils.py): the window ``[s, e]`` seconds becomes the frame range
``[max(int(s * fps) - 1, 0), min(int(e * fps) - 1, n - 1)]``; it is cut into T equal segments
and the middle frame of each is taken, so a window shorter than T frames repeats frames.
Frames are resized (shorter side = ``size``, bicubic) and centre-cropped like the CLIP image
processor, or - with ``pad_to_square`` - padded to a square with the CLIP mean colour
(VideoLLaMA2's ``expand2square``).
"""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from input_pipeline.normalization import CLIP_MEAN, CLIP_STD, normalize_frames

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "VideoDecodeError",
    "denormalize_frames",
    "load_clip",
    "normalize_frames",
    "probe",
    "sample_frame_indices",
]


class VideoDecodeError(RuntimeError):
    """A video could not be decoded: missing, empty, corrupt or truncated file, or a time
    window outside the video. The message names the file, the reason and what to do."""


def _fail(path, reason: str, hint: str) -> VideoDecodeError:
    return VideoDecodeError(f"cannot decode video {os.fspath(path)!r}: {reason}. {hint}")


def sample_frame_indices(
    num_video_frames: int,
    fps: float,
    num_frames: int,
    start_s: float | None = None,
    end_s: float | None = None,
) -> np.ndarray:
    """Indices ``int[num_frames]`` of the frames VideoLLaMA2 samples from ``[start_s, end_s]``.

    ``None`` bounds mean the start / end of the video. Bounds are clamped at 0, swapped if
    reversed, and an empty window (``start_s == end_s``) is widened to one second, as in
    VideoLLaMA2. The caller checks that the window overlaps the video.
    """
    if num_video_frames < 1 or num_frames < 1 or not fps > 0:
        raise ValueError(
            f"need num_video_frames >= 1, num_frames >= 1, fps > 0; got "
            f"{num_video_frames}, {num_frames}, {fps}"
        )
    s, e = start_s, end_s
    if s is not None and e is not None:
        s, e = max(s, 0.0), max(e, 0.0)
        if s > e:
            s, e = e, s
        elif s == e:
            e = s + 1.0
    f_start = 0 if s is None else max(int(s * fps) - 1, 0)
    f_end = num_video_frames - 1 if e is None else min(int(e * fps) - 1, num_video_frames - 1)
    f_start = min(f_start, num_video_frames - 1)
    f_end = max(f_end, f_start)
    duration = f_end - f_start + 1
    seg = float(duration - 1) / num_frames
    mids = [(seg * i + seg * (i + 1)) / 2 for i in range(num_frames)]
    return f_start + np.round(np.array(mids) + 1e-6).astype(np.int64)


def probe(path: str | os.PathLike) -> dict:
    """Frame count, frame rate, duration (s) and size of the first video stream."""
    path = _check_file(path)
    try:
        with av.open(os.fspath(path)) as container:
            st = _video_stream(container, path)
            fps, n = _rate_and_count(container, st, path)
            return {
                "num_frames": n,
                "fps": fps,
                "duration": n / fps,
                "width": st.codec_context.width,
                "height": st.codec_context.height,
            }
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV/FFmpeg raise many types; callers get exactly one
        raise _fail(
            path,
            f"{type(e).__name__}: {e}",
            "The file is probably corrupt or not a video; re-create or re-download it",
        ) from e


def _check_file(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise _fail(
            p,
            "the file does not exist",
            "Check the path (annotation paths are relative to the dataset root)",
        )
    if not p.is_file():
        raise _fail(p, "the path is not a regular file", "Point to an .mp4 file")
    if p.stat().st_size == 0:
        raise _fail(
            p,
            "the file is empty (0 bytes)",
            "It was probably interrupted while being written; re-create it",
        )
    return p


def _video_stream(container, path):
    if not container.streams.video:
        raise _fail(path, "it has no video stream", "Use a file with a video track")
    return container.streams.video[0]


def _rate_and_count(container, st, path) -> tuple[float, int]:
    rate = st.average_rate or st.guessed_rate or st.base_rate
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        raise _fail(path, "its frame rate is unknown", "Re-encode it with a constant frame rate")
    n = int(st.frames or 0)
    if n <= 0:  # container has no frame count: estimate from the duration
        if st.duration is not None and st.time_base is not None:
            n = int(round(float(st.duration * st.time_base) * fps))
        elif container.duration is not None:
            n = int(round(container.duration / av.time_base * fps))
    if n <= 0:
        raise _fail(path, "it contains no frames", "Re-create the file")
    return fps, n


def _resize_crop(frame: av.VideoFrame, size: int, pad_to_square: bool) -> np.ndarray:
    """One decoded frame -> ``uint8[size, size, 3]`` (resize in swscale, then crop / pad)."""
    w, h = frame.width, frame.height
    if pad_to_square:  # longer side -> size, then pad the shorter one with the CLIP mean
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    else:  # shorter side -> size (as the CLIP image processor), then centre crop
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
    img = frame.reformat(width=nw, height=nh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    if pad_to_square:
        out = np.empty((size, size, 3), np.uint8)
        out[:] = [int(m * 255) for m in CLIP_MEAN]
        top, left = (size - nh) // 2, (size - nw) // 2
        out[top : top + nh, left : left + nw] = img
        return out
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(img[top : top + size, left : left + size])


def load_clip(
    path: str | os.PathLike,
    start_s: float | None = None,
    end_s: float | None = None,
    num_frames: int = 16,
    size: int = 336,
    *,
    pad_to_square: bool = False,
) -> np.ndarray:
    """Decode ``num_frames`` frames of ``[start_s, end_s]`` seconds: ``uint8[T, size, size, 3]``.

    Seeks to the key frame before the window and decodes only up to the last sampled frame.
    Raises :class:`VideoDecodeError` (and nothing else) for a missing, empty, corrupt or
    truncated file, or a window that does not overlap the video.
    """
    if num_frames < 1 or size < 1:
        raise VideoDecodeError(
            f"cannot decode video {os.fspath(path)!r}: num_frames and size "
            f"must be >= 1 (got {num_frames}, {size}). Fix the caller."
        )
    path = _check_file(path)
    try:
        with av.open(os.fspath(path)) as container:
            st = _video_stream(container, path)
            fps, n = _rate_and_count(container, st, path)
            duration = n / fps
            s, e = start_s, end_s
            if s is not None and e is not None and s > e:
                s, e = e, s
            if (s is not None and s >= duration) or (e is not None and e < 0):
                raise _fail(
                    path,
                    f"the window [{start_s}, {end_s}] s lies outside the video "
                    f"(0 to {duration:.3f} s)",
                    "Check the clip's start/end times against the video",
                )
            idx = sample_frame_indices(n, fps, num_frames, start_s, end_s)
            frames = _decode_indices(container, st, fps, idx, path)
            return np.stack([_resize_crop(frames[i], size, pad_to_square) for i in idx])
    except VideoDecodeError:
        raise
    except Exception as e:  # PyAV/FFmpeg raise many types; callers get exactly one
        raise _fail(
            path,
            f"{type(e).__name__}: {e}",
            "The file is probably corrupt or truncated; re-create or re-download it",
        ) from e


def _decode_indices(container, st, fps: float, idx: np.ndarray, path) -> dict:
    """Decode the frames with the given indices (``{index: av.VideoFrame}``)."""
    wanted = sorted(set(int(i) for i in idx))
    t0 = float(st.start_time * st.time_base) if st.start_time is not None else 0.0
    got: dict[int, av.VideoFrame] = {}
    first = wanted[0]
    for attempt in range(2):
        if first > 0 and attempt == 0:
            # seek to the key frame at or before the first wanted frame
            target = int((t0 + first / fps) / st.time_base)
            container.seek(target, stream=st, backward=True, any_frame=False)
        else:
            container.seek(
                int(t0 / st.time_base) if st.time_base else 0,
                stream=st,
                backward=True,
                any_frame=False,
            )
        first_seen = None
        for k, frame in enumerate(container.decode(st)):
            if frame.pts is not None:
                i = int(round((float(frame.pts * st.time_base) - t0) * fps))
            else:  # no timestamps: count from the start (only valid without seeking)
                i = k
            first_seen = i if first_seen is None else first_seen
            if i in wanted and i not in got:
                got[i] = frame
            if i >= wanted[-1]:
                break
        if len(got) == len(wanted) or first_seen is None or first_seen <= first:
            break
        got.clear()  # the seek overshot: decode again from the beginning
    missing = [i for i in wanted if i not in got]
    if missing:
        raise _fail(
            path,
            f"frames {missing[:5]}{'...' if len(missing) > 5 else ''} could not "
            f"be decoded (the stream ends early)",
            "The file is probably truncated; re-create or re-download it",
        )
    return got


def denormalize_frames(frames: np.ndarray) -> np.ndarray:
    """:func:`normalize_frames` undone: ``float32[..., 3]`` -> ``uint8[..., 3]`` RGB (what the
    model saw, e.g. to show it)."""
    x = np.asarray(frames, np.float32) * np.asarray(CLIP_STD, np.float32)
    x = x + np.asarray(CLIP_MEAN, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
