"""Command-line errors: one line naming the field or file and the fix, exit status 1, no
traceback (``EXO2EGO_TRACEBACK=1`` shows it); a paper-size run without pretrained weights
refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from exo2ego_jax import config_lib

ROOT = Path(__file__).resolve().parents[1]


def _main(*args: str, traceback: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "EXO2EGO_TRACEBACK": "1" if traceback else ""}
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config=configs/stage0.py", "--config.optim.learning_rate=1e-4"],
            "main.py: error: --config.optim.learning_rate: the config has no field "
            "'optim.learning_rate'; did you mean --config.optim.lr?",
        ),
        (
            ["--config=configs/no_such_stage.py"],
            "main.py: error: --config=configs/no_such_stage.py: no such file",
        ),
        (
            ["--config=configs/stage0.py:paper"],
            "main.py: error: config.init.clip and config.init.llm empty",
        ),
    ],
)
def test_user_errors_are_one_line(args, message):
    out = _main(*args)
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr


def test_traceback_on_request():
    out = _main("--config=configs/stage0.py", "--config.optim.learning_rate=1", traceback=True)
    assert out.returncode == 1
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr


@pytest.mark.parametrize(
    "fields, missing",
    [
        ({}, "config.init.clip and config.init.llm"),
        ({"init.llm": "X"}, "config.init.clip empty"),
        ({"init.clip": "X"}, "config.init.llm empty"),
        ({"init.converted": "X"}, None),
        ({"init.allow_random": True}, None),
    ],
)
def test_paper_preset_refuses_random_weights(tmp_path, fields, missing):
    c = common.base_config(2, "paper")
    c.init.stages = ()
    c.mesh.shape, c.optim.batch_size = (-1, 1, 1), 8
    for key, value in fields.items():
        c.update_from_flattened_dict({key: str(tmp_path) if value == "X" else value})
    if missing is None:
        config_lib.resolve(c)
    else:
        with pytest.raises(config_lib.ConfigError, match=missing):
            config_lib.resolve(c)
