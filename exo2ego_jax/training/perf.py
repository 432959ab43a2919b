"""What a performance engineer reads while a stage trains: model TFLOP/s per device, MFU
against the chip's nominal peak, and an optional profiler trace for TensorBoard.

Model FLOPs are XLA's count (``cost_analysis``) of the train step lowered without
rematerialisation, so recomputed activations do not count (with ``remat_policy="none"`` the
compiled step's own count is used). They are per device: the count of the SPMD-partitioned
step. MFU divides them by the chip's nominal dense bfloat16 peak (:data:`PEAK_TFLOPS`, or
``config.peak_tflops``); on a chip of unknown peak (and on CPU) MFU is not logged.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax

#: Nominal dense bfloat16 TFLOP/s per chip, by a substring of ``jax.Device.device_kind``.
#: Vendors' data sheets; never measured here.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6 lite", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v4", 275.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
)


def nominal_peak_tflops(device: jax.Device | None = None) -> float | None:
    """The chip's nominal peak from :data:`PEAK_TFLOPS`, or None."""
    kind = (device or jax.devices()[0]).device_kind
    for key, peak in PEAK_TFLOPS:
        if key in kind:
            return peak
    return None


def xla_flops(compiled_or_lowered: Any) -> float | None:
    """XLA's FLOP count of a compiled or lowered computation (None if unavailable)."""
    try:
        cost = compiled_or_lowered.cost_analysis()
    except Exception:  # noqa: BLE001 — not every backend implements it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return flops or None


def perf_scalars(flops: float | None, seconds: float, peak_tflops: float | None) -> dict:
    """``model_tflops_per_device`` (and ``mfu`` against ``peak_tflops``) of ``flops`` model
    FLOPs per device done in ``seconds``; empty when the FLOPs are unknown."""
    if not flops:
        return {}
    tflops = flops / max(seconds, 1e-9) / 1e12
    out = {"model_tflops_per_device": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out


#: The parts of a stage's wall time (:class:`StageTiming`), in the order a step meets them.
TIMING_PARTS = ("setup", "compile", "flop_count", "data", "host", "device", "checkpoint")


class StageTiming:
    """Where one stage's wall-clock time goes, in seconds, measured without a host sync.

    Each :meth:`lap` charges the time since the previous one (or since construction) to one
    part, so the parts add up to the time from construction to the last lap:

    * ``setup``: config, mesh, input streams, parameters (random init, pretrained weights,
      earlier stages' checkpoints, a resumed checkpoint) and the loop's writers;
    * ``compile``: lowering and compiling the train step for each batch shape;
    * ``flop_count``: counting each shape's model FLOPs (one more lowering of the step);
    * ``data``: waiting for the streams' next batch (reading, decoding, batching);
    * ``host``: host-side batch work (padding the text to its bucket, placing the batch on
      the mesh, counting tokens), logging, the progress bar, and leaving the stage (freeing
      its state, executables and checkpointer);
    * ``device``: dispatching the step and waiting for its results. Without a sync per step
      (the default) the host waits only where the loop reads the metrics (log points,
      checkpoints), so this is the device time not hidden behind the host's work; with
      ``sync_each_step`` (``config.profile_timing``) the host waits after every step, so it
      is the whole of the steps' compute, and nothing overlaps;
    * ``checkpoint``: Orbax saves (the state copied to the host; written too unless the save
      is asynchronous, whose writing then overlaps the next steps) and the final wait for
      them.

    ``steps`` counts the steps run; ``model_flops`` sums their model FLOPs per device
    (None once a step's count is unknown).
    """

    def __init__(self, sync_each_step: bool = False):
        self.sync_each_step = sync_each_step
        self.seconds = dict.fromkeys(TIMING_PARTS, 0.0)
        self.steps = 0
        self.model_flops: float | None = 0.0
        self._start = self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        """Charges the seconds since the previous lap to ``part``."""
        now = time.perf_counter()
        self.seconds[part] += now - self._last
        self._last = now

    def move(self, seconds: float, source: str, target: str) -> None:
        """Re-charges ``seconds`` of ``source`` to ``target`` (e.g. a compilation that
        happened inside a step's dispatch)."""
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def add_step(self, flops: float | None) -> None:
        """Counts one step and its model FLOPs per device (None: unknown)."""
        self.steps += 1
        self.model_flops = (
            None if flops is None or self.model_flops is None else (self.model_flops + flops)
        )

    def summary(self) -> dict[str, Any]:
        """``{"wall_s", "<part>_s" for each of TIMING_PARTS, "steps", "model_flops",
        "sync_each_step"}``; ``wall_s`` is the time since construction."""
        return {
            "wall_s": time.perf_counter() - self._start,
            **{f"{k}_s": v for k, v in self.seconds.items()},
            "steps": self.steps,
            "model_flops": self.model_flops,
            "sync_each_step": self.sync_each_step,
        }


class Profiler:
    """A ``jax.profiler`` trace of steps ``[start, stop)`` into ``<workdir>/profile``
    (``config.profile_steps = (start, stop)``; ``(0, 0)`` = off). Open it in TensorBoard's
    profile tab or Perfetto."""

    def __init__(self, workdir: Path, steps: tuple[int, int] | None):
        self.start, self.stop_at = tuple(steps or (0, 0))
        self.directory = Path(workdir) / "profile"
        self.active = False

    def step(self, step: int) -> None:
        """Call after step ``step`` (1-based) was dispatched."""
        if self.stop_at <= self.start:
            return
        if step == self.start and not self.active:
            jax.profiler.start_trace(str(self.directory))
            self.active = True
            logging.info("profiling steps %d-%d into %s", self.start, self.stop_at, self.directory)
        elif step >= self.stop_at and self.active:
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
