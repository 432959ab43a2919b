"""Pure-numpy ray-cast renderer for the synthetic tabletop world.

World coordinates are metres: ``x`` to the actor's right, ``y`` away from the actor across the
table, ``z`` up, with ``z = 0`` the table top. Every primitive (room, table, boxes, vertical
cylinders, capsules) is intersected analytically with one ray per (super-sampled) pixel and
composited through a depth buffer, so occlusion is exact and the cost of a primitive is bounded
by its on-screen bounding box. Frames are rendered at ``ss x`` resolution and box-filtered down
(anti-aliasing keeps edges codec-friendly, which matters for the PSNR of the encoded videos).

Two camera models: ``pinhole`` (fixed third-person "GoPro" cameras) and ``fisheye``
(equidistant, like the head-mounted Aria glasses), so ego and exo views differ in geometry as
well as in pose.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Camera",
    "Canvas",
    "ShapeCache",
    "draw_box",
    "draw_capsule",
    "draw_cylinder",
    "draw_part",
    "look_rotation",
    "object_size",
    "OBJECT_SIZES",
]

# Directional light (unit vector towards the light): from above, slightly front-left.
LIGHT = np.array([-0.35, -0.45, 1.0], np.float32) / np.linalg.norm([-0.35, -0.45, 1.0])
AMBIENT, DIFFUSE = 0.55, 0.5

# Room and table extents (metres).
ROOM_MIN = np.array([-2.5, -2.5, -0.75], np.float32)
ROOM_MAX = np.array([2.5, 3.0, 1.9], np.float32)
TABLE_MIN = np.array([-0.55, 0.0, -0.04], np.float32)
TABLE_MAX = np.array([0.55, 0.75, 0.0], np.float32)
WOOD = np.array([0.62, 0.45, 0.30], np.float32)

# Footprint radius and height of each object shape (metres): used by the renderer and by the
# world generator for placement, grasp points and collisions.
OBJECT_SIZES: dict[str, tuple[float, float]] = {
    "cup": (0.055, 0.11),
    "bowl": (0.11, 0.06),
    "box": (0.07, 0.10),
    "bottle": (0.042, 0.23),
    "knife": (0.11, 0.025),
}


def object_size(shape: str) -> tuple[float, float]:
    """(radius, height) of a shape in metres."""
    return OBJECT_SIZES[shape]


def _vecmat(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``v @ m`` for ``v: float[..., 3]``, ``m: float[3, 3]``, without BLAS: multi-threaded
    BLAS kernels may round differently from run to run, and frames must be reproducible."""
    v = np.asarray(v, np.float32)
    m = np.asarray(m, np.float32)
    out = np.empty(v.shape, np.float32)
    for k in range(3):
        out[..., k] = v[..., 0] * m[0, k] + v[..., 1] * m[1, k] + v[..., 2] * m[2, k]
    return out


def _vecmat_points(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """:func:`_vecmat` for a few points ``float32[N, 3]``: the same products and sums in the
    same order, in 5 numpy calls instead of 20 (broadcasting is slow only for large N)."""
    return v[:, 0:1] * m[0] + v[:, 1:2] * m[1] + v[:, 2:3] * m[2]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def look_rotation(forward: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Rotation ``float[3, 3]`` whose rows are the camera right, down, forward axes in world.

    ``roll`` (radians) turns the image clockwise around the viewing direction.
    """
    f = _unit(np.asarray(forward, np.float64))
    right = np.cross(f, [0.0, 0.0, 1.0])
    if np.linalg.norm(right) < 1e-6:  # looking straight down/up: pick any right vector
        right = np.array([1.0, 0.0, 0.0])
    right = _unit(right)
    down = np.cross(f, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    return np.stack([right, down, f]).astype(np.float32)


@dataclass(frozen=True)
class Camera:
    """A camera: position ``float[3]``, rotation ``float[3, 3]`` (rows right/down/forward),
    focal length in output pixels, square output ``size`` and lens ``model``."""

    position: np.ndarray
    rotation: np.ndarray
    focal: float
    size: int
    model: str = "pinhole"  # "pinhole" | "fisheye" (equidistant)
    # rays per ss, computed once: a fixed camera films every frame of a take with the same rays
    _rays: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def rays(self, ss: int) -> np.ndarray:
        """Unit ray directions in world coordinates, ``float32[S, S, 3]`` with S = size * ss
        (read-only, cached on the camera)."""
        rays, planes = self._ray_arrays(ss)
        if rays is None:
            rays = np.stack(planes, axis=-1)
            rays.flags.writeable = False
            self._rays[ss] = rays, planes
        return rays

    def ray_planes(self, ss: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The x, y and z components of :meth:`rays`, each a contiguous ``float32[S, S]``
        (whole-image shapes read them faster than the interleaved array)."""
        return self._ray_arrays(ss)[1]

    def _ray_arrays(self, ss: int) -> tuple[np.ndarray, tuple]:
        """(rays, ray planes), computed once per ``ss`` (read-only; the interleaved rays,
        which the renderer does not use, only when asked for)."""
        if ss not in self._rays:
            local = _camera_dir_planes(self.model, self.size, float(self.focal), ss)
            m = self.rotation
            # the arithmetic of _vecmat(local, m), one output component at a time, on the
            # contiguous x, y, z planes (the interleaved ones cost twice as much to read)
            planes = []
            tmp = np.empty_like(local[0])
            for k in range(3):
                a = np.multiply(local[0], m[0, k])
                a += np.multiply(local[1], m[1, k], out=tmp)
                a += np.multiply(local[2], m[2, k], out=tmp)
                a.flags.writeable = False
                planes.append(a)
            planes = tuple(planes)
            self._rays[ss] = None, planes
        return self._rays[ss]

    def project(self, points: np.ndarray, ss: int) -> tuple[np.ndarray, np.ndarray]:
        """Project world points ``float[N, 3]`` to super-sampled pixel coords ``float[N, 2]``
        (x, y); the second output flags points in front of the camera."""
        p = _vecmat_points(np.asarray(points, np.float32) - self.position, self.rotation.T)
        c = self.size * ss / 2.0
        f = self.focal * ss
        if self.model == "pinhole":
            z = np.maximum(p[:, 2], 1e-4)
            uv = c + f * p[:, :2] / z[:, None]
            return uv, p[:, 2] > 1e-3
        rho = np.linalg.norm(p[:, :2], axis=1)
        theta = np.arctan2(rho, p[:, 2])
        scale = np.where(rho > 1e-9, theta / np.maximum(rho, 1e-9), 1.0 / np.maximum(p[:, 2], 1e-9))
        uv = c + f * p[:, :2] * scale[:, None]
        return uv, theta < np.deg2rad(100.0)


@functools.lru_cache(maxsize=16)
def _camera_dir_planes(
    model: str, size: int, focal: float, ss: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x, y and z components of :func:`_camera_dirs`, each a contiguous ``float32[S, S]``
    (read-only, cached)."""
    planes = tuple(
        np.ascontiguousarray(_camera_dirs(model, size, focal, ss)[..., k]) for k in range(3)
    )
    for a in planes:
        a.flags.writeable = False
    return planes


@functools.lru_cache(maxsize=16)
def _camera_dirs(model: str, size: int, focal: float, ss: int) -> np.ndarray:
    """Unit ray directions in camera coordinates, ``float32[S, S, 3]`` (read-only, cached)."""
    s = size * ss
    coords = (np.arange(s, dtype=np.float64) + 0.5 - s / 2.0) / (focal * ss)
    x, y = np.meshgrid(coords, coords)
    if model == "pinhole":
        d = np.stack([x, y, np.ones_like(x)], -1)
    elif model == "fisheye":
        theta = np.sqrt(x * x + y * y)
        sin_over = np.where(theta > 1e-9, np.sin(theta) / np.maximum(theta, 1e-9), 1.0)
        d = np.stack([x * sin_over, y * sin_over, np.cos(theta)], -1)
    else:
        raise ValueError(f"unknown camera model {model!r}; expected 'pinhole' or 'fisheye'")
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    out = d.astype(np.float32)
    out.flags.writeable = False
    return out


class ShapeCache:
    """What the parts of a scene (an object, an arm, the body) wrote on the canvas of one fixed
    camera, by their exact arguments, for :func:`render_scene` (``shapes=``).

    A part's writes (window, distances, hit mask, colours) depend only on the camera, ``ss``
    and the part's arguments, never on what is already drawn: so a part that has not moved
    since the previous frame is written again from here, in its place in the drawing order,
    without intersecting it again (the same arrays: the same pixels). Exo cameras are fixed
    and most of a take's objects stand still in most frames. Entries live for two frames:
    the previous frame's, looked up, and the current one's.
    """

    def __init__(self) -> None:
        self._view: tuple[Camera, int] | None = None
        self._prev: dict[tuple, list[tuple]] = {}
        self._cur: dict[tuple, list[tuple]] = {}

    def next_frame(self, cam: Camera, ss: int) -> None:
        """Start a frame of ``cam`` at ``ss`` (a cache serves one camera and ``ss`` only)."""
        if self._view is None:
            self._view = (cam, ss)
        elif self._view[0] is not cam or self._view[1] != ss:
            raise ValueError("a ShapeCache serves one camera object at one ss")
        self._prev, self._cur = self._cur, {}

    def get(self, key: tuple) -> list[tuple] | None:
        """The writes of the part ``key`` in this or the previous frame, or None."""
        writes = self._cur.get(key)
        if writes is None:
            writes = self._prev.get(key)
            if writes is not None:
                self._cur[key] = writes
        return writes

    def store(self, key: tuple, writes: list[tuple]) -> None:
        """Remember the writes ``(win, t, hit, rgb)`` of the part ``key`` in this frame."""
        self._cur[key] = writes


def _exact_key(value) -> tuple:
    """A hashable key equal for two argument values only if every numpy operation treats them
    alike: arrays by dtype, shape and bytes, floats by bit pattern (``-0.0 != 0.0``), and every
    scalar with its type (a Python float and an ``np.float64`` promote differently)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_exact_key(v) for v in value))
    if isinstance(value, np.generic):
        return (type(value).__name__, value.tobytes())
    if isinstance(value, float):
        return ("float", value.hex())
    if value is None or isinstance(value, (str, int)):  # bool and int apart by type name
        return (type(value).__name__, value)
    raise TypeError(f"no exact key for {type(value).__name__}")


def draw_part(cv: Canvas, draw, *args) -> None:
    """``draw(cv, *args)``: one part of a deferred scene, or, with a :class:`ShapeCache`, the
    writes it made in an earlier frame with the same arguments."""
    if cv.cache is None:
        draw(cv, *args)
        return
    key = (draw.__name__, _exact_key(args))
    writes = cv.cache.get(key)
    if writes is not None:
        cv.queue.extend(("put", w) for w in writes)
        return
    start = len(cv.queue)
    draw(cv, *args)
    cv.parts.append((key, start, len(cv.queue)))  # its writes are resolved at flush


# Windows smaller than this are rendered as they are: shrinking them costs more than it saves.
_NEAR_MIN_PIXELS = 1024
# Capsules in windows smaller than this are intersected in one batch per frame (numpy's
# per-call cost dominates there); larger ones on their own (no copies of their rays).
_BATCH_MAX_PIXELS = 4096


# An RGB float32 pixel as one item, for masked copies of whole pixels.
_PIXEL = np.dtype((np.void, 12))


def as_pixels(color: np.ndarray) -> np.ndarray:
    """``float32[H, W, 3]`` (C-contiguous) viewed as ``_PIXEL[H, W]`` (the same memory)."""
    return color.view(_PIXEL).reshape(color.shape[:2])


class Canvas:
    """Super-sampled colour + depth buffers and the rays of one camera."""

    def __init__(self, cam: Camera, ss: int, background: tuple[np.ndarray, np.ndarray] | None):
        self.cam, self.ss = cam, ss
        self.s = cam.size * ss
        self.origin = cam.position.astype(np.float32)
        self.planes = cam.ray_planes(ss)  # the rays' x, y, z: float32[S, S] each
        if background is None:
            self.color = np.zeros((self.s, self.s, 3), np.float32)
            self.depth = np.full((self.s, self.s), np.inf, np.float32)
        else:
            self.color, self.depth = background[0].copy(), background[1].copy()
        self.pixels = as_pixels(self.color)
        # between defer() and flush(): the writes, in drawing order, and the batched shapes
        self.queue: list[tuple] | None = None
        self.batches: dict[str, list[tuple]] = {}
        # a fixed camera's ShapeCache, and the parts it drew this frame: (key, queue slice)
        self.cache: ShapeCache | None = None
        self.parts: list[tuple] = []

    def defer(self) -> None:
        """Queue writes until :meth:`flush`, and intersect small capsules and cylinders there
        in one batch per kind.

        What a shape draws depends only on the camera and the shape (not on the buffers),
        except under ``only_empty``, which is never deferred: so computing the shapes
        together and then writing everything in the original order changes no pixel.
        """
        self.queue, self.batches = [], {"capsule": [], "cylinder": []}

    def batch(self, kind: str, args: tuple) -> None:
        """Queue the write of a ``kind`` shape (see :data:`_BATCHED`) computed at flush."""
        self.queue.append((kind, len(self.batches[kind])))
        self.batches[kind].append(args)

    def flush(self) -> None:
        """Intersect the batched shapes, then do every queued write in drawing order."""
        queue, self.queue = self.queue, None
        hits = {k: _BATCHED[k](self, v) for k, v in self.batches.items() if v}
        writes = [item if kind == "put" else hits[kind][item] for kind, item in queue]
        if self.cache is not None:  # what each freshly drawn part wrote, for later frames
            for key, start, stop in self.parts:
                self.cache.store(key, writes[start:stop])
        for write in writes:
            self.put(*write)

    def window(self, corners: np.ndarray, pad: int = 2) -> tuple[slice, slice] | None:
        """Screen-space box (rows, cols) that contains the projection of ``corners``."""
        uv, ok = self.cam.project(corners, self.ss)
        if not ok.all():
            return slice(0, self.s), slice(0, self.s)
        lo, hi = uv.min(0), uv.max(0)
        if self.cam.model == "fisheye":  # straight edges bulge under the fisheye: pad more
            pad += int(0.15 * float((hi - lo).max())) + 2
        x0, y0 = (np.floor(lo) - pad).astype(int)
        x1, y1 = (np.ceil(hi) + pad).astype(int)
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, self.s), min(y1, self.s)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def put(self, win, t: np.ndarray, hit: np.ndarray, rgb: np.ndarray) -> None:
        """Depth-test and write ``rgb`` (``float[h, w, 3]`` or ``float[3]``) where ``hit``
        (``t float32[h, w]``, ``hit bool[h, w]``: the window's shape)."""
        if self.queue is not None:
            self.queue.append(("put", (win, t, hit, rgb)))
            return
        dep_view = self.depth[win]
        upd = hit & (t < dep_view)
        np.copyto(dep_view, t, where=upd)  # masked copies: no gather / scatter of pixels
        if rgb.dtype == np.float32 and rgb.shape == t.shape + (3,) and rgb.flags.c_contiguous:
            # a pixel's 3 floats as one 12-byte item: a 2-d mask, ~3x faster than the
            # broadcast one, and a byte copy of the same float32 values
            np.copyto(self.pixels[win], rgb.view(_PIXEL).reshape(t.shape), where=upd)
        else:
            np.copyto(self.color[win], rgb, where=upd[..., None])

    def empty(self, win) -> np.ndarray:
        """Boolean mask of the window's pixels that nothing has been drawn on yet."""
        return np.isinf(self.depth[win])

    def bounds(self, win, ok: np.ndarray) -> tuple[slice, slice] | None:
        """The smallest part of ``win`` holding every pixel where ``ok`` (``bool[h, w]``, the
        window's shape), or None when there is none."""
        in_row = np.flatnonzero(ok.any(1))
        if in_row.size == 0:
            return None
        in_col = np.flatnonzero(ok.any(0))
        r0, c0 = win[0].start, win[1].start
        return (
            slice(r0 + int(in_row[0]), r0 + int(in_row[-1]) + 1),
            slice(c0 + int(in_col[0]), c0 + int(in_col[-1]) + 1),
        )

    def near(self, win, center, radius: float) -> tuple[slice, slice] | None:
        """The part of ``win`` (rows, cols) whose rays pass within ``radius`` of ``center``
        (``float[3]``), or None: the pixels a shape inside that sphere can cover.

        A cheap test that shrinks the window of a shape that fills little of it (a slanted
        arm, fisheye padding) before the exact test. It is conservative (the sphere is grown
        by 5% + 5 mm, far more than float32 rounding can move a pixel's hit test), so the
        pixels left out are ones the shape misses: what is drawn does not change.
        """
        rows, cols = win
        if self.cam.model != "fisheye":  # pinhole windows are tight already (-9% area)
            return win
        if (rows.stop - rows.start) * (cols.stop - cols.start) < _NEAR_MIN_PIXELS:
            return win
        m = np.asarray(center, np.float64) - self.origin
        mm = float(m @ m)
        r2 = (1.05 * radius + 0.005) ** 2
        if mm <= r2:  # the camera is inside the sphere: every ray passes near
            return win
        dx, dy, dz = (p[win] for p in self.planes)
        dm = dx * m[0] + dy * m[1] + dz * m[2]
        return self.bounds(win, (mm - dm * dm) < r2)  # (squared distance of centre and ray)


def nan_to_inf(t: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(t, nan=np.inf)`` (NaN -> inf, +-inf -> the largest finite float) in
    3 numpy calls instead of ~15: a shape's distances, float32[...]."""
    big = np.finfo(t.dtype).max
    return np.where(np.isnan(t), np.inf, np.clip(t, -big, big))


def tinted(rgb: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """``rgb[3] * shade[..., None]`` as ``float32[..., 3]``, one channel at a time (numpy
    broadcasts over a trailing axis of length 3 several times slower). The products are
    computed in the promoted dtype (float64 when ``rgb`` or ``shade`` is: ``LIGHT`` is) and
    rounded once to float32, exactly as the colour buffer would round them."""
    out = np.empty(shade.shape + (3,), np.float32)
    for k in range(3):
        np.multiply(rgb[k], shade, out=out[..., k])
    return out


def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _slab(o: np.ndarray, d: list[np.ndarray], half: np.ndarray):
    """Ray/axis-aligned-box (centred at 0) test: (t_near, hit, axis of the entry face), for
    the origin ``o`` and ``half`` (``float32[3]``) and the ray directions' 3 components ``d``
    (``float32[...]`` each: one numpy call per component instead of one on interleaved
    ``float32[..., 3]`` arrays, several times slower; the same operations per element)."""
    lo, hi = -half - o, half - o
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = [1.0 / dk for dk in d]
        t1 = [lo[k] * inv[k] for k in range(3)]
        t2 = [hi[k] * inv[k] for k in range(3)]
    tn = [np.minimum(a, b) for a, b in zip(t1, t2, strict=True)]
    tf = [np.maximum(a, b) for a, b in zip(t1, t2, strict=True)]
    tn01 = np.maximum(tn[0], tn[1])
    t_near, t_far = np.maximum(tn01, tn[2]), np.minimum(np.minimum(tf[0], tf[1]), tf[2])
    hit = (t_far >= t_near) & (t_near > 0)
    axis = np.where(tn[2] > tn01, 2, np.where(tn[1] > tn[0], 1, 0))  # the first largest
    return nan_to_inf(t_near), hit, axis


# which of the 8 corners of a box take the low coordinate on each axis
_CORNER_IS_LO = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) == 0


def box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners ``float32[8, 3]`` of the axis-aligned box from ``lo`` to ``hi``."""
    return np.where(_CORNER_IS_LO, lo, hi).astype(np.float32)


def _shade(normal: np.ndarray) -> np.ndarray:
    return AMBIENT + DIFFUSE * np.maximum(_dot3(normal, LIGHT), 0.0)


def draw_box(cv: Canvas, center, half, yaw: float, rgb) -> None:
    """Box with vertical axis, rotated by ``yaw`` around z; ``half`` = half extents."""
    center = np.asarray(center, np.float32)
    half = np.asarray(half, np.float32)
    c, s = np.cos(yaw), np.sin(yaw)
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]], np.float32)  # world -> local
    r = float(np.hypot(half[0], half[1]))
    win = cv.window(box_corners(center - [r, r, half[2]], center + [r, r, half[2]]))
    if win is None:
        return
    dx, dy, dz = (p[win] for p in cv.planes)
    m = rot.T
    d = [dx * m[0, k] + dy * m[1, k] + dz * m[2, k] for k in range(3)]  # _vecmat's arithmetic
    t, hit, axis = _slab(_vecmat(cv.origin - center, m), d, half)
    # outward normal of the entry face, back in world coordinates, for Lambert shading
    n_local = [np.where(axis == k, -np.sign(d[k]), 0.0) for k in range(3)]
    n_world = [sum(n_local[k] * rot[k, j] for k in range(3)) for j in range(3)]
    shade = AMBIENT + DIFFUSE * np.maximum(sum(n_world[j] * LIGHT[j] for j in range(3)), 0.0)
    cv.put(win, t, hit, tinted(np.asarray(rgb, np.float32), shade.astype(np.float32)))


def draw_cylinder(
    cv: Canvas,
    center_xy,
    radius: float,
    z0: float,
    z1: float,
    rgb,
    inner: tuple[float, tuple] | None = None,
) -> None:
    """Vertical cylinder; ``inner = (fraction, rgb)`` paints the top disc's centre (a rim)."""
    cx, cy = float(center_xy[0]), float(center_xy[1])
    lo = np.array([cx - radius, cy - radius, z0], np.float32)
    hi = np.array([cx + radius, cy + radius, z1], np.float32)
    win = cv.window(box_corners(lo, hi))
    if win is not None:
        half_h = 0.5 * (z1 - z0)
        win = cv.near(win, (cx, cy, z0 + half_h), float(np.hypot(radius, half_h)))
    if win is None:
        return
    area = (win[0].stop - win[0].start) * (win[1].stop - win[1].start)
    if cv.queue is not None and area < _BATCH_MAX_PIXELS:  # with the frame's small cylinders
        cv.batch("cylinder", (win, cx, cy, radius, z0, z1, rgb, inner))
        return
    # A large cylinder alone: the batched intersection of one (the same per-pixel operations).
    cv.put(*_cylinder_hits(cv, [(win, cx, cy, radius, z0, z1, rgb, inner)])[0])


def _cylinder_hits(cv: Canvas, cylinders: list[tuple]) -> list[tuple]:
    """:func:`draw_cylinder` for many cylinders ``(win, cx, cy, radius, z0, z1, rgb, inner)``
    at once: the arguments of their writes ``(win, t, hit, rgb)`` (as :func:`_capsule_hits`).

    Per pixel, the operations, their order and their dtypes are those of
    :func:`draw_cylinder`: its float32 scalars (the origin relative to the axis, ``c``) are
    computed by the same expressions, its Python floats become float32 where numpy casts
    them so (comparisons and arithmetic with float32 arrays), the shading stays float64.
    """
    wins, counts = _batch_windows(cylinders)
    dx, dy, dz = (np.concatenate([p[w].ravel() for w in wins]) for p in cv.planes)
    per_cylinder = []
    for _, cx, cy, radius, z0, z1, _, inner in cylinders:
        ox, oy, oz = cv.origin[0] - cx, cv.origin[1] - cy, cv.origin[2]
        c = ox * ox + oy * oy - radius * radius
        frac2 = (inner[0] * radius) ** 2 if inner is not None else 0.0
        per_cylinder.append([ox, oy, oz, c, z0, z1, radius * radius, radius, frac2])
    params = np.repeat(np.asarray(per_cylinder, np.float32), counts, axis=0)
    ox, oy, oz, c, z0, z1, r2, radius, frac2 = (np.ascontiguousarray(p) for p in params.T)
    a = np.maximum(dx * dx + dy * dy, 1e-12)
    b = 2.0 * (dx * ox + dy * oy)
    disc = b * b - 4.0 * a * c
    sq = np.sqrt(np.maximum(disc, 0.0))
    t_side = (-b - sq) / (2.0 * a)
    z_side = oz + t_side * dz
    side_hit = (disc >= 0) & (t_side > 0) & (z_side >= z0) & (z_side <= z1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_top = (z1 - oz) / dz
    px, py = ox + t_top * dx, oy + t_top * dy
    rho2 = px * px + py * py
    top_hit = (t_top > 0) & (rho2 <= r2)
    use_top = top_hit & (~side_hit | (t_top < t_side))
    t = np.where(use_top, t_top, np.where(side_hit, t_side, np.inf))
    hit = side_hit | top_hit
    nx = (ox + t_side * dx) / radius
    ny = (oy + t_side * dy) / radius
    side_shade = AMBIENT + DIFFUSE * np.maximum(nx * LIGHT[0] + ny * LIGHT[1], 0.0)
    top_shade = AMBIENT + DIFFUSE * LIGHT[2]
    shade = np.where(use_top, top_shade, side_shade)
    base = np.repeat(np.asarray([cy[6] for cy in cylinders], np.float32), counts, axis=0)
    inner_rgb = [
        np.asarray(cy[7][1] if cy[7] is not None else (0.0, 0.0, 0.0), np.float32) * top_shade
        for cy in cylinders
    ]
    inner_rgb = np.repeat(np.asarray(inner_rgb), counts, axis=0)  # float64, as the original
    has_inner = np.repeat([cy[7] is not None for cy in cylinders], counts)
    in_mask = has_inner & use_top & (rho2 <= frac2)
    col = np.empty(base.shape, np.float32)
    for k in range(3):
        np.multiply(base[:, k], shade, out=col[:, k])
        np.copyto(col[:, k], inner_rgb[:, k], where=in_mask)
    return _split_batch(wins, counts, nan_to_inf(t), hit, col)


def _batch_windows(shapes: list[tuple]) -> tuple[list, list[int]]:
    """The windows of batched shapes (their first field) and their pixel counts."""
    wins = [s[0] for s in shapes]
    return wins, [(w[0].stop - w[0].start) * (w[1].stop - w[1].start) for w in wins]


def _split_batch(wins, counts, t: np.ndarray, hit: np.ndarray, col: np.ndarray) -> list[tuple]:
    """Per window, the write arguments ``(win, t[h, w], hit[h, w], col[h, w, 3])`` of a batch
    computed on the windows' pixels concatenated (``t``, ``hit`` ``[N]``, ``col`` ``[N, 3]``)."""
    out, start = [], 0
    for win, n in zip(wins, counts, strict=True):
        shape = (win[0].stop - win[0].start, win[1].stop - win[1].start)
        part = slice(start, start + n)
        out.append(
            (win, t[part].reshape(shape), hit[part].reshape(shape), col[part].reshape(shape + (3,)))
        )
        start += n
    return out


def draw_capsule(cv: Canvas, a, b, radius: float, rgb, only_empty: bool = False) -> None:
    """Capsule (segment ``a``-``b`` swept by a sphere); a sphere when ``a == b``.

    ``only_empty`` restricts the work to pixels nothing has been drawn on (for large shapes
    that are known to lie behind what is already there, like the table legs).
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    win = cv.window(box_corners(np.minimum(a, b) - radius, np.maximum(a, b) + radius))
    # Only the empty pixels' part of the window, before the near-ray test: a table leg's
    # window is mostly covered by the top, so the test then reads 2.5x fewer rays. The
    # window is another one than with the two tests the other way round, but both hold every
    # pixel that is empty and near, so the same pixels are written.
    if win is not None and only_empty:
        win = cv.bounds(win, cv.empty(win))
    if win is not None:
        half = 0.5 * float(np.linalg.norm(b.astype(np.float64) - a))
        win = cv.near(win, 0.5 * (a.astype(np.float64) + b), half + radius)
    if win is None:
        return
    area = (win[0].stop - win[0].start) * (win[1].stop - win[1].start)
    if cv.queue is not None and not only_empty and area < _BATCH_MAX_PIXELS:
        cv.batch("capsule", (win, a, b, radius, rgb))  # with the frame's other small capsules
        return
    u = b - a
    w0 = cv.origin - a
    cc = float(u @ u)
    dx, dy, dz = (p[win] for p in cv.planes)
    bb = dx * u[0] + dy * u[1] + dz * u[2]
    dd = dx * w0[0] + dy * w0[1] + dz * w0[2]
    if cc < 1e-12:
        s = np.zeros_like(dd)
    else:
        s = np.clip((float(u @ w0) - bb * dd) / np.maximum(cc - bb * bb, 1e-9), 0.0, 1.0)
    t = np.maximum(s * bb - dd, 0.0)  # closest point on the ray to the axis point a + s u
    # offset from the axis point to the ray point, per component (w0 = o - a)
    ex, ey, ez = w0[0] + t * dx - s * u[0], w0[1] + t * dy - s * u[1], w0[2] + t * dz - s * u[2]
    dist2 = ex * ex + ey * ey + ez * ez
    hit = dist2 < radius * radius
    back = np.sqrt(np.maximum(radius * radius - dist2, 0.0))
    t_hit = t - back
    # surface normal at the entry point, dotted with the light
    ndl = (
        (ex - back * dx) * LIGHT[0] + (ey - back * dy) * LIGHT[1] + (ez - back * dz) * LIGHT[2]
    ) / radius
    col = tinted(np.asarray(rgb, np.float32), AMBIENT + DIFFUSE * np.maximum(ndl, 0.0))
    hit &= t_hit > 0
    if only_empty:  # all of the window computed, but written only where nothing was drawn
        hit &= cv.empty(win)
    cv.put(win, t_hit, hit, col)


def _capsule_hits(cv: Canvas, capsules: list[tuple]) -> list[tuple]:
    """:func:`draw_capsule` for many capsules ``(win, a, b, radius, rgb)`` at once: the
    arguments of their writes ``(win, t, hit, rgb)``, ``float32[h, w]`` / ``bool`` /
    ``float32[h, w, 3]`` per window.

    All the capsules' pixels go through one set of numpy calls (a frame has ~15 capsules in
    small windows, where the calls cost more than the arithmetic). Per pixel, the operations,
    their order and their dtypes are those of :func:`draw_capsule` (a capsule's scalars
    become per-pixel float32 values, exactly as numpy casts them there), so are the results.
    """
    wins, counts = _batch_windows(capsules)
    dx, dy, dz = (np.concatenate([p[w].ravel() for w in wins]) for p in cv.planes)
    a = np.stack([c[1] for c in capsules])
    u = np.stack([c[2] for c in capsules]) - a  # float32[P, 3]
    w0 = cv.origin - a
    radius = [c[3] for c in capsules]
    # the scalars of draw_capsule: float(u @ u) and float(u @ w0) enter float32 arithmetic
    # as float32, radius * radius is rounded to float32, the division by radius is float64
    uu = np.array([float(x @ x) for x in u], np.float32)
    uw = np.array([float(x @ y) for x, y in zip(u, w0, strict=True)], np.float32)
    r2 = np.array([r * r for r in radius], np.float32)
    per_pixel = np.repeat(np.concatenate([u, w0, np.stack([uu, uw, r2], 1)], 1), counts, axis=0)
    ux, uy, uz, wx, wy, wz, cc, cw, rr = (np.ascontiguousarray(c) for c in per_pixel.T)
    rad = np.repeat(np.asarray(radius, np.float64), counts)
    sphere = np.repeat(uu.astype(np.float64) < 1e-12, counts)
    bb = dx * ux + dy * uy + dz * uz
    dd = dx * wx + dy * wy + dz * wz
    s = np.clip((cw - bb * dd) / np.maximum(cc - bb * bb, np.float32(1e-9)), 0.0, 1.0)
    s[sphere] = 0.0
    t = np.maximum(s * bb - dd, 0.0)
    ex, ey, ez = wx + t * dx - s * ux, wy + t * dy - s * uy, wz + t * dz - s * uz
    dist2 = ex * ex + ey * ey + ez * ez
    hit = dist2 < rr
    back = np.sqrt(np.maximum(rr - dist2, 0.0))
    t_hit = t - back
    ndl = (
        (ex - back * dx) * LIGHT[0] + (ey - back * dy) * LIGHT[1] + (ez - back * dz) * LIGHT[2]
    ) / rad
    shade = AMBIENT + DIFFUSE * np.maximum(ndl, 0.0)
    rgb = np.repeat(np.asarray([c[4] for c in capsules], np.float32), counts, axis=0)
    col = np.empty(rgb.shape, np.float32)
    for k in range(3):
        np.multiply(rgb[:, k], shade, out=col[:, k])
    hit &= t_hit > 0
    return _split_batch(wins, counts, t_hit, hit, col)


# the shapes computed in batches between Canvas.defer and Canvas.flush
_BATCHED = {"capsule": _capsule_hits, "cylinder": _cylinder_hits}
