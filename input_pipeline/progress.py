"""Progress bars: plain ``tqdm`` by default; one display for a whole multi-phase run.

Every long loop of the library (the trainer, the stand-in pretrainers, world rendering, the
evaluation) opens its bar through :func:`bar`, with ``tqdm``'s arguments. Alone, that is a
``tqdm`` bar. Inside :func:`run_display` (the demo opens one), every bar becomes the live
line of one display instead, labelled with the run's current phase, the phase's own
estimate and an estimate of the time left for the whole run::

    [demo 6/10 stage 0] 45%|████▌ | 900/2000 [00:40<00:49, 22.1it/s, loss=0.41 · demo ~6:12 left]

The run's estimate is the current bar's time left plus, for each phase still to come, its
expected seconds (from the caller's table) scaled by how fast this machine ran the finished
phases relative to that table; it is an estimate, refined as phases finish.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tqdm.auto import tqdm

_lock = threading.Lock()
_active: RunDisplay | None = None


def bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A progress bar with ``tqdm``'s arguments: a ``tqdm`` of its own, or the live line of
    the active :func:`run_display` (which then shows the run's phase and time left)."""
    kwargs.setdefault("dynamic_ncols", True)
    display = _active
    if display is None or kwargs.get("disable"):
        return tqdm(iterable, **kwargs)
    return display.phase_bar(iterable, **kwargs)


def format_seconds(seconds: float) -> str:
    """``75 -> '1:15'``, ``3725 -> '1:02:05'``."""
    s = max(int(round(seconds)), 0)
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class RunDisplay:
    """The phases of one run, in order, with their expected seconds (``expected[name]``; 0 or
    missing = unknown). :meth:`phase` marks one running; :meth:`left` estimates the rest."""

    def __init__(self, label: str, phases: list[str], expected: Mapping[str, float]) -> None:
        self.label = label
        self.phases = list(phases)
        self.expected = {k: float(expected.get(k, 0.0)) for k in self.phases}
        self.done: dict[str, float] = {}
        self.current: str | None = None
        self.started = 0.0
        self._bar: tqdm | None = None

    def speed(self) -> float:
        """Actual / expected seconds over the finished phases with an expectation (1 at first)."""
        known = [k for k in self.done if self.expected.get(k)]
        if not known:
            return 1.0
        return sum(self.done[k] for k in known) / sum(self.expected[k] for k in known)

    def left(self) -> float:
        """Estimated seconds to the end of the run."""
        factor = self.speed()
        todo = [k for k in self.phases if k not in self.done and k != self.current]
        rest = sum(self.expected[k] for k in todo) * factor
        if self.current is None:
            return rest
        elapsed = time.perf_counter() - self.started
        now = max(self.expected.get(self.current, 0.0) * factor - elapsed, 0.0)
        b = self._bar
        if b is not None and b.total and b.n > b.initial:
            # tqdm's smoothed recent rate (a stage's first step includes its compilation),
            # else the average since the bar opened (on tqdm's clock).
            rate = tqdm.format_dict.fget(b).get("rate")
            rate = rate or (b.n - b.initial) / max(b._time() - b.start_t, 1e-9)
            now = (b.total - b.n) / rate
        return now + rest

    def prefix(self) -> str:
        if self.current is None:
            return f"[{self.label}]"
        i = self.phases.index(self.current) + 1 if self.current in self.phases else 0
        return f"[{self.label} {i}/{len(self.phases)} {self.current}]"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks ``name`` as running for the ``with`` block; records its wall time."""
        if name not in self.phases:
            self.phases.append(name)
            self.expected.setdefault(name, 0.0)
        self.current, self.started = name, time.perf_counter()
        try:
            yield
        finally:
            self.done[name] = time.perf_counter() - self.started
            self.current = None

    def phase_bar(self, iterable: Iterable | None, **kwargs: Any) -> tqdm:
        desc = kwargs.pop("desc", None)
        same = desc is None or desc == self.current  # "[demo 6/10 stage 0] stage 0" reads badly
        kwargs["desc"] = self.prefix() if same else f"{self.prefix()} {desc}"
        kwargs.setdefault("leave", False)
        b = _PhaseBar(iterable, display=self, **kwargs)
        self._bar = b
        return b


class _PhaseBar(tqdm):
    """A ``tqdm`` bar whose line ends with the run's estimated time left."""

    def __init__(self, *args: Any, display: RunDisplay, **kwargs: Any) -> None:
        self._display = display
        super().__init__(*args, **kwargs)

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        left = f" · {self._display.label} ~{format_seconds(self._display.left())} left"
        d["postfix"] = (d.get("postfix") or "") + left if d.get("postfix") else left.lstrip(" ·")
        return d

    def close(self) -> None:
        if self._display._bar is self:
            self._display._bar = None
        super().close()


@contextlib.contextmanager
def run_display(
    label: str, phases: list[str], expected: Mapping[str, float] | None = None
) -> Iterator[RunDisplay]:
    """Inside the ``with`` block every :func:`bar` is a line of this one display."""
    global _active
    display = RunDisplay(label, phases, expected or {})
    with _lock:
        previous, _active = _active, display
    try:
        yield display
    finally:
        with _lock:
            _active = previous
