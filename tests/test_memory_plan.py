"""The per-device memory planner (exo2ego_jax/tools/memory_plan.py) on the demo config."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest
from flax import traverse_util

from exo2ego_jax import config_lib, stages
from exo2ego_jax import sharding as sh
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.tools import memory_plan as mp

STAGE1 = "configs/stage1.py:demo"
ROOT = Path(__file__).resolve().parents[1]
#: Where `make libtpu` puts the TPU compiler (off the venv's import path).
LIBTPU_DIR = Path(os.environ.get("EXO2EGO_LIBTPU_DIR", ROOT / ".venv" / "libtpu"))


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    """Stage 1 of the demo on 8 devices with remat none and full (two small compiles)."""
    out = tmp_path_factory.mktemp("plan") / "table.md"
    rows = mp.main(
        [f"--config={STAGE1}", "--devices=8", "--remat=none,full", f"--out={out}"],
        log=lambda _: None,
    )
    return rows, out


def test_demo_plan_matches_independent_accounting(demo_rows):
    rows, out = demo_rows
    assert [(r.stage, r.devices, r.remat) for r in rows] == [(1, 8, "none"), (1, 8, "full")]
    none, full = rows
    assert none.mesh == (1, 8, 1) and none.rules == "fsdp"
    assert none.micro_batch_per_device == 1 and none.grad_accum == 1  # demo batch 8 / 8 ways
    assert none.batch_shards == 8

    # Parameter bytes per device, recomputed from the sharding module alone.
    config = mp.load_config(STAGE1)
    model = Exo2Ego(config_lib.build_model_config(config.model))
    mesh = sh.make_abstract_mesh((1, 8, 1))
    shapes = model.abstract_params()
    per_leaf = sh.shard_bytes(shapes, sh.param_shardings(model, mesh, "fsdp"))
    stage = config_lib.build_stage_config(config.stage)
    train_paths = stages.trainable_paths(shapes, stages.trainable_patterns(stage, model))
    assert set(per_leaf) == set(traverse_util.flatten_dict(shapes, sep="/"))
    trainable = sum(per_leaf[p] for p in train_paths)
    used = sum(
        b
        for p, b in per_leaf.items()
        if p.startswith(("exo_encoder/", "llm/")) and "/post_layernorm/" not in p
    )
    for r in rows:
        assert r.params_trainable == trainable > 0
        assert r.params == sum(per_leaf.values())
        # AdamW: two moments like the parameters (+ int32 step counts); no accumulation.
        assert 0 < r.opt_state - 2 * trainable <= 16
        # XLA's own argument bytes: jit prunes the arguments the step never reads (here E_ego,
        # F, G, CLIP's post-layernorm and the rng key), the rest is params + opt + batch.
        assert r.xla_arguments == used + r.opt_state + r.batch - 8
        assert r.total == r.params + r.opt_state + r.temp + r.batch + r.outputs_unaliased
        assert r.temp > 0 and r.compile_seconds > 0 and r.fits
        # Stage 1 captions one clip: text + one clip's visual tokens - the <video> sentinel.
        assert r.llm_tokens == config.data.max_text_len + model.config.tokens_per_clip - 1
        assert r.compiled_for == "XLA:CPU"
    assert full.temp <= none.temp  # rematerialisation only drops saved activations

    table = out.read_text()
    assert table.splitlines()[0].startswith("| stage | devices |")
    assert len(table.splitlines()) == 2 + len(rows)
    assert "fits 16 GiB?" in table


def test_batch_per_device_keeps_the_global_batch():
    base = mp.load_config("configs/stage3.py:paper")
    # Paper stage 3: global batch 64 on 16 fsdp devices -> 4 per device, or 1 x 4 accumulated.
    c = mp.prepare_config(base, 16, batch_per_device=1)
    assert (c.optim.batch_size, c.optim.grad_accum, tuple(c.mesh.shape)) == (64, 4, (1, 16, 1))
    c = mp.prepare_config(base, 16, batch_per_device=2, grad_accum=3)
    assert (c.optim.batch_size, c.optim.grad_accum) == (96, 3)
    c = mp.prepare_config(base, 16, rules="fsdp_tp", remat="dots")
    assert tuple(c.mesh.shape) == (1, 4, 4) and c.model.remat_policy == "dots"
    assert base.optim.grad_accum == 1 and base.mesh.rules == "fsdp"  # the base is untouched


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--devices=8", "--mesh=1,3,1"], "does not divide 8 devices"),
        (["--devices=8", "--mesh=2,2"], "3 positive sizes"),
        # The demo's global batch 8 in 2 micro-batches of 4 rows cannot split over 8 devices.
        (["--devices=8", "--grad_accum=2"], "(micro-batch 4) is not divisible by the 8"),
        (["--devices=16", "--batch_per_device=1", "--grad_accum=1"], "but JAX has 8"),
        (["--devices=8", "--rules=zero3"], "unknown sharding preset 'zero3'"),
        (["--devices=8", "--remat=some"], "remat policy 'some'"),
        (["--devices=8", "--batch_per_device=3"], "not a multiple of 3 x 8"),
        (["--devices=8", "--config.model.no_such_field=1"], "no field 'model.no_such_field'"),
        (["--devices=8", "--config.optim.learning_rate=1"], "did you mean --config.optim.lr"),
        (["--devices=8", "--config.model.dtype=float8"], "config.model.dtype='float8'"),
        (["--devices=8", "--stages=1,5"], "--stages=1,5: give stage numbers 0-3"),
        (["--devices=eight"], "--devices=eight: use integers"),
    ],
)
def test_clear_errors(argv, message):
    # Everything is checked before compiling, so these are fast.
    with pytest.raises(mp.PlanError, match=re.escape(message)):
        mp.main([f"--config={STAGE1}", *argv], log=lambda _: None)


def test_tpu_target_errors_name_the_fix(monkeypatch):
    """--tpu: libtpu missing, or a slice of another size, is one clear line before compiling."""

    def no_libtpu(**_):
        raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

    monkeypatch.setattr(mp.topologies, "get_topology_desc", no_libtpu)
    with pytest.raises(mp.PlanError, match=re.escape("pip install 'jax[tpu]'")):
        mp.main([f"--config={STAGE1}", "--tpu=v5e:2x2"], log=lambda _: None)
    monkeypatch.setattr(mp, "tpu_devices", lambda topology: jax.devices()[:4])
    with pytest.raises(mp.PlanError, match=re.escape("--devices=8 but --tpu=v5e:2x2 has 4")):
        mp.main([f"--config={STAGE1}", "--tpu=v5e:2x2", "--devices=8"], log=lambda _: None)


def test_script_requests_enough_fake_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --foo")
    mp._request_devices([f"--config={STAGE1}", "--devices=8,32,16"])
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_force_host_platform_device_count=32" in flags and "--foo" in flags
    assert "--xla_force_host_platform_device_count=8" not in flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
    mp._request_devices([f"--config={STAGE1}", "--devices=16"])
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=64"


def test_table_marks_rows_shared_by_a_tensor_group():
    gib = mp.GiB
    row = mp.PlanRow(
        config="c", stage=3, devices=16, mesh=(1, 4, 4), rules="fsdp_tp", remat="full",
        micro_batch_per_device=1, batch_shards=4, grad_accum=16, global_batch=64,
        llm_tokens=5089, params_trainable=gib, params_frozen=2 * gib, opt_state=2 * gib,
        batch=0, temp=11 * gib, outputs_unaliased=0, xla_arguments=0, compile_seconds=1.0,
        hbm_bytes=16 * gib,
    )  # fmt: skip
    assert row.total == 16 * gib and row.fits
    line = mp.markdown_table([row]).splitlines()[2]
    assert "| 1 (per 4 devices) | 16 | 5089 | 3.00 (1.00+2.00) |" in line
    assert "| **16.00** | yes |" in line


# In a fresh process: libtpu on the path, JAX on CPU; one --tpu plan of the demo's stage 3 and
# the attention alone compiled for a chip of the same slice, `auto` and `xla`.
_TPU_PROBE = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    from exo2ego_jax.models import attention
    from exo2ego_jax.tools import memory_plan as mp

    argv = ["--config=configs/stage3.py:demo", "--tpu=v5e:2x2", "--rules=fsdp"]
    (row,) = mp.main(argv, log=lambda _: None)
    chip = SingleDeviceSharding(mp.tpu_devices("v5e:2x2")[0])
    q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16, sharding=chip)
    kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16, sharding=chip)

    def hlo(impl):
        mask = attention.MaskSpec(causal=True)
        with attention.target_backend("tpu"):
            step = jax.jit(lambda q, k, v: attention.attend(q, k, v, mask, impl=impl))
            return step.lower(q, kv, kv).compile().as_text()

    print("RESULT " + json.dumps({
        "compiled_for": row.compiled_for, "devices": row.devices, "mesh": row.mesh,
        "total": row.total, "temp": row.temp, "params": row.params,
        "auto_kernel": "tpu_custom_call" in hlo("auto"),
        "xla_kernel": "tpu_custom_call" in hlo("xla"),
    }))
""")


def _libtpu_path() -> str | None:
    """The folder to put on the path for libtpu ("" if importable already), or None."""
    if importlib.util.find_spec("libtpu") is not None:
        return ""
    return str(LIBTPU_DIR) if (LIBTPU_DIR / "libtpu").is_dir() else None


@pytest.mark.slow
def test_tpu_plan_compiles_the_step_for_a_tpu_slice_with_splash():
    """--tpu: the demo's stage-3 step compiled by libtpu for a v5e 2x2 slice on this CPU host,
    and `auto` attention compiled for a chip of it is the Pallas kernel (a Mosaic custom
    call), `xla` is not. Needs `make libtpu`; skipped without it unless
    EXO2EGO_REQUIRE_LIBTPU=1 (CI)."""
    path = _libtpu_path()
    if path is None:
        reason = f"libtpu is not installed (make libtpu puts it in {LIBTPU_DIR})"
        if os.environ.get("EXO2EGO_REQUIRE_LIBTPU") == "1":
            pytest.fail(f"{reason} (EXO2EGO_REQUIRE_LIBTPU=1)")
        pytest.skip(reason)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(ROOT), env.get("PYTHONPATH")) if p)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _TPU_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    got = json.loads(line.removeprefix("RESULT "))
    assert got["compiled_for"] == "TPU v5 lite (v5e:2x2, libtpu AOT)"
    assert got["devices"] == 4 and got["mesh"] == [1, 4, 1]
    assert got["total"] > got["params"] > 0 and got["temp"] > 0
    assert got["auto_kernel"] and not got["xla_kernel"]
