r"""exo2ego-jax entry point.

Train one stage::

    python main.py --config=configs/stage2.py[:demo|:paper] [--config.optim.lr=1e-4 ...] \
        [--workdir=DIR]

Evaluate a trained stage-3 model on EgoBench, or ask it about any ego video::

    python main.py --config=configs/eval.py[:demo|:paper]
    python main.py --config=configs/eval.py:chat --video=clip.mp4 --question="What is C doing?"

Run the whole built-in demo (synthetic world -> datasets -> demo LM -> stages 0-3 ->
synthetic EgoBench)::

    python main.py --demo [--quick] [--workdir=workdirs/demo] [--world_takes=N] [--seed=N] \
        [--pretrain_clip]
"""

from __future__ import annotations

import logging
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax import cli
from exo2ego_jax.chat import answer
from exo2ego_jax.demo import runner as demo
from exo2ego_jax.eval.evaluate import evaluate
from exo2ego_jax.training.loop import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/stage3.py:demo.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).")
_DEMO = flags.DEFINE_bool("demo", False, "Run the full demo pipeline on the synthetic world.")
_DATA = flags.DEFINE_string(
    "data_dir", None, "Demo: where the world and datasets live (default demo_data)."
)
_QUICK = flags.DEFINE_bool(
    "quick", False, "Demo: the whole pipeline on a tiny world in a few minutes (first contact)."
)
_WORLD_TAKES = flags.DEFINE_integer(
    "world_takes",
    None,
    "Demo: takes in the world when it is generated (default exo2ego_jax.demo.runner.WORLD_TAKES, "
    "320; fewer = faster and weaker).",
)
_SEED = flags.DEFINE_integer(
    "seed",
    0,
    "Demo: the stages' seed (initialisation, data order); the world and the stand-in CLIP / LM "
    "stay seed 0, so every seed is scored on the same EgoBench items.",
)
_PRETRAIN_CLIP = flags.DEFINE_bool(
    "pretrain_clip",
    False,
    "Demo: pretrain the stand-in CLIP here (render its 1,200-take corpus, 8,000 steps: ~30 min "
    "on 2 cores) instead of copying the one shipped with the package, which the same command "
    "made (exo2ego_jax.demo.shipped_clip).",
)
_VIDEO = flags.DEFINE_string("video", None, "Chat: the ego video to ask about.")
_QUESTION = flags.DEFINE_string("question", None, "Chat: the question.")


def _maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when launched as one process of a multi-process job.

    Triggered by a launcher's environment (SLURM, Open MPI, GKE TPU, ``JAX_COORDINATOR_ADDRESS``)
    or forced with ``EXO2EGO_DISTRIBUTED=1`` (a Cloud TPU VM slice sets no variable: JAX reads
    the slice from the metadata server); ``EXO2EGO_DISTRIBUTED=0`` never initializes. Without
    a cluster launcher, ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (with
    ``JAX_COORDINATOR_ADDRESS``) name this process. See docs/tpu_vm.md.
    """
    env = os.environ
    force = env.get("EXO2EGO_DISTRIBUTED", "")
    # A one-task SLURM / MPI job stays single-process: JAX's SLURM detection would make each
    # process own one GPU (SLURM_LOCALID), hiding a multi-GPU node's other GPUs.
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or "TPU_WORKER_HOSTNAMES" in env
        or ("SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1)
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    # Not `jax.process_count()`: it would start the backends, after which initialize() refuses.
    if force == "0" or jax.distributed.is_initialized():
        return
    if force != "1" and not multi:
        return
    kwargs = {}
    if "JAX_NUM_PROCESSES" in env:  # jax itself reads only JAX_COORDINATOR_ADDRESS
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        if force == "1":
            raise
        logging.warning("jax.distributed.initialize() skipped (single process): %s", e)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and Grain log every checkpoint step at INFO through absl; keep ours, quiet theirs.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    _maybe_initialize_distributed()
    logging.info(
        "jax %s, backend %s, %d devices: %s",
        jax.__version__,
        jax.default_backend(),
        jax.device_count(),
        jax.devices()[:4],
    )
    if _DEMO.value:
        takes = {"world_takes": _WORLD_TAKES.value} if _WORLD_TAKES.value else {}
        suffix = "-quick" if _QUICK.value else ""  # never mixed with a full demo's files
        try:
            demo.run(
                # A seed's stages never resume another seed's checkpoints; the data is shared.
                workdir=_WORKDIR.value
                or f"workdirs/demo{suffix}" + (f"-seed{_SEED.value}" if _SEED.value else ""),
                data_dir=_DATA.value or f"demo_data{suffix}",
                quick=_QUICK.value,
                seed=_SEED.value,
                pretrain_clip=_PRETRAIN_CLIP.value,
                **takes,
            )
        except demo.DemoInterrupted as e:
            raise SystemExit(str(e)) from None
        return
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("pass --config=configs/stageN.py[:preset] (or --demo)")
    run = config.get("run", "train")
    if run == "chat":
        answer(config, _VIDEO.value, _QUESTION.value)
        return
    if run == "evaluate":
        evaluate(config)
        return
    summary = train(config, _WORKDIR.value or config.workdir)
    print(
        f"stage {config.stage.stage}: {summary['steps']} steps, loss "
        f"{summary['first_loss']} -> {summary['last_loss']}"
    )


if __name__ == "__main__":
    cli.run(main)
