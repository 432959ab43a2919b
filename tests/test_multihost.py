"""Multi-host training on CPU: ``main.py`` as two JAX processes equals one process.

The real trainer runs as two local processes joined by ``jax.distributed`` (coordinator on
localhost, ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` read by ``main.py``), each with two
CPU devices, so one mesh ``data=4`` spans both and cross-process collectives go through
XLA:CPU's gloo implementation (jax's default ``jax_cpu_collectives_implementation``). Each
process reads its own half of every global batch (``data.make_streams`` +
``PipelineOptions.shard``) and ``sharding.shard_batch`` assembles the global arrays. A
single-process, single-device run with the same global batch is the reference: both see the
same examples per step (the hosts' strided slices of one shuffled stream), in another row
order, so losses agree to float rounding.

Children are pinned to one CPU each (see ``tests/test_sharding_presets.py``: a one-thread
XLA:CPU pool cannot deadlock on collectives on a 2-core host), use XLA:CPU's cheap compile
options and the tests' persistent compilation cache, and are killed on failure or timeout.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import stage0
from exo2ego_jax import config_lib
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.streams import make_streams
from input_pipeline.pipeline import PipelineOptions, record_dataset

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3  # step 1 updates with lr 0 (warmup): step 3's loss sees a real update
GLOBAL_BATCH = 4  # 2 rows per process, 1 per device
TIMEOUT_S = 600  # a guard against hangs only; a normal run takes a fraction of it
# Cheap XLA:CPU compilation (compile time dominates these 3-step runs); same for all runs.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _args(prepared: Path, workdir: Path) -> list[str]:
    """main.py's arguments: stage 0 of a smaller demo model (E_ego only: quicker to compile)."""
    return [
        str(ROOT / "main.py"),
        f"--config={ROOT}/configs/stage0.py",
        f"--workdir={workdir}",
        f"--config.data.prepared_dir={prepared}",
        f"--config.data.tokenizer={prepared / 'tokenizer'}",
        "--config.init.llm=",
        "--config.init.clip=",
        "--config.init.stages=()",
        "--config.model.image_size=32",
        "--config.model.with_exo=False",
        "--config.model.with_mapping=False",
        "--config.model.fusion=x_only",
        "--config.stage.stage0_encoders=('ego',)",
        f"--config.optim.num_steps={STEPS}",
        f"--config.optim.batch_size={GLOBAL_BATCH}",
        # Float noise on exactly-zero gradients must not become +-lr Adam updates (see
        # docs/sharding.md, "Numerical noise of the tiny model").
        "--config.optim.eps=1e-3",
        "--config.log_every=1",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=False",
    ]


def _launch(args: list[str], log: Path, *, devices: int, cpu: int | None, **env_extra: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **env_extra)
    # The parent's 8 fake devices do not apply: each child sets its own count.
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {FAST_XLA}"
    env["JAX_COMPILATION_CACHE_DIR"] = os.environ.get(
        "EXO2EGO_TEST_JAX_CACHE", "/tmp/exo2ego-jax-test-cache"
    )
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if k not in env_extra:
            env.pop(k, None)
    # Pin before anything starts a thread (XLA sizes its intra-op pool from the mask).
    pin = f"os.sched_setaffinity(0, {{{cpu}}}); " if cpu is not None else ""
    boot = (
        f"import os, runpy, sys; {pin}"
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-c", boot, *args], env=env, cwd=ROOT, stdout=f, stderr=f
        )


def _losses(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _restore_params(workdir: Path) -> dict[str, np.ndarray]:
    """The stage's saved (trainable) params, restored onto one device of this process: the
    hand-off path a next stage would take, here across a change of topology."""
    _, meta = checkpoints.read_meta(workdir)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = traverse_util.unflatten_dict(
        {
            p: jax.ShapeDtypeStruct(tuple(s), np.float32, sharding=one)
            for p, s in meta["param_shapes"].items()
        },
        sep="/",
    )
    params, paths = checkpoints.restore_stage_params(workdir, 0, target)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {p: np.asarray(flat[p]) for p in paths}


@pytest.fixture(scope="module")
def runs(prepared, tmp_path_factory):
    """A 2-process x 2-device run and the 1-process x 1-device reference, concurrently."""
    t0 = time.time()
    tmp = tmp_path_factory.mktemp("multihost")
    multi, single = tmp / "multi", tmp / "single"
    cpus = sorted(os.sched_getaffinity(0))
    port = _free_port()
    procs = [
        _launch(
            _args(prepared, multi),
            tmp / f"multi{i}.log",
            devices=2,
            cpu=cpus[i % len(cpus)],
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    procs.append(_launch(_args(prepared, single), tmp / "single.log", devices=1, cpu=None))
    logs = [tmp / "multi0.log", tmp / "multi1.log", tmp / "single.log"]
    try:
        deadline = time.time() + TIMEOUT_S
        for proc, log in zip(procs, logs, strict=True):
            try:
                proc.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{log.name}: no result after {TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                )
            if proc.returncode != 0:
                pytest.fail(f"{log.name} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
    finally:
        for proc in procs:  # on failure the peer would wait for its partner until JAX's timeout
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"2-process and reference runs: {time.time() - t0:.0f} s")
    return dict(multi=multi, single=single, logs=[log.read_text() for log in logs])


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    log0, log1, log_single = runs["logs"]
    for log in (log0, log1):  # both joined one job: 4 devices in one data-parallel mesh
        assert "4 devices (cpu); 2 processes; mesh {'data': 4, 'fsdp': 1, 'tensor': 1}" in log
    assert "1 devices (cpu); 1 processes" in log_single
    # Only process 0 drives a progress bar.
    bar_end = f"{STEPS}/{STEPS} ["
    assert bar_end in log0 and bar_end not in log1

    got, want = _losses(runs["multi"]), _losses(runs["single"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # one writer: no duplicates
    for g, w in zip(got, want, strict=True):
        for key in ("loss", "vtg", "grad_norm", "tokens_ego"):
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, err_msg=f"step {g['step']} {key}")
    # One TensorBoard writer.
    assert len(list((runs["multi"] / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_two_process_checkpoint_is_one_and_restores(runs):
    ckpt = runs["multi"] / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, STEPS]
    last = ckpt / str(STEPS)
    # Both processes' input positions are saved, once each.
    for stream in ("data_ego_caption",):
        names = sorted(p.name for p in (last / stream).glob("process_*.json"))
        assert names == ["process_0-of-2.json", "process_1-of-2.json"]
    step, meta = checkpoints.read_meta(runs["multi"])
    assert step == STEPS and meta["stage"] == 0 and meta["finished"]

    got, want = _restore_params(runs["multi"]), _restore_params(runs["single"])
    assert got.keys() == want.keys() and got
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, atol=2e-5, rtol=1e-4, err_msg=path)


def test_host_slices_partition_the_record_stream(prepared):
    """``PipelineOptions.shard``: host i reads records i, i+n, ... of the one shuffled,
    repeated stream, so the hosts' slices are disjoint and interleave back into it."""

    def ids(index: int, count: int) -> list[bytes]:
        opts = PipelineOptions(num_epochs=2, shard_index=index, shard_count=count)
        ds, _, _ = record_dataset("ego_caption", prepared, opts)
        return [ds[i]["id"] for i in range(len(ds))]

    whole = ids(0, 1)
    for count in (2, 3):
        parts = [ids(i, count) for i in range(count)]
        assert sum(map(len, parts)) == len(whole)
        for i, part in enumerate(parts):
            assert part == whole[i::count]


def test_streams_read_each_hosts_part_of_the_global_batch(prepared, monkeypatch):
    """With 2 processes, process 1's stream yields half of each global micro-batch, and a
    batch the processes cannot split evenly is refused before anything is read."""
    config = stage0.get_config("demo")
    config.data.prepared_dir = str(prepared)
    config.data.tokenizer = str(prepared / "tokenizer")
    config.optim.batch_size, config.optim.grad_accum = 8, 2
    stage = dataclasses.replace(
        config_lib.build_stage_config(config.stage), stage0_encoders=("ego",)
    )
    monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    streams = make_streams(config, stage)
    batch = next(streams["ego_caption"].iterator)
    assert batch["input_ids"].shape[0] == 8 // 2 // 2
    config.optim.batch_size = 6  # micro-batch 3 over 2 processes
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 2 processes"):
        make_streams(config, stage)


@pytest.fixture(scope="module")
def main_module():
    """``main.py`` as a module (its absl flags are defined once per session)."""
    spec = importlib.util.spec_from_file_location("exo2ego_main", ROOT / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_LAUNCH_VARS = (
    "EXO2EGO_DISTRIBUTED",
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
    "SLURM_STEP_NODELIST",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, None),  # keeps all local GPUs
        ({"SLURM_NTASKS": "4"}, None),  # a batch script outside srun: one process
        ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}, {}),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
            {"num_processes": 2, "process_id": 1},
        ),
        ({"EXO2EGO_DISTRIBUTED": "1"}, {}),  # a Cloud TPU VM slice: no variable to detect
        ({"EXO2EGO_DISTRIBUTED": "0", "JAX_COORDINATOR_ADDRESS": "h:1"}, None),
    ],
)
def test_main_initializes_distributed_for_multi_process_launches(
    main_module, monkeypatch, env, expected
):
    """Which launches call ``jax.distributed.initialize`` (and with what), without touching
    a backend first (after that, initialize refuses)."""
    for k in _LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax, "process_count", lambda *a: pytest.fail("backend touched"))
    main_module._maybe_initialize_distributed()
    assert calls == ([] if expected is None else [expected])
