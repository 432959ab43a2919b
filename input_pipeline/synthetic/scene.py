"""The scene the ray caster draws (:mod:`input_pipeline.synthetic.raycast`): the room, the
table, the objects, the actor's arms and body, and whole frames (:func:`render_scene`,
:func:`render_background`).

Colours are float32 RGB in [0, 1]; shapes are drawn through a depth buffer, so the drawing
order matters only where the renderer says so (the room last: it fills what nothing covers).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from input_pipeline.synthetic.raycast import (
    AMBIENT,
    DIFFUSE,
    LIGHT,
    OBJECT_SIZES,
    ROOM_MAX,
    ROOM_MIN,
    TABLE_MAX,
    TABLE_MIN,
    WOOD,
    Camera,
    Canvas,
    ShapeCache,
    as_pixels,
    box_corners,
    draw_box,
    draw_capsule,
    draw_cylinder,
    draw_part,
    nan_to_inf,
    tinted,
)

__all__ = ["ObjectState", "SceneState", "render_background", "render_scene"]


@dataclass
class ObjectState:
    """One object at one instant: ``pos`` is the centre of its base (``float[3]``)."""

    shape: str
    rgb: tuple[float, float, float]
    pos: np.ndarray
    yaw: float = 0.0


@dataclass
class SceneState:
    """Everything visible at one instant. Hands are palm centres; shoulders are joint centres."""

    objects: list[ObjectState]
    hands: np.ndarray  # float[2, 3] (left, right)
    shoulders: np.ndarray  # float[2, 3]
    head: np.ndarray  # float[3] head centre
    head_yaw: float  # radians, 0 = facing +y, positive = turned left
    hip: np.ndarray  # float[3]
    shirt: tuple[float, float, float]
    pants: tuple[float, float, float]
    skin: tuple[float, float, float] = (0.93, 0.72, 0.60)
    hair: tuple[float, float, float] = (0.22, 0.14, 0.08)
    streams: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def _draw_shadow(cv: Canvas, center_xy, radius: float) -> None:
    """Soft-looking blob shadow on the table top under a lifted object or hand."""
    cx, cy = float(center_xy[0]), float(center_xy[1])
    if not (TABLE_MIN[0] < cx < TABLE_MAX[0] and TABLE_MIN[1] < cy < TABLE_MAX[1]):
        return
    z = 0.0015
    lo = np.array([cx - radius, cy - radius, z], np.float32)
    win = cv.window(box_corners(lo, lo + [2 * radius, 2 * radius, 0.0]))
    if win is None:
        return
    dx, dy, dz = (p[win] for p in cv.planes)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - cv.origin[2]) / dz
    px = cv.origin[0] + t * dx - cx
    py = cv.origin[1] + t * dy - cy
    r2 = (px * px + py * py) / (radius * radius)
    hit = (t > 0) & (r2 < 1.0)
    col = tinted(WOOD * (AMBIENT + DIFFUSE * LIGHT[2]), 0.55 + 0.3 * r2)
    cv.put(win, nan_to_inf(t), hit, col)


# The room's materials, indices into _ROOM_PALETTE: floor tiles, ceiling, then per wall (in
# _WALLS order) its paint, then its landmark, then the skirting board shared by all walls.
_FLOOR_DARK, _FLOOR_LIGHT, _CEILING, _WALL0, _MARK0, _SKIRTING = 0, 1, 2, 3, 7, 11
# Walls: (axis of the face normal, whether the ray leaves through the + face), paint, landmark
# rectangle (h0, h1, v0, v1) in (the wall's horizontal coordinate, z) and the landmark colour
# (window, door, shelf, poster) for orientation. The horizontal coordinate is x for the walls
# across y and y for the walls across x.
_WALLS = (
    ((1, True), [0.72, 0.78, 0.86], (-0.9, 0.9, 0.3, 1.3), [0.85, 0.95, 1.0]),
    ((1, False), [0.84, 0.78, 0.66], (-0.5, 0.4, -0.75, 1.2), [0.35, 0.22, 0.12]),
    ((0, True), [0.70, 0.80, 0.70], (0.0, 1.0, 0.2, 0.3), [0.30, 0.20, 0.10]),
    ((0, False), [0.86, 0.72, 0.74], (-0.5, 0.5, 0.2, 1.0), [0.15, 0.45, 0.55]),
)
_ROOM_PALETTE = np.array(
    [[0.38, 0.38, 0.40], [0.50, 0.50, 0.52], [0.90, 0.90, 0.88]]
    + [w[1] for w in _WALLS]
    + [w[3] for w in _WALLS]
    + [[0.3, 0.3, 0.3]],
    np.float32,
)
_ROOM_PIXELS = as_pixels(_ROOM_PALETTE[None])[0]  # the palette as _PIXEL[12]
# landmark rectangles per wall, float32[4] each: compared in float32, as float32 coordinates
# are with Python floats
_WALL_RECTS = [np.array([w[2][k] for w in _WALLS], np.float32) for k in range(4)]


def _room_materials(axis: np.ndarray, pos: np.ndarray, x, y, z) -> np.ndarray:
    """Material index (into ``_ROOM_PALETTE``) of room hits ``int8[N]`` from the exit face
    (``axis int[N]``, ``pos bool[N]``) and the hit point ``x, y, z float32[N]``."""
    floor = np.where(_odd_tile(x, y), np.int8(_FLOOR_LIGHT), np.int8(_FLOOR_DARK))  # checker
    on_floor_or_ceiling = np.where(pos, np.int8(_CEILING), floor)
    # index into _WALLS (int8 throughout: the same values as int64, 8x less memory)
    wall = np.where(axis == 1, np.int8(0), np.int8(2)) + np.where(pos, np.int8(0), np.int8(1))
    h = np.where(axis == 1, x, y)
    h0, h1, v0, v1 = (r[wall] for r in _WALL_RECTS)
    mark = (h > h0) & (h < h1) & (z > v0) & (z < v1)
    on_wall = np.where(mark, wall + np.int8(_MARK0), wall + np.int8(_WALL0))
    on_wall = np.where(z < -0.65, np.int8(_SKIRTING), on_wall)
    return np.where(axis == 2, on_floor_or_ceiling, on_wall)


def _odd_tile(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether ``(floor(x / 0.5) + floor(y / 0.5)) % 2 > 0`` (float32 ``x``, ``y``), for the
    finite points inside the room: ``x / 0.5`` is exactly ``2 x`` and the floors are small
    integers, so their sum is odd in int32 exactly when it is in float32, and an int32 parity
    costs a tenth of a float32 remainder. Other points (a ray that leaves through a wall) may
    get any value: the floor's colour is used only where the ray meets the floor."""
    two = np.float32(2.0)
    with np.errstate(invalid="ignore"):  # non-finite points: values never used
        fx = np.floor(x * two).astype(np.int32)
        fy = np.floor(y * two).astype(np.int32)
    fx += fy
    fx &= 1
    return fx.astype(bool)


def _draw_room(cv: Canvas) -> None:
    """Floor, walls and ceiling (the ray leaves an axis-aligned box), on empty pixels only."""
    idx = np.flatnonzero(np.isinf(cv.depth))
    if idx.size == 0:
        return
    d = [p.reshape(-1)[idx] for p in cv.planes]  # x, y, z of the rays, float32[N] each
    o = cv.origin
    ts = []
    for k in range(3):  # distance to the wall the ray leaves through, per axis
        with np.errstate(divide="ignore", invalid="ignore"):
            tk = (np.where(d[k] > 0, ROOM_MAX[k], ROOM_MIN[k]) - o[k]) / d[k]
        ts.append(np.where(np.isfinite(tk) & (tk > 0), tk, np.inf))
    # the first axis of the nearest exit and its distance
    axis = np.where(ts[1] < ts[0], np.int8(1), np.int8(0))
    axis = np.where(ts[2] < np.minimum(ts[0], ts[1]), np.int8(2), axis)
    t = np.minimum(np.minimum(ts[0], ts[1]), ts[2])
    x, y, z = (o[k] + t * d[k] for k in range(3))
    dir_on_axis = np.where(axis == 0, d[0], np.where(axis == 1, d[1], d[2]))
    materials = _room_materials(axis, dir_on_axis > 0, x, y, z)
    # whole pixels (12-byte items) gathered and scattered: 4x faster than rows of 3 floats
    np.put(cv.pixels.reshape(-1), idx, np.take(_ROOM_PIXELS, materials))
    cv.depth.reshape(-1)[idx] = t


# the colour of the table's sides, one _PIXEL (the float32 values of WOOD * 0.6)
_TABLE_SIDE = as_pixels(np.asarray(WOOD * 0.6, np.float32).reshape(1, 1, 3))[0, 0]


def _draw_table(cv: Canvas) -> None:
    """Wooden table top (striped grain) on four legs."""
    win = cv.window(box_corners(TABLE_MIN, TABLE_MAX))
    if win is not None:
        # cameras are above the table: a ray hits the top plane inside the rectangle, or else
        # enters through a side face if it is inside the rectangle at the bottom plane
        dx, dy, dz = (p[win] for p in cv.planes)
        o = cv.origin
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_dz = 1.0 / dz
        hits, ts = [], []
        for z in (TABLE_MAX[2], TABLE_MIN[2]):
            t = (z - o[2]) * inv_dz
            px, py = o[0] + t * dx, o[1] + t * dy
            hits.append(
                (t > 0)
                & (px >= TABLE_MIN[0])
                & (px <= TABLE_MAX[0])
                & (py >= TABLE_MIN[1])
                & (py <= TABLE_MAX[1])
            )
            ts.append((t, py))
        top = hits[0]
        t = np.where(top, ts[0][0], ts[1][0])
        grain = 0.93 + 0.07 * np.sin(ts[0][1] * np.float32(2 * np.pi / 0.06))
        col = tinted(WOOD * (AMBIENT + DIFFUSE * LIGHT[2]), grain)  # the top
        # the sides: one masked copy of whole pixels (float32, as the per-channel copies were)
        np.copyto(as_pixels(col), _TABLE_SIDE, where=~top)
        cv.put(win, nan_to_inf(t), top | hits[1], col)
    for lx in (TABLE_MIN[0] + 0.05, TABLE_MAX[0] - 0.05):
        for ly in (TABLE_MIN[1] + 0.05, TABLE_MAX[1] - 0.05):
            draw_capsule(
                cv, (lx, ly, -0.05), (lx, ly, ROOM_MIN[2]), 0.025, WOOD * 0.55, only_empty=True
            )


def _draw_object(cv: Canvas, ob: ObjectState) -> None:
    rgb = np.asarray(ob.rgb, np.float32)
    x, y, z = (float(v) for v in ob.pos)
    r, h = OBJECT_SIZES[ob.shape]
    if ob.shape == "cup":
        draw_cylinder(cv, (x, y), r, z, z + h, rgb, inner=(0.8, rgb * 0.3))
        c, s = np.cos(ob.yaw), np.sin(ob.yaw)
        hx, hy = x + c * (r + 0.015), y + s * (r + 0.015)
        draw_capsule(cv, (hx, hy, z + 0.03), (hx, hy, z + 0.08), 0.013, rgb * 0.85)
    elif ob.shape == "bowl":
        draw_cylinder(cv, (x, y), r, z, z + h, rgb, inner=(0.85, rgb * 0.55 + 0.25))
    elif ob.shape == "bottle":
        body = 0.15
        draw_cylinder(cv, (x, y), r, z, z + body, rgb)
        draw_cylinder(cv, (x, y), 0.018, z + body, z + h - 0.025, rgb * 0.9)
        draw_cylinder(cv, (x, y), 0.021, z + h - 0.025, z + h, (0.92, 0.92, 0.92))
    elif ob.shape == "box":
        draw_box(cv, (x, y, z + h / 2), (r, r, h / 2), ob.yaw, rgb)
    elif ob.shape == "knife":
        c, s = np.cos(ob.yaw), np.sin(ob.yaw)
        hc = (x - c * 0.055, y - s * 0.055, z + 0.0125)
        draw_box(cv, hc, (0.05, 0.017, 0.0125), ob.yaw, rgb)
        bc = (x + c * 0.06, y + s * 0.06, z + 0.005)
        draw_box(cv, bc, (0.065, 0.015, 0.005), ob.yaw, (0.80, 0.82, 0.85))
    else:
        raise ValueError(f"unknown object shape {ob.shape!r}")


def _draw_arm(cv: Canvas, shoulder, hand, side: float, sleeve, skin) -> None:
    """Upper arm and forearm (sleeve colour) and a palm (skin) ending at ``hand``."""
    shoulder = np.asarray(shoulder, np.float32)
    hand = np.asarray(hand, np.float32)
    elbow = 0.5 * (shoulder + hand) + np.array([0.07 * side, -0.02, -0.12], np.float32)
    reach = hand - elbow
    reach /= max(float(np.linalg.norm(reach)), 1e-6)
    wrist = hand - 0.045 * reach
    draw_capsule(cv, shoulder, elbow, 0.042, sleeve)
    draw_capsule(cv, elbow, wrist, 0.036, sleeve)
    draw_capsule(cv, wrist, hand + 0.02 * reach, 0.036, skin)


def _draw_body(cv: Canvas, hip, head, head_yaw: float, shirt, pants, skin, hair) -> None:
    """Torso, legs, neck and head of the actor (exo views only; arguments as in
    :class:`SceneState`, passed one by one so that a :class:`ShapeCache` sees all it reads)."""
    hip, head = np.asarray(hip, np.float32), np.asarray(head, np.float32)
    neck = head - [0.0, 0.0, 0.13]
    draw_capsule(cv, hip + [0, 0, 0.08], neck - [0, 0, 0.04], 0.15, shirt)
    for side in (-1.0, 1.0):
        draw_capsule(
            cv, hip + [0.08 * side, 0, -0.02], hip + [0.08 * side, 0.0, -0.68], 0.065, pants
        )
    draw_capsule(cv, neck, neck + [0, 0, 0.05], 0.05, skin)
    fwd = np.array([-np.sin(head_yaw), np.cos(head_yaw), 0.0], np.float32)
    draw_capsule(cv, head, head, 0.095, skin)
    draw_capsule(
        cv, head - 0.03 * fwd + [0, 0, 0.025], head - 0.03 * fwd + [0, 0, 0.025], 0.092, hair
    )
    draw_capsule(cv, head + 0.095 * fwd, head + 0.095 * fwd, 0.022, np.asarray(skin) * 0.85)


def _draw_placed_object(cv: Canvas, shape: str, rgb, pos: np.ndarray, yaw: float) -> None:
    """An object (as :class:`ObjectState`) and, when it is lifted, its shadow below it."""
    if pos[2] > 0.02:
        _draw_shadow(cv, pos[:2], min(OBJECT_SIZES[shape][0], 0.08) * 1.1)
    _draw_object(cv, ObjectState(shape, rgb, pos, yaw))


def _draw_hand(cv: Canvas, side: float, hand: np.ndarray, shoulder, sleeve, skin) -> None:
    """An arm ending at ``hand`` and, when the hand is lifted, its shadow below it."""
    if hand[2] > 0.02:
        _draw_shadow(cv, hand[:2], 0.045)
    _draw_arm(cv, shoulder, hand, side, sleeve, skin)


def render_background(cam: Camera, ss: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Static room + table for a fixed camera: (``float32[S, S, 3]`` colour, depth)."""
    cv = Canvas(cam, ss, None)
    _draw_table(cv)
    _draw_room(cv)
    return cv.color, cv.depth


def _box_filter(color: np.ndarray, ss: int) -> np.ndarray:
    """Mean of each ``ss x ss`` block of ``float32[S, S, 3]``: ``float32[S/ss, S/ss, 3]``
    (the sub-pixels added in row-major order, in place, then divided).

    One channel at a time: numpy's inner loops then run along the rows, not over the 3
    channels of a pixel (2x faster), and every sum is the same."""
    s = color.shape[0] // ss
    img = np.empty((s, s, 3), np.float32)
    for k in range(3):
        plane, out = color[..., k], img[..., k]
        np.copyto(out, plane[0::ss, 0::ss])
        for i in range(ss):
            for j in range(ss):
                if i or j:
                    out += plane[i::ss, j::ss]
    img /= ss * ss
    return img


@functools.lru_cache(maxsize=8)
def _vignette(size: int, strength: float) -> np.ndarray:
    """Darkening factor ``float32[size, size]`` towards the corners (read-only, cached)."""
    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    r2 = g[None, :] ** 2 + g[:, None] ** 2
    out = 1.0 - strength * r2 / 2.0
    out.flags.writeable = False
    return out


def render_scene(
    sc: SceneState,
    cam: Camera,
    *,
    ss: int = 2,
    body: bool = True,
    background: tuple[np.ndarray, np.ndarray] | None = None,
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
    vignette: float = 0.0,
    shapes: ShapeCache | None = None,
) -> np.ndarray:
    """Render one frame, ``uint8[size, size, 3]``.

    ``body=False`` omits torso, legs and head (the head-mounted view never sees them).
    ``background`` is a cached :func:`render_background` for the same camera and ``ss``.
    ``tint`` multiplies the channels and ``vignette`` darkens the corners (sensor look).
    ``shapes`` is a :class:`ShapeCache` kept from frame to frame of this (fixed) camera: parts
    of the scene that did not move are written from it (the same pixels).
    """
    cv = Canvas(cam, ss, background)
    if background is None:
        _draw_table(cv)
    cv.defer()
    if shapes is not None:
        shapes.next_frame(cam, ss)
        cv.cache = shapes
    for ob in sc.objects:
        draw_part(cv, _draw_placed_object, ob.shape, ob.rgb, ob.pos, ob.yaw)
    for a, b in sc.streams:
        draw_part(cv, draw_capsule, a, b, 0.02, (0.45, 0.85, 1.0))
    for side, hand, shoulder in zip((-1.0, 1.0), sc.hands, sc.shoulders, strict=True):
        draw_part(cv, _draw_hand, side, hand, shoulder, sc.shirt, sc.skin)
    if body:
        args = (sc.hip, sc.head, sc.head_yaw, sc.shirt, sc.pants, sc.skin, sc.hair)
        draw_part(cv, _draw_body, *args)
    cv.flush()
    if background is None:
        _draw_room(cv)  # last: it only fills what nothing else covers
    s = cam.size
    img = _box_filter(cv.color, ss)
    shade = _vignette(s, vignette) if vignette else None
    for k, value in enumerate(np.asarray(tint, np.float32)):  # per channel: no broadcasting
        img[..., k] *= value
        if shade is not None:
            img[..., k] *= shade
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
