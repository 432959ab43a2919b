"""bench/demo_profile.py's tables from known timings (the profile itself runs the demo: minutes)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from exo2ego_jax.demo import runner
from input_pipeline import clip_cache

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    sys.path.insert(0, str(BENCH))  # it imports bench/accelerator.py as its script would
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_demo_profile", BENCH / "demo_profile.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_tables_from_known_timings():
    dp = _load()
    phases = runner.Phases()
    phases.record("world rendering", 12.0, takes=8)
    phases.record("LM pretraining", 6.0, steps=30)
    phases.record("stage 0", 20.0, steps=4)
    phases.record("EgoBench", 2.0)
    timing = {
        "wall_s": 20.0,
        "setup_s": 4.0,
        "compile_s": 9.0,
        "flop_count_s": 2.0,
        "data_s": 0.4,
        "host_s": 0.2,
        "device_s": 2.0,
        "checkpoint_s": 2.4,
        "steps": 4,
        "model_flops": 4e9,  # 1 GFLOP a step
        "sync_each_step": True,
    }
    out = {
        "results": {"stages": {0: {"timing": timing, "compiled_shapes": 2}}},
        "phases": phases,
        "demo_s": 40.0,
        "peak": 100e9,
        "peaks": (80e9, 100e9),
        "cache": ("/x/jax_cache", 0, 7),
        "commit": "abc1234",
        "clip_cache": "3 clips decoded",
    }
    table = dp.report(argparse.Namespace(quick=True), out, (1.0, 2.0), 41.0, "Fresh dirs")
    rows = table.splitlines()
    assert "| world rendering | 12.0 | 30% | 8 takes | 1.50 s/take |" in rows
    assert "| LM pretraining | 6.0 | 15% | 30 steps | 0.20 s/step |" in rows
    assert "| stage 0 | 20.0 | 50% | 4 steps |  |" in rows  # no per-step wall for a stage
    assert "| 0 | 4 | 2 | 20.0 | 4.0 | 9.0 | 2.0 | 0.4 | 0.2 | 2.0 | 2.4 |" in rows
    # 100 / 50 / 500 ms a step; 1 GFLOP in 0.5 s = 2 GFLOP/s = 2 % of 100, 4 GFLOP / 20 s
    # = 0.2 %.
    assert "| 0 | 100 | 50 | 500 | 650 | 1.00 | 2.0 | 2.0% | 0.20% |" in rows
    assert "empty at the start (7 entries at the end)" in table
    assert "commit abc1234; decoded-clip cache: 3 clips decoded." in table
    assert "load average 1.0 at the start, 2.0 at the end; whole run 41s" in table
    assert "world rendering 12s (30%); stage 0 compile 9s (22%); LM pretraining 6s (15%)" in table


def test_clip_cache_line_reports_the_process_cache(monkeypatch):
    monkeypatch.setattr(clip_cache, "_PROCESS_CACHE", None)
    dp = _load()
    assert dp.clip_cache_line() == "off"
    cache = clip_cache.process_cache(1)
    for key in (1, 2, 3, 3):  # 3 evicts 1
        cache.get(key, lambda: np.zeros((2**19,), np.uint8))  # 0.5 MiB each
    assert dp.clip_cache_line() == (
        "3 clips decoded, 1 of 4 look-ups served from memory (25%), 1 MiB held at the end, "
        "1 evicted"
    )
