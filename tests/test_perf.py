"""What the trainer logs for a performance engineer: model FLOPs per step (every layer
counted, recomputation not), TFLOP/s and MFU, and the profiler's trace window."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from configs import common
from exo2ego_jax import config_lib
from exo2ego_jax.models import exo2ego
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.tools.memory_plan import abstract_batch
from exo2ego_jax.training import perf
from exo2ego_jax.training.optim import make_optimizer
from exo2ego_jax.training.step import model_flops_per_device


def _flops(num_layers: int, remat: str = "none") -> float:
    c = common.base_config(3, "demo")
    c.init.stages = ()
    r = config_lib.resolve(c, check_inputs=False)
    cfg = dataclasses.replace(
        r.model, llm=dataclasses.replace(r.model.llm, num_layers=num_layers, remat_policy=remat)
    )
    batch = abstract_batch(c, cfg, r.stage, 8)
    return model_flops_per_device(Exo2Ego(cfg), r.stage, make_optimizer(c.optim, 10), batch)


def test_model_flops_count_every_layer_once():
    """Linear in the number of LLM layers (a scanned loop counted once would be flat), and
    the same with full rematerialisation (recomputed activations are not model work)."""
    f1, f2, f3 = _flops(1), _flops(2), _flops(3)
    assert f2 - f1 > 0.05 * f1
    assert f3 - f2 == pytest.approx(f2 - f1, rel=1e-3)
    assert _flops(2, remat="full") == pytest.approx(f2, rel=1e-6)
    counted = exo2ego.for_flop_count(exo2ego.tiny())
    assert counted.llm.scan_layers is False
    # A fused kernel's custom call counts as zero FLOPs: the count always lowers `xla`.
    fused = exo2ego.tiny()
    fused = dataclasses.replace(
        fused,
        clip=dataclasses.replace(fused.clip, attention_impl="cudnn"),
        llm=dataclasses.replace(fused.llm, attention_impl="splash"),
    )
    counted = exo2ego.for_flop_count(fused)
    assert (counted.clip.attention_impl, counted.llm.attention_impl) == ("xla", "xla")


def test_tflops_and_mfu():
    assert perf.perf_scalars(None, 1.0, 100.0) == {}
    out = perf.perf_scalars(2e12, 4.0, 100.0)  # 2 TFLOP in 4 s: 0.5 TFLOP/s of 100
    assert out == pytest.approx({"model_tflops_per_device": 0.5, "mfu": 0.005})
    assert perf.perf_scalars(2e12, 4.0, None) == {"model_tflops_per_device": 0.5}
    assert perf.nominal_peak_tflops(jax.devices()[0]) is None  # CPU: no MFU


def test_profiler_traces_its_window(tmp_path):
    profiler = perf.Profiler(tmp_path, (2, 4))
    for step in range(1, 6):
        profiler.step(step)
        assert profiler.active == (2 <= step < 4)
        jax.numpy.ones(3).block_until_ready()
    profiler.stop()
    assert any((tmp_path / "profile").rglob("*.xplane.pb"))
    off = perf.Profiler(tmp_path / "off", (0, 0))
    off.step(1)
    assert not off.active and not (tmp_path / "off").exists()
