"""Reliability of a training run: a diverged run names a checkpoint that really trains on,
metrics are logged once per step across resumes, half-deleted checkpoints are never listed,
unreadable data stops the run past a ceiling, and every numeric config field is range-checked
before any compute (SIGTERM and SIGKILL resume: test_main.py)."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
from train_helpers import CountingStream, streams_for

from configs import stage0
from exo2ego_jax import config_lib
from exo2ego_jax.runtime import load_tokenizer_checked
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.loop import BadDataError, TrainingDivergedError, train
from exo2ego_jax.training.streams import Stream, check_text_room


def _config(tmp_path, steps=6, **overrides):
    c = stage0.get_config("demo")
    c.init.llm = c.init.clip = ""
    c.init.stages = ()
    c.optim.num_steps = steps
    c.log_every = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.update_from_flattened_dict(overrides)
    return c


def _steps_in(workdir) -> list[int]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_divergence_names_a_checkpoint_that_trains_on(tmp_path):
    """Saving every step, the weights saved right before the first NaN loss are the ones that
    produced it: they are dropped, and the checkpoint named is one whose next loss was
    finite. Resuming from it with a sane learning rate trains with finite losses."""
    wd = tmp_path / "run"
    diverging = {
        "optim.lr": 1e9,  # warmup over every step: the run diverges after a few of them
        "optim.warmup_ratio": 1.0,
        "optim.grad_clip": 0.0,
        "checkpoint.every_steps": 1,
        "checkpoint.keep": 3,
    }
    with pytest.raises(TrainingDivergedError) as err:
        train(_config(tmp_path, 12, **diverging), wd, streams=streams_for(0), progress=False)
    message = str(err.value)
    nan_step = int(re.search(r"loss is nan at step (\d+)", message).group(1))
    good = int(re.search(r"checkpoints/(\d+), step", message).group(1))
    assert good == nan_step - 2 >= 1, message  # the save of step nan_step - 1 is dropped
    assert (wd / "checkpoints" / str(good)).is_dir()
    assert checkpoints.StageCheckpointer(wd).all_steps()[-1] == good
    sane = {**diverging, "optim.lr": 1e-3}  # the same optimizer, a learning rate that trains
    resumed = train(_config(tmp_path, good + 4, **sane), wd, streams=streams_for(0), progress=False)
    assert resumed["start_step"] == good
    assert len(resumed["losses"]) == 4 and all(map(math.isfinite, resumed["losses"]))


def test_divergence_without_a_good_checkpoint_says_so(tmp_path):
    c = _config(tmp_path, 6, **{"optim.lr": 1e20, "optim.grad_clip": 0.0})
    with pytest.raises(TrainingDivergedError, match="No checkpoint before it is known good"):
        train(c, tmp_path / "run", streams=streams_for(0), progress=False)
    assert checkpoints.StageCheckpointer(tmp_path / "run").all_steps() == []


def test_metrics_log_each_step_once_after_resumes(tmp_path):
    wd = tmp_path / "run"
    train(_config(tmp_path, 3), wd, streams=streams_for(0), progress=False)  # saves step 2, 3
    assert _steps_in(wd) == [1, 2, 3]
    # A later run of more steps resumes at step 3; a stale line past it (a killed run's) goes.
    with open(wd / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n" + '{"step": 5, "lo')
    train(_config(tmp_path, 6), wd, streams=streams_for(0), progress=False)
    assert _steps_in(wd) == [1, 2, 3, 4, 5, 6]


def test_half_deleted_old_checkpoints_are_never_listed(tmp_path):
    wd = tmp_path / "run"
    train(_config(tmp_path, 6, **{"checkpoint.every_steps": 1}), wd, streams=streams_for(0),
          progress=False)  # fmt: skip
    ckpt_dir = wd / "checkpoints"
    assert sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) == [5, 6]
    # A clean-up killed half-way leaves its victim inside .todelete, never as a step.
    assert not (ckpt_dir / checkpoints.TODELETE).exists()  # emptied after every save
    stale = ckpt_dir / checkpoints.TODELETE / "4"
    (stale / "params").mkdir(parents=True)
    assert checkpoints.StageCheckpointer(wd).all_steps() == [5, 6]
    assert not (ckpt_dir / checkpoints.TODELETE).exists()  # removed when the run reopens


class _SkippingStream(CountingStream):
    """A stream whose pipeline dropped ``bad`` of every ``8 + bad`` examples."""

    def __init__(self, *args, bad: int, **kw):
        super().__init__(*args, **kw)
        self.bad, self.num_skipped, self.num_read, self.skip_reasons = bad, 0, 0, []

    def __next__(self):
        batch = super().__next__()
        self.num_skipped += self.bad
        self.num_read += self.batch + self.bad
        self.skip_reasons.append(f"clip_{self.index}.mp4: cannot decode")
        return batch


def _bad_streams(bad: int) -> dict[str, Stream]:
    return {
        "ego_caption": Stream(_SkippingStream(0, 8, "single", bad=bad), 64),
        "exo_caption": Stream(CountingStream(1, 8, "single"), 64),
    }


def test_skipped_examples_are_reported_and_capped(tmp_path):
    logs: list[str] = []
    summary = train(
        _config(tmp_path, 4, **{"data.max_bad_fraction": 0.2}),
        tmp_path / "ok",
        streams=_bad_streams(1),
        progress=False,
        log=logs.append,
    )  # fmt: skip  (1 bad of 9 read: 11 %)
    assert summary["skipped"] == {"ego_caption": 4}
    assert any("skipped unreadable examples per stream: {'ego_caption': 4}" in m for m in logs)
    text = (tmp_path / "ok" / "metrics.jsonl").read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["skipped_ego_caption"] for x in lines] == [1.0, 2.0, 3.0, 4.0]
    with pytest.raises(
        BadDataError,
        match=r"'ego_caption': 3 of 11 examples \(27.3%\).*"
        r"max_bad_fraction=0.2; first: clip_1.mp4: cannot decode",
    ):
        train(_config(tmp_path, 4, **{"data.max_bad_fraction": 0.2}), tmp_path / "bad",
              streams=_bad_streams(3), progress=False)  # fmt: skip


BAD_VALUES = [
    ("optim.lr", -1e-4, "a number > 0"),
    ("optim.lr", 0.0, "a number > 0"),
    ("optim.lr", float("nan"), "a number > 0"),
    ("optim.warmup_ratio", -0.1, "a number in [0, 1]"),
    ("optim.warmup_ratio", 1.5, "a number in [0, 1]"),
    ("optim.num_epochs", 0, "must be >= 1 (or set config.optim.num_steps > 0)"),
    ("data.workers", -1, "an integer in [0, inf]"),
    ("optim.num_steps", 0, "must be -1 (epochs) or >= 1"),
    ("optim.batch_size", 0, "an integer in [1, inf]"),
    ("optim.grad_accum", 0, "an integer in [1, inf]"),
    ("optim.b1", 1.0, "a number in [0, 1)"),
    ("optim.b2", -0.5, "a number in [0, 1)"),
    ("optim.eps", 0.0, "a number > 0"),
    ("optim.weight_decay", -0.01, "[0, inf]"),
    ("optim.grad_clip", -1.0, "[0, inf]"),
    ("stage.lambda_kl", -1.0, "[0, inf]"),
    ("stage.lambda_vtg", -0.5, "[0, inf]"),
    ("stage.lambda_ccl", float("inf"), "[0, inf]"),
    ("stage.kl_temperature", 0.0, "a number > 0"),
    ("model.num_frames", 0, "an integer in [1, inf]"),
    ("model.image_size", -64, "an integer in [1, inf]"),
    ("model.lora.rank", 0, "an integer in [1, inf]"),
    ("model.lora.alpha", -16, "a number > 0"),
    ("model.lora.dropout", 1.0, "a number in [0, 1)"),
    ("model.mapping.ngf", 0, "an integer in [1, inf]"),
    ("data.max_text_len", 1, "an integer in [2, inf]"),
    ("data.max_bad_fraction", 2.0, "a number in [0, 1]"),
    ("checkpoint.every_steps", 0, "an integer in [1, inf]"),
    ("checkpoint.keep", 0, "an integer in [1, inf]"),
    ("log_every", 0, "an integer in [1, inf]"),
    ("seed", -1, "an integer in [0, inf]"),
    ("optim.num_steps", -5, "must be -1 (epochs) or >= 1"),
]


@pytest.mark.parametrize("field, value, allowed", BAD_VALUES)
def test_every_numeric_field_is_range_checked_first(tmp_path, field, value, allowed):
    c = _config(tmp_path, **({"model.lora.enabled": True} if "lora" in field else {}))
    if field == "optim.num_epochs":
        c.optim.num_steps = -1  # epochs count only without a step count
    c.update_from_flattened_dict({field: value})
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.resolve(c)  # what train() (and evaluate, chat, memory_plan) calls first
    assert str(err.value).startswith(f"config.{field}=")
    assert allowed in str(err.value)


def test_unknown_prng_impl_is_refused(tmp_path):
    c = _config(tmp_path, **{"prng_impl": "philox"})
    with pytest.raises(config_lib.ConfigError, match=r"config.prng_impl='philox': use one of"):
        config_lib.resolve(c)
    for impl in ("", "rbg", "unsafe_rbg"):
        config_lib.resolve(_config(tmp_path, **{"prng_impl": impl}))


def test_train_refuses_a_bad_value_before_building_anything(tmp_path):
    c = _config(tmp_path, **{"optim.lr": -1e-4})
    t = time.time()
    with pytest.raises(config_lib.ConfigError, match=r"config.optim.lr=-0.0001: must be a number"):
        train(c, tmp_path / "run", streams=streams_for(0), progress=False)
    assert time.time() - t < 5 and not (tmp_path / "run").exists()


def test_max_text_len_must_hold_the_templates_fixed_prompt(prepared):
    c = stage0.get_config("demo")
    c.data.tokenizer = str(prepared / "tokenizer")
    c.data.template = "mistral"
    tok = load_tokenizer_checked(c)
    c.data.max_text_len = 20
    with pytest.raises(config_lib.ConfigError, match=r"max_text_len=20: the 'mistral' template"):
        check_text_room(c, tok)
    c.data.max_text_len = 192
    check_text_room(c, tok)
    c.data.template, c.data.max_text_len = "plain", 3
    with pytest.raises(config_lib.ConfigError, match="fixed prompt alone is 2 tokens"):
        check_text_room(c, tok)
