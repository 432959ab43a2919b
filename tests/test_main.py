"""``main.py`` end to end in subprocesses: every stage on a tiny world, SIGKILL + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from exo2ego_jax.training import checkpoints

ROOT = Path(__file__).resolve().parents[1]


def _cmd(stage: int, prepared: Path, workdir: Path, steps: int, stages_root: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "main.py"),
        f"--config={ROOT}/configs/stage{stage}.py",
        f"--workdir={workdir}",
        f"--config.data.prepared_dir={prepared}",
        f"--config.data.tokenizer={prepared / 'tokenizer'}",
        "--config.init.llm=",
        "--config.init.clip=",
        f"--config.init.stages={_tuple([str(stages_root / f'stage{i}') for i in range(stage)])}",
        f"--config.optim.num_steps={steps}",
        "--config.optim.batch_size=2",
        "--config.log_every=1",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=False",
    ]


def _tuple(items: list[str]) -> str:
    """A Python tuple literal for an ml_collections command-line override."""
    return "(" + "".join(f"{x!r}," for x in items) + ")"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    env["PYTHONPATH"] = str(ROOT)
    # The runs below compile the same stage-0 program five times: the tests' persistent
    # cache (conftest.py) compiles it once.
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "EXO2EGO_TEST_JAX_CACHE", "/tmp/exo2ego-jax-test-cache"
    )
    return env


def _losses(workdir: Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _logged_steps(workdir: Path) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _final_params(workdir: Path) -> dict[str, bytes]:
    """The bytes of every parameter of the stage's last checkpoint."""
    directory = workdir / "checkpoints"
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    flat = traverse_util.flatten_dict(restored["params"], sep="/")
    return {k: np.asarray(v).tobytes() for k, v in flat.items()}


@pytest.mark.slow
def test_main_runs_every_stage_and_resumes_after_sigkill(prepared, tmp_path):
    runs = tmp_path / "runs"
    # Uninterrupted stage 0.
    ref = runs / "stage0"
    subprocess.run(
        _cmd(0, prepared, ref, 8, runs),
        check=True,
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=600,
    )
    want = _losses(ref)
    assert sorted(want) == list(range(1, 9))

    # The same run, killed with SIGKILL once step 4 is checkpointed, then restarted.
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        _cmd(0, prepared, cut, 8, runs),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while not (cut / "checkpoints" / "4").is_dir():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    assert finished and finished[-1] in (4, 6)  # no half-written step directory is picked up
    out = subprocess.run(
        _cmd(0, prepared, cut, 8, runs),
        check=True,
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert f"resumed from {cut / 'checkpoints'}/{finished[-1]}" in out.stderr
    # The resumed run re-ran the steps after the restored one: each step is logged once.
    assert _logged_steps(cut) == list(range(1, 9))
    got = _losses(cut)
    for step in range(finished[-1] + 1, 9):
        assert got[step] == want[step], step
    assert _final_params(cut) == _final_params(ref)

    # SIGTERM (preemption): the run saves at the next step and exits cleanly; the next start
    # resumes exactly.
    term = tmp_path / "term"
    proc = subprocess.Popen(
        _cmd(0, prepared, term, 8, runs),
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while not (term / "checkpoints" / "2").is_dir():
        assert proc.poll() is None, "training ended before it could be stopped"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stop requested (SIGTERM)" in stderr and "Traceback" not in stderr
    stopped = max(int(p.name) for p in (term / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= stopped < 8  # saved at the step it stopped, not at a periodic save
    subprocess.run(
        _cmd(0, prepared, term, 8, runs), check=True, env=_env(), cwd=ROOT,
        capture_output=True, timeout=600,
    )  # fmt: skip
    assert _logged_steps(term) == list(range(1, 9))
    assert _losses(term) == want
    assert _final_params(term) == _final_params(ref)

    # Stages 1-3 from main.py, each handing off from the previous stages' real checkpoints.
    for stage in (1, 2, 3):
        out = subprocess.run(
            _cmd(stage, prepared, runs / f"stage{stage}", 2, runs),
            env=_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert "hand-off" in out.stderr and f"stage {stage}: 2 steps" in out.stdout
        assert (runs / f"stage{stage}" / "checkpoints" / "2").is_dir()
    # Stage 3 saved only what it trains: the ego connector and CLIP, F, and the LoRA adapters.
    _, meta = checkpoints.read_meta(runs / "stage3")
    assert {p.split("/")[0] for p in meta["param_paths"]} == {"ego_encoder", "F", "llm"}
    assert all(p.endswith(("lora_a", "lora_b")) for p in meta["param_paths"] if p[:4] == "llm/")
