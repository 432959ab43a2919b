"""The stage trainer in-process: resume, refused hand-offs, divergence, bad configs.

main.py running every stage with real hand-offs and a SIGKILL restart: test_main.py.
"""

from __future__ import annotations

import time

import jax
import pytest
import train_helpers
from train_helpers import streams_for

from configs import stage0, stage1, stage2, stage3
from exo2ego_jax import config_lib, runtime
from exo2ego_jax.training import checkpoints, loop, perf
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


@pytest.mark.parametrize("sync", [False, True], ids=["default", "profile_timing"])
def test_timing_splits_the_stage_wall_time(tmp_path, monkeypatch, sync):
    """``summary["timing"]``: every part measured (> 0), together the stage's wall time;
    waiting for data and checkpointing are the time spent in the streams and in Orbax; the
    model FLOPs are the trainer's count of the step x steps. The default loop never waits
    for the device per step; ``profile_timing`` waits after every step."""
    spent = {"data": 0.0, "checkpoint": 0.0, "syncs": 0, "step_flops": []}

    def timed(fn, part):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - t0

        return wrapper

    def counted_sync(x):
        spent["syncs"] += 1
        return block_until_ready(x)

    def recorded_flops(*args):
        spent["step_flops"].append(count_flops(*args))
        return spent["step_flops"][-1]

    block_until_ready, count_flops = jax.block_until_ready, loop.model_flops_per_device
    monkeypatch.setattr(jax, "block_until_ready", counted_sync)
    monkeypatch.setattr(loop, "model_flops_per_device", recorded_flops)
    stream = train_helpers.CountingStream
    monkeypatch.setattr(stream, "__next__", timed(stream.__next__, "data"))
    for name in ("save", "close"):
        original = getattr(checkpoints.StageCheckpointer, name)
        monkeypatch.setattr(checkpoints.StageCheckpointer, name, timed(original, "checkpoint"))

    # Losses read at step 2 (a checkpoint) and 3 (the last) only.
    # The demo preset skips the FLOP count (config.count_model_flops); this test times it.
    c = _config(0, tmp_path, steps=3, log_every=10, profile_timing=sync, count_model_flops=True)
    t0 = time.perf_counter()
    summary = train(c, tmp_path / "stage0", streams=streams_for(0), progress=False)
    wall = time.perf_counter() - t0
    t = summary["timing"]
    parts = {k: t[f"{k}_s"] for k in perf.TIMING_PARTS}
    assert all(v > 0 for v in parts.values()), parts
    assert sum(parts.values()) == pytest.approx(t["wall_s"], abs=1e-3)
    # The stage's own clock misses only the call and return (teardown is charged to host).
    assert t["wall_s"] <= wall and t["wall_s"] == pytest.approx(wall, rel=0.05, abs=0.05)
    assert t["data_s"] == pytest.approx(spent["data"], rel=0.05, abs=0.01)
    assert t["checkpoint_s"] == pytest.approx(spent["checkpoint"], rel=0.05, abs=0.01)
    assert spent["syncs"] == (3 if sync else 0)
    assert (t["steps"], t["sync_each_step"]) == (3, sync)
    assert summary["compiled_shapes"] == 1 == len(spent["step_flops"])  # one batch shape
    assert spent["step_flops"][0] > 0
    assert t["model_flops"] == pytest.approx(3 * spent["step_flops"][0], rel=1e-12)


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


class _AdamByHand:
    """Plain Adam (no clipping, no weight decay) on flat ``{path: array}`` params, float64."""

    def __init__(self, params, b1, b2, eps):
        import numpy as np

        self.p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0

    def update(self, grads, lr):
        import numpy as np

        self.t += 1
        for k in self.p:
            g = np.asarray(grads[k], np.float64)
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g**2
            m_hat = self.m[k] / (1 - self.b1**self.t)
            v_hat = self.v[k] / (1 - self.b2**self.t)
            self.p[k] = self.p[k] - lr * m_hat / (np.sqrt(v_hat) + self.eps)


def test_gradient_accumulation_averages_micro_batch_gradients(tmp_path):
    """grad_accum=2 over three updates equals Adam on the mean of the two micro-batches'
    gradients, each micro-batch's VTG normalised by its own supervised-token count
    (make_optimizer's docstring), computed here with jax.grad and Adam written by hand.

    Rows supervise different numbers of tokens (4 to 46), so the per-micro-batch mean differs
    from one token-weighted mean over both micro-batches; the warmup's first update has lr 0,
    so the second and third updates are the ones that move the parameters. Adam is scale
    invariant up to eps: eps is set near the gradients' size so that a sum of the
    micro-batch gradients changes the update.
    """
    import math

    import jax
    import numpy as np
    from flax import traverse_util
    from train_helpers import CountingStream

    from exo2ego_jax import stages
    from exo2ego_jax.models.exo2ego import Exo2Ego

    c = _config(1, tmp_path)
    c.optim.grad_clip = 0.0  # clipping to norm 1 would hide a sum (both clipped alike)
    c.optim.warmup_ratio = 0.1  # 10 updates: warmup of 1 (lr 0 at update 0), then cosine
    c.optim.eps = 1e-2  # the median |gradient| here
    c.optim.grad_accum = 2
    o = c.optim
    model = Exo2Ego(config_lib.build_model_config(c.model))
    st = config_lib.build_stage_config(c.stage)
    params = model.init(jax.random.key(0))
    trainable, frozen = stages.split_params(params, stages.trainable_patterns(st, model))
    micro = []
    stream = CountingStream(0, 2, "single", length=48)
    for i in range(6):
        b = next(stream)
        for r in range(2):  # row r of micro-batch i supervises its last 4 + 14·((i+r) % 4)
            b["labels"][r, : 48 - (4 + 14 * ((i + r) % 4))] = -100
        micro.append({"exo_caption": b})
    counts = [int((m["exo_caption"]["labels"][:, 1:] != -100).sum()) for m in micro]

    opt = make_optimizer(o, total_steps=10)
    step = jax.jit(stages.make_train_step(model, st, opt))
    t, s = trainable, opt.init(trainable)
    after = []
    for b in micro:
        t, s, _ = step(t, s, frozen, b)
        after.append(t)

    # The independent reference: Adam by hand on the mean of per-micro-batch gradients of
    # the stage loss, each taken at the reference's own parameters.
    flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")  # noqa: E731
    unflat = lambda d: traverse_util.unflatten_dict(  # noqa: E731
        {k: np.asarray(v, np.float32) for k, v in d.items()}, sep="/"
    )
    grad = jax.jit(jax.grad(lambda tr, b: stages.stage_loss(model, st, tr, frozen, b)[0]))

    def lr_at(k, peak=o.lr, warmup=1, total=10):
        if k < warmup:
            return peak * k / warmup
        return peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))

    start = flat(trainable)
    want, token_weighted = _AdamByHand(start, o.b1, o.b2, o.eps), None
    for u in range(3):
        g = [flat(grad(unflat(want.p), micro[2 * u + j])) for j in range(2)]
        if u == 2:  # the "one big batch" alternative for the last update, for contrast below
            n0, n1 = counts[4], counts[5]
            token_weighted = {
                k: (n0 * np.float64(g[0][k]) + n1 * np.float64(g[1][k])) / (n0 + n1) for k in g[0]
            }
            before_last = {k: v.copy() for k, v in want.p.items()}
            state = (
                {k: v.copy() for k, v in want.m.items()},
                {k: v.copy() for k, v in want.v.items()},
            )
        want.update({k: (np.float64(g[0][k]) + np.float64(g[1][k])) / 2 for k in g[0]}, lr_at(u))
        got = flat(after[2 * u + 1])
        for k in want.p:
            np.testing.assert_allclose(
                np.asarray(got[k]), want.p[k], rtol=1e-5, atol=1e-6, err_msg=f"update {u}: {k}"
            )
        mid = flat(after[2 * u])  # no update after the first micro-batch of an update
        for k, v in (flat(trainable) if u == 0 else flat(after[2 * u - 1])).items():
            np.testing.assert_array_equal(np.asarray(mid[k]), np.asarray(v), err_msg=k)
    # The parameters moved by many tolerances.
    moved = max(float(np.abs(want.p[k] - start[k]).max()) for k in start)
    assert moved > 1e-3, moved
    # The data pins the normalisation: a token-weighted mean over both micro-batches (one big
    # batch) in the last update lands far outside the tolerance.
    other = _AdamByHand(before_last, o.b1, o.b2, o.eps)
    other.m, other.v, other.t = state[0], state[1], 2
    other.update(token_weighted, lr_at(2))
    assert max(float(np.abs(other.p[k] - want.p[k]).max()) for k in start) > 1e-4


def test_hand_off_later_stages_override_earlier(tmp_path):
    """A stage-3 run built from stages 0, 1 and 2: every parameter equals what the last stage
    that trained it saved (E_ego's connector: stage 2's, not stage 0's; E_exo's: stage 1's;
    F and G: stage 2's), and every other parameter its initial value."""
    import flax.linen as nn
    import jax
    import numpy as np
    from flax import traverse_util

    from exo2ego_jax import sharding as sharding_lib
    from exo2ego_jax import stages
    from exo2ego_jax.models.exo2ego import Exo2Ego

    c = _config(3, tmp_path)
    model = Exo2Ego(config_lib.build_model_config(c.model))
    mesh = sharding_lib.make_mesh(c.mesh.shape)
    rules = sharding_lib.rules_for(c.mesh.rules)
    flat = lambda tree: traverse_util.flatten_dict(tree, sep="/")  # noqa: E731
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init, _ = runtime.init_params(model, mesh, rules, c.seed)
    init = {k: np.asarray(v) for k, v in flat(init).items()}
    saved = {}  # stage -> {path: the value that stage saved}
    for s in (0, 1, 2):
        st = config_lib.build_stage_config(STAGE_CONFIGS[s].get_config("demo").stage)
        paths = stages.trainable_paths(
            traverse_util.unflatten_dict(init, sep="/"), stages.trainable_patterns(st, model)
        )
        rng = np.random.default_rng(10 + s)  # each stage saves its own distinct values
        saved[s] = {
            p: init[p] + rng.standard_normal(init[p].shape).astype(np.float32) for p in paths
        }
        ckpt = checkpoints.StageCheckpointer(tmp_path / f"stage{s}", async_save=False)
        tree = traverse_util.unflatten_dict(saved[s], sep="/")
        meta = {"stage": s, **checkpoints.param_meta(tree)}
        ckpt.save(1, tree, {"count": np.zeros((), np.int32)}, meta, {}, force=True)
        ckpt.close()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        resolved = config_lib.resolve(c)
        params, _ = runtime.build_params(resolved, model, mesh, pretrained={}, log=lambda m: None)
    got = flat(params)
    assert set(got) == set(init)
    for k, v in got.items():
        last = max((s for s in saved if k in saved[s]), default=None)
        want = init[k] if last is None else saved[last][k]
        np.testing.assert_array_equal(np.asarray(v), want, err_msg=f"{k} (from stage {last})")
    # The test can tell the stages apart: each overridden part differs between them.
    lasts = {
        "ego_encoder/connector": 2,
        "exo_encoder/connector": 1,
        "F": 2,
        "G": 2,
    }
    for part, s in lasts.items():
        ks = [k for k in got if k.startswith(part + "/")]
        assert ks and all(max(t for t in saved if k in saved[t]) == s for k in ks), part
    k = next(k for k in got if k.startswith("ego_encoder/connector/"))
    assert not np.array_equal(saved[0][k], saved[2][k])


def test_without_the_flop_count_nothing_is_counted(tmp_path, monkeypatch):
    """``config.count_model_flops=False`` (the demo's preset): no extra lowering per batch
    shape, and no FLOP figures."""
    calls = []
    monkeypatch.setattr(loop, "model_flops_per_device", lambda *a: calls.append(a) or 1.0)
    c = _config(0, tmp_path, steps=2, log_every=10)
    assert c.count_model_flops is False  # the demo preset
    summary = train(c, tmp_path / "stage0", streams=streams_for(0), progress=False)
    assert calls == []
    assert summary["timing"]["flop_count_s"] < 0.01  # nothing but the lap itself
    assert not summary["timing"]["model_flops"]
