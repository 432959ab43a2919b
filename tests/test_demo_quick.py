"""``python main.py --demo --quick``: the whole pipeline (world, datasets, both stand-ins,
stages 0-3 with their Orbax hand-offs, EgoBench, the chat check) on a tiny world."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from exo2ego_jax.training import checkpoints
from input_pipeline import egobench

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_piece(tmp_path):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "EXO2EGO_TEST_JAX_CACHE", "/tmp/exo2ego-jax-test-cache"
    )
    workdir, data = tmp_path / "runs", tmp_path / "data"
    out = subprocess.run(
        [sys.executable, "main.py", "--demo", "--quick", f"--workdir={workdir}",
         f"--data_dir={data}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "demo_summary.json").read_text())
    assert sorted(summary["stages"]) == ["0", "1", "2", "3"]
    for stage in range(4):
        step, meta = checkpoints.read_meta(workdir / f"stage{stage}")
        assert step == 4 and meta["finished"] and meta["stage"] == stage
        assert summary["stages"][str(stage)]["timing"]["steps"] == 4
    assert list(summary["phases"]) == [
        "world rendering", "dataset preparation", "LM pretraining", "CLIP-corpus rendering",
        "CLIP pretraining", "stage 0", "stage 1", "stage 2", "stage 3", "EgoBench", "chat check",
    ]  # fmt: skip
    assert all(phase["seconds"] > 0 for phase in summary["phases"].values())
    assert set(summary["eval"]) == set(egobench.TASKS)
    assert summary["chat_check"]["total"] == 3
    assert (data / "prepared" / "llm" / "config.json").is_file()
    assert (data / "prepared" / "clip" / "config.json").is_file()
    assert "[demo] finished in" in out.stdout
