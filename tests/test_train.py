"""The stage trainer in-process: resume, refused hand-offs, divergence, bad configs.

main.py running every stage with real hand-offs and a SIGKILL restart: test_main.py.
"""

from __future__ import annotations

import pytest
from train_helpers import streams_for

from configs import stage0, stage1, stage2, stage3
from exo2ego_jax import config_lib
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.loop import TrainingDivergedError, train
from exo2ego_jax.training.optim import make_optimizer

STAGE_CONFIGS = {0: stage0, 1: stage1, 2: stage2, 3: stage3}


def _config(stage, tmp_path, steps=4, **overrides):
    c = STAGE_CONFIGS[stage].get_config("demo")
    c.init.llm = c.init.clip = ""
    c.init.stages = tuple(str(tmp_path / f"stage{i}") for i in range(stage))
    c.optim.num_steps = steps
    c.log_every = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.mesh.shape = (-1, 1, 1)
    for k, v in overrides.items():
        obj = c
        *parents, leaf = k.split(".")
        for p in parents:
            obj = obj[p]
        obj[leaf] = v
    return c


def test_resume_continues_with_identical_losses(tmp_path):
    full = train(
        _config(0, tmp_path, steps=6), tmp_path / "full", streams=streams_for(0), progress=False
    )
    # Interrupted run: the stream fails when step 5 asks for its batch.
    streams = streams_for(0)
    it = streams["exo_caption"].iterator
    original_next = type(it).__next__

    def failing_next(self):
        if self.index >= 4:
            raise KeyboardInterrupt("simulated interruption")
        return original_next(self)

    type(it).__next__ = failing_next
    try:
        with pytest.raises(KeyboardInterrupt):
            train(_config(0, tmp_path, steps=6), tmp_path / "cut", streams=streams, progress=False)
    finally:
        type(it).__next__ = original_next
    resumed = train(
        _config(0, tmp_path, steps=6), tmp_path / "cut", streams=streams_for(0), progress=False
    )
    assert resumed["start_step"] == 4  # steps 1-4 ran; step 4 was checkpointed
    assert resumed["losses"] == full["losses"][4:]


def test_wrong_or_missing_previous_stage_is_refused(tmp_path):
    train(
        _config(0, tmp_path, steps=2), tmp_path / "stage0", streams=streams_for(0), progress=False
    )
    # Stage 2 pointed at stage 0's workdir twice: stages must come in increasing order.
    c = _config(2, tmp_path)
    c.init.stages = (str(tmp_path / "stage0"), str(tmp_path / "stage0"))
    with pytest.raises(
        checkpoints.HandOffError, match="holds a stage 0 checkpoint, listed after stage 0"
    ):
        train(c, tmp_path / "stage2", streams=streams_for(2), progress=False)
    # A stage cannot start from itself (or a later stage).
    c = _config(0, tmp_path)
    c.init.stages = (str(tmp_path / "stage0"),)
    with pytest.raises(checkpoints.HandOffError, match="listed first .* for a stage-0 run"):
        train(c, tmp_path / "stage0b", streams=streams_for(0), progress=False)
    c = _config(1, tmp_path)
    c.init.stages = (str(tmp_path / "nowhere"),)
    with pytest.raises(config_lib.ConfigError, match=r"config.init.stages\[0\].*no such workdir"):
        train(c, tmp_path / "stage1", streams=streams_for(1), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    c = _config(0, tmp_path, steps=6)
    streams = streams_for(0, nan_at=3)
    with pytest.raises(TrainingDivergedError, match="loss is nan at step 4"):
        train(c, tmp_path / "nan", streams=streams, progress=False)
    step, _ = checkpoints.read_meta(tmp_path / "nan")
    assert step == 2


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mesh.shape", (3, 1, 1), "does not match the 8 available devices"),
        ("optim.batch_size", 6, "not divisible by the 8 data-parallel devices"),
        ("model.fusion", "sideways", "fusion='sideways'"),
        ("model.image_size", 30, "not a multiple of the CLIP patch size"),
        ("model.dtype", "float64", "config.model.dtype='float64'"),
        ("model.llm.num_heads", 3, "LLM heads do not divide: hidden_size=64, num_heads=3"),
        ("data.on_bad_video", "ignore", "skip | raise"),
    ],
)
def test_bad_fields_fail_before_compute(tmp_path, field, value, message):
    c = _config(0, tmp_path, **{field: value})
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(c)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches of 4 with grad_accum=2 update exactly like one batch of 8."""
    import jax
    import numpy as np
    from train_helpers import CountingStream

    from exo2ego_jax import stages
    from exo2ego_jax.models.exo2ego import Exo2Ego

    c = _config(1, tmp_path)
    model = Exo2Ego(config_lib.build_model_config(c.model))
    st = config_lib.build_stage_config(c.stage)
    params = model.init(jax.random.key(0))
    trainable, frozen = stages.split_params(params, stages.trainable_patterns(st, model))
    big = next(CountingStream(0, 8, "single", length=16))
    batch = {"exo_caption": big}
    halves = [{"exo_caption": {k: v[i * 4 : (i + 1) * 4] for k, v in big.items()}} for i in (0, 1)]

    def run(accum, batches):
        c.optim.grad_accum = accum
        opt = make_optimizer(c.optim, total_steps=10)
        step = jax.jit(stages.make_train_step(model, st, opt))
        t, s = trainable, opt.init(trainable)
        for b in batches:
            t, s, _ = step(t, s, frozen, b)
        return t

    one = run(1, [batch])
    two = run(2, halves)
    after_first = run(2, halves[:1])
    for a, b, c0, p in zip(
        jax.tree.leaves(one),
        jax.tree.leaves(two),
        jax.tree.leaves(after_first),
        jax.tree.leaves(trainable),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(c0), np.asarray(p))  # no update mid-way
