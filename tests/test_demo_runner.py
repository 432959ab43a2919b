"""The demo runner's plumbing without training: its phase plan, its one progress display,
and that a stage stopped by SIGTERM stops the demo (no later stage starts from it)."""

from __future__ import annotations

import io

import pytest

from exo2ego_jax.demo import runner
from input_pipeline import progress

ALL = [
    "world rendering", "dataset preparation", "LM pretraining", "CLIP pretraining",
    "stage 0", "stage 1", "stage 2", "stage 3", "EgoBench", "chat check",
]  # fmt: skip


def test_planned_phases_skip_what_is_on_disk(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    assert runner.planned_phases(work, data) == ALL
    (data / "world").mkdir(parents=True)
    (data / "world" / "world.json").write_text("{}")
    (data / "prepared" / "tokenizer").mkdir(parents=True)
    assert runner.planned_phases(work, data) == ALL[2:]


def test_a_preempted_stage_stops_the_demo_inside_one_display(tmp_path, monkeypatch):
    trained, lines = [], []

    def fake_train(config, workdir, log):
        stage = config.stage.stage
        trained.append((stage, config.seed))
        bar = progress.bar(total=10, desc=f"stage {stage}", file=io.StringIO())
        lines.append(bar.desc)
        bar.close()
        summary = {"first_loss": 1.0, "last_loss": 0.5, "start_step": 0, "steps": 3}
        return {**summary, "preempted": True, "compiled_shapes": 1, "timing": {}}

    monkeypatch.setattr(runner, "prepare_data", lambda *a, **k: None)
    monkeypatch.setattr(runner, "train", fake_train)
    with pytest.raises(runner.DemoInterrupted, match="stage 0 stopped at step 3"):
        runner.run(tmp_path / "work", tmp_path / "data", seed=3, log=lambda _: None)
    assert trained == [(0, 3)]  # stage 1 never started from the unfinished stage 0
    assert lines == ["[demo 5/10 stage 0]"]  # the whole demo's display, stage 0 of 10 phases
    assert progress._active is None
