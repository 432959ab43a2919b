"""Simulation: where the hands, objects, head and gaze are in every frame of a take.

Each step adds keyframes to smooth-step tracks (:class:`_Track`); :func:`simulate` samples
them at the frame times into a :class:`Timeline`. Positions are metres in the world frame of
:mod:`input_pipeline.synthetic.raycast`; the actor stands at ``y = ACTOR_Y``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from input_pipeline.synthetic.raycast import object_size
from input_pipeline.synthetic.takes import Step, TakeSpec, footprint

__all__ = ["ACTOR_Y", "Timeline", "simulate"]

# Actor and body layout (metres, world frame): the actor's y, and the palm centres of the
# left and right hand at rest and when holding an object up.
ACTOR_Y = -0.30
_REST = np.array([[-0.17, -0.05, 0.09], [0.17, -0.05, 0.09]], np.float32)
_HOLD = np.array([[-0.13, 0.10, 0.20], [0.13, 0.10, 0.20]], np.float32)


class _Track:
    """Piecewise smooth-step interpolation between keyframes (value held outside them)."""

    def __init__(self, value):
        self.times = [0.0]
        self.values = [np.asarray(value, np.float32)]

    @property
    def last(self) -> np.ndarray:
        return self.values[-1]

    def key(self, t: float, value=None) -> None:
        """Add a keyframe at ``t`` (>= the last one); ``None`` holds the current value."""
        v = self.last if value is None else np.asarray(value, np.float32)
        if t < self.times[-1] - 1e-9:
            raise ValueError("keyframes must be added in time order")
        self.times.append(float(t))
        self.values.append(v)

    def sample(self, times: np.ndarray) -> np.ndarray:
        ts = np.asarray(self.times)
        vs = np.stack(self.values)
        i = np.clip(np.searchsorted(ts, times, side="right") - 1, 0, len(ts) - 1)
        j = np.minimum(i + 1, len(ts) - 1)
        span = np.maximum(ts[j] - ts[i], 1e-9)
        u = np.clip((times - ts[i]) / span, 0.0, 1.0)
        u = u * u * (3.0 - 2.0 * u)
        u = u.reshape(u.shape + (1,) * (vs.ndim - 1))
        return (vs[i] + u * (vs[j] - vs[i])).astype(np.float32)


@dataclass
class Timeline:
    """Per-frame state of a take: positions ``float32[T, ...]`` at times ``float[T]``."""

    times: np.ndarray  # [T]
    hands: np.ndarray  # [T, 2, 3]
    objects: np.ndarray  # [T, N, 3] base centres
    head_yaw: np.ndarray  # [T]
    actor_dy: np.ndarray  # [T]
    gaze: np.ndarray  # [T, 3]
    streams: list[list[tuple[int, int]]]  # per frame: (object, bowl) being poured


def _grasp(shape: str, side: int) -> np.ndarray:
    """Offset from an object's base centre to the palm holding it (``side`` 0 left, 1 right)."""
    r, h = object_size(shape)
    sgn = 1.0 if side else -1.0
    if shape == "knife":
        return np.array([sgn * 0.035, -0.03, 0.04], np.float32)
    return np.array([sgn * (r + 0.03), -0.01, 0.55 * h], np.float32)


class _Choreography:
    """Keyframes of hands, objects, head and gaze, added action by action."""

    def __init__(self, take: TakeSpec):
        self.take = take
        self.hands = [_Track(_REST[0]), _Track(_REST[1])]
        self.objs = [_Track((o.x, o.y, 0.0)) for o in take.objects]
        self.yaw, self.dy = _Track(0.0), _Track(0.0)
        self.gaze = _Track((0.0, 0.32, 0.02))
        self.holder: dict[int, int] = {}  # object -> index of the hand holding it
        self.pours: list[tuple[float, float, int, int]] = []  # (t0, t1, object, bowl)
        self.shakes: list[tuple[float, float, int, int]] = []  # (t0, t1, hand, object)

    def add(self, s: Step) -> None:
        for tr in (*self.hands, *self.objs, self.yaw, self.dy, self.gaze):
            tr.key(s.t0)  # hold everything still up to the start of the action
        at = lambda f: s.t0 + f * (s.t1 - s.t0)  # noqa: E731  (fraction -> time)
        if s.is_nav:
            self._nav(s, at)
            return
        p = self.objs[s.obj].last.copy()
        side = self.holder.get(s.obj, 1 if p[0] >= 0 else 0)  # the nearer hand
        g = _grasp(self.take.objects[s.obj].shape, side)
        verb = {"put in": "put down", "pull": "push"}.get(s.verb, s.verb)
        getattr(self, "_" + verb.replace(" ", "_"))(s, at, p, side, g)

    def _nav(self, s: Step, at) -> None:
        sgn = 1.0 if s.direction in ("left", "forward") else -1.0
        peak = 0.75 * sgn if s.verb == "turn" else 0.0  # head yaw, radians (43 degrees)
        shift = 0.14 * sgn if s.verb == "step" else 0.0  # body shift along y, metres
        for f, amount in ((0.4, 1.0), (0.7, 1.0), (1.0, 0.0)):
            self.yaw.key(at(f), peak * amount)
            self.dy.key(at(f), shift * amount)
            for k in (0, 1):
                self.hands[k].key(at(f), _REST[k] + [0.0, shift * amount, 0.0])

    def _pick_up(self, s: Step, at, p, side: int, g) -> None:
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), p)
        hand.key(at(0.4), p + g + [0, 0, 0.07])
        hand.key(at(0.55), p + g)
        obj.key(at(0.55), p)
        hand.key(s.t1, _HOLD[side])
        obj.key(s.t1, _HOLD[side] - g)  # from the grasp on, the object moves with the hand
        self.holder[s.obj] = side

    def _put_down(self, s: Step, at, p, side: int, g) -> None:
        if s.verb == "put in":
            q = self.objs[s.target].last + [0.0, 0.0, 0.012]
        else:
            q = np.array([s.dest[0], s.dest[1], 0.0], np.float32)
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), q)
        hand.key(at(0.55), q + g + [0, 0, 0.06])
        obj.key(at(0.55), q + [0, 0, 0.06])
        hand.key(at(0.7), q + g)
        obj.key(at(0.7), q)
        hand.key(s.t1, _REST[side])
        self.holder.pop(s.obj, None)

    def _push(self, s: Step, at, p, side: int, g) -> None:
        v = np.array([s.dest[0], s.dest[1], 0.0], np.float32) - p
        vhat = v / max(float(np.linalg.norm(v)), 1e-6)
        # the hand comes in behind the object (opposite the motion) and slides with it
        contact = p - vhat * (footprint(self.take.objects[s.obj].shape) + 0.045)
        contact = contact + [0, 0, 0.04]
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.2), p)
        hand.key(at(0.35), contact + [0, 0, 0.05])
        hand.key(at(0.45), contact)
        obj.key(at(0.45), p)
        hand.key(at(0.85), contact + v)
        obj.key(at(0.85), p + v)
        self.gaze.key(at(0.8), p + v)
        hand.key(s.t1, _REST[side])

    def _touch(self, s: Step, at, p, side: int, g) -> None:
        _, h = object_size(self.take.objects[s.obj].shape)
        top = p + [0.0, -0.02, h]
        hand = self.hands[side]
        self.gaze.key(at(0.25), p)
        hand.key(at(0.4), top + [0, 0, 0.08])
        hand.key(at(0.5), top + [0, 0, 0.03])
        hand.key(at(0.62), top + [0, 0, 0.09])
        hand.key(s.t1, _REST[side])

    def _pour(self, s: Step, at, p, side: int, g) -> None:
        b = self.objs[s.target].last
        _, hb = object_size("bowl")
        pour_at = b + [(0.10 if side else -0.10), -0.04, hb + 0.05]  # beside, above the bowl
        hand, obj = self.hands[side], self.objs[s.obj]
        self.gaze.key(at(0.25), b)
        for f in (0.4, 0.8):
            hand.key(at(f), pour_at + g)
            obj.key(at(f), pour_at)
        hand.key(s.t1, _HOLD[side])
        obj.key(s.t1, _HOLD[side] - g)
        self.pours.append((at(0.45), at(0.78), s.obj, s.target))

    def _shake(self, s: Step, at, p, side: int, g) -> None:
        self.shakes.append((at(0.1), at(0.9), side, s.obj))  # oscillation added when sampling

    def timeline(self, times: np.ndarray) -> Timeline:
        hands = np.stack([self.hands[0].sample(times), self.hands[1].sample(times)], 1)
        n = len(self.objs)
        objs = (
            np.stack([tr.sample(times) for tr in self.objs], 1)
            if n
            else np.zeros((len(times), 0, 3), np.float32)
        )
        for ta, tb, side, o in self.shakes:
            env = np.sin(np.pi * np.clip((times - ta) / (tb - ta), 0.0, 1.0))
            tau = times - ta
            off = np.stack(
                [
                    0.035 * env * np.sin(2 * np.pi * 3.5 * tau),
                    np.zeros_like(tau),
                    0.025 * env * np.sin(2 * np.pi * 7.0 * tau),
                ],
                -1,
            ).astype(np.float32)
            hands[:, side] += off
            objs[:, o] += off
        streams: list[list[tuple[int, int]]] = [[] for _ in times]
        for ta, tb, o, b in self.pours:
            for i in np.nonzero((times >= ta) & (times <= tb))[0]:
                streams[int(i)].append((o, b))
        return Timeline(
            times=times,
            hands=hands,
            objects=objs,
            head_yaw=self.yaw.sample(times),
            actor_dy=self.dy.sample(times),
            gaze=self.gaze.sample(times),
            streams=streams,
        )


def simulate(take: TakeSpec) -> Timeline:
    """Hands, objects, head and gaze for every frame of ``take``."""
    ch = _Choreography(take)
    for s in take.steps:
        ch.add(s)
    return ch.timeline(np.arange(take.num_frames, dtype=np.float64) / take.fps)
