r"""Per-device memory plan of a training step, from abstract shapes (nothing is allocated).

Lowers the train step of a stage exactly as the trainer does (``training.step.jit_train_step``:
same model, sharding rules, trainable / frozen split, optimizer and batch shardings), but every
input is a ``jax.ShapeDtypeStruct`` carrying its ``NamedSharding``. The step is compiled ahead of
time (``jax.jit(...).lower(...).compile()``) for a mesh of the first N (fake CPU) devices
and XLA's ``memory_analysis()`` gives the per-device temporaries. Prints a Markdown table of
per-device bytes: parameters (trainable + frozen), optimizer state, temporaries, the rest
(batch, unaliased outputs) and the total, plus the micro-batch per device and compile time::

    python -m exo2ego_jax.tools.memory_plan --config=configs/stage3.py:paper --devices=16 \
        [--rules=fsdp|fsdp_tp|dp] [--remat=none|full|save_qkvo_mlp|...] \
        [--mesh=auto|config|D,F,T] [--batch_per_device=M] [--grad_accum=K] \
        [--config.data.max_text_len=512 ...] [--hbm_gib=16] [--out=FILE]

The config is loaded, and its fields overridden, by ml_collections (``config_flags``), as
``main.py`` does. ``--stages``, ``--devices``, ``--rules`` and ``--remat`` take
comma-separated lists and the tool plans every combination, e.g. the docs/scaling.md table::

    python -m exo2ego_jax.tools.memory_plan --config=configs/stage3.py:paper --stages=1,2,3 \
        --devices=8,16,32 --remat=none,full

(``--stages`` plans those stages of ``--config``'s preset, with the same overrides.)

Batch: ``config.optim.batch_size`` is the global batch of one optimizer update and
``grad_accum`` splits it into micro-batches, so one step sees ``batch_size / grad_accum /
data-parallel ways`` examples per device. ``--grad_accum=K`` sets K (global batch kept);
``--batch_per_device=M`` picks K so that the paper's global batch is kept; both together set
the global batch to ``M · ways · K``.

Mesh (``--mesh=auto``): ``(1, N, 1)`` for ``fsdp``, ``(1, N/4, 4)`` for ``fsdp_tp``,
``(N, 1, 1)`` for ``dp``. ``--mesh=config`` uses ``config.mesh.shape``.

Run as a script the tool sets ``XLA_FLAGS=--xla_force_host_platform_device_count=<max N>``
(and ``JAX_PLATFORMS=cpu``) before JAX starts, unless the environment already asks for
enough devices. In-process (:func:`main`, :func:`plan`) it uses whatever devices exist.

``--tpu=v5e:4x4`` (any libtpu topology name) compiles the same step for that TPU slice with
the TPU compiler, ahead of time on this host (``pip install 'jax[tpu]'``; no TPU needed;
minutes per paper-size case): the buffer assignment the chips would run, with the splash
attention kernel that ``auto`` picks there.

Caveat: without ``--tpu``, XLA:CPU's buffer assignment is a proxy for TPU / GPU (other fusion
decisions and layouts; it has no bfloat16 dot, so it holds float32 copies of bfloat16 weights
and activations): read those numbers as an upper estimate.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from jax.experimental import topologies
from ml_collections import config_flags

from configs import common
from exo2ego_jax import cli, config_lib, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.models import attention
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.remat import REMAT_POLICIES
from exo2ego_jax.training.optim import make_optimizer
from exo2ego_jax.training.step import TrainState, batch_shardings, cast_frozen, jit_train_step
from input_pipeline import atomic

GiB = 2**30
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


class PlanError(ValueError):
    """A flag, config field or mesh does not work; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """Per-device bytes of one compiled train step (all sizes in bytes)."""

    config: str
    stage: int
    devices: int
    mesh: tuple[int, int, int]
    rules: str
    remat: str
    micro_batch_per_device: int  # rows per batch shard (fsdp_tp: shared by a tensor group)
    batch_shards: int  # data-parallel ways: devices / batch_shards devices share each row
    grad_accum: int
    global_batch: int
    llm_tokens: int  # LLM sequence length: text + visual tokens - 1 (the <video> sentinel)
    params_trainable: int
    params_frozen: int
    opt_state: int
    batch: int  # this device's shard of the input batch (+ rng key)
    temp: int  # XLA temporaries (activations, gradients, all-gathered weights, ...)
    outputs_unaliased: int  # outputs not written into donated inputs (metrics)
    # memory_analysis().argument_size_in_bytes, a cross-check: jit prunes the arguments the
    # step never reads (e.g. E_exo and G in stage 3), which the trainer still keeps on device.
    xla_arguments: int
    compile_seconds: float
    hbm_bytes: int
    compiled_for: str = "XLA:CPU"  # the compiler whose buffer assignment this is

    @property
    def params(self) -> int:
        return self.params_trainable + self.params_frozen

    @property
    def other(self) -> int:
        return self.batch + self.outputs_unaliased

    @property
    def total(self) -> int:
        return self.params + self.opt_state + self.temp + self.other

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm_bytes


# ----------------------------------------------------------------------------- config


def stage_configs(config, stages: Sequence[str], overrides: Mapping[str, Any]) -> list:
    """``config`` itself (no ``stages``), or the same preset's config of each listed stage
    with the command line's ``--config.*`` ``overrides`` applied again."""
    if not stages:
        return [config]
    out = []
    for k in stages:
        if k not in ("0", "1", "2", "3"):
            raise PlanError(f"--stages={','.join(stages)}: give stage numbers 0-3")
        try:
            c = common.base_config(int(k), config.get("preset", "paper"))
            c.update_from_flattened_dict(dict(overrides))
        except (ValueError, KeyError, TypeError) as e:
            raise PlanError(f"--stages={k}: {e}") from None
        out.append(c)
    return out


def auto_mesh(rules: str, devices: int) -> tuple[int, int, int]:
    """The mesh ``--mesh=auto`` picks (see the module docstring)."""
    if rules == "dp":
        return (devices, 1, 1)
    if rules == "fsdp_tp":
        tensor = 4 if devices % 4 == 0 else 2 if devices % 2 == 0 else 1
        return (1, devices // tensor, tensor)
    return (1, devices, 1)


def _parse_mesh(mesh: str, rules: str, devices: int, config) -> tuple[int, int, int]:
    if mesh == "auto":
        return auto_mesh(rules, devices)
    if mesh == "config":
        shape = list(config.mesh.shape)
    else:
        try:
            shape = [int(s) for s in mesh.split(",")]
        except ValueError:
            raise PlanError(f"--mesh={mesh!r}: use auto, config or three sizes D,F,T") from None
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise PlanError(f"mesh {tuple(shape)}: give 3 positive sizes, at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if devices % known or (-1 not in shape and known != devices):
        raise PlanError(
            f"mesh {tuple(shape)} does not divide {devices} devices (data·fsdp·tensor must "
            f"equal the device count; put -1 on one axis)"
        )
    return tuple(devices // known if s == -1 else s for s in shape)


def prepare_config(
    config,
    devices: int,
    *,
    rules: str | None = None,
    remat: str | None = None,
    mesh: str = "auto",
    batch_per_device: int | None = None,
    grad_accum: int | None = None,
):
    """A copy of ``config`` with the plan's choices applied, validated like the trainer."""
    config = copy.deepcopy(config)
    if rules is not None:
        config.mesh.rules = rules
    try:
        sharding_lib.rules_for(config.mesh.rules)
    except ValueError as e:
        raise PlanError(f"rules: {e}") from None
    if remat is not None:
        config.model.remat_policy = remat
    if config.model.remat_policy not in REMAT_POLICIES:
        raise PlanError(
            f"remat policy {config.model.remat_policy!r}: choose one of {REMAT_POLICIES}"
        )
    shape = _parse_mesh(mesh, config.mesh.rules, devices, config)
    config.mesh.shape = shape
    o = config.optim
    ways = sharding_lib.batch_ways(
        dict(zip(sharding_lib.MESH_AXES, shape, strict=True)), config.mesh.rules
    )
    for name, v in (("batch_per_device", batch_per_device), ("grad_accum", grad_accum)):
        if v is not None and v < 1:
            raise PlanError(f"--{name}={v}: must be >= 1")
    if batch_per_device is not None and grad_accum is not None:
        o.grad_accum = grad_accum
        o.batch_size = batch_per_device * ways * grad_accum
    elif batch_per_device is not None:
        per_update = batch_per_device * ways
        if o.batch_size % per_update:
            raise PlanError(
                f"--batch_per_device={batch_per_device}: the global batch {o.batch_size} is not "
                f"a multiple of {batch_per_device} x {ways} data-parallel devices; pass "
                "--grad_accum too to change the global batch"
            )
        o.grad_accum = o.batch_size // per_update
    elif grad_accum is not None:
        o.grad_accum = grad_accum
    try:
        config_lib.resolve(config, num_devices=devices, check_inputs=False)
    except ValueError as e:  # ConfigError, and ValueErrors of the model dataclasses
        raise PlanError(str(e)) from None
    return config


# ----------------------------------------------------------------------------- planning


def abstract_batch(config, model_cfg, stage, global_batch: int) -> dict[str, dict[str, Any]]:
    """``ShapeDtypeStruct`` s of one micro-batch, as ``input_pipeline.pipeline`` yields it.

    ``frames uint8[B, T, S, S, 3]`` (``ego_frames`` / ``exo_frames`` for ``pair``; the
    trainer's streams send uint8 and normalise on the device) and right-padded
    ``input_ids`` / ``labels`` / ``attention_mask`` ``int32[B, L]`` with
    ``L = config.data.max_text_len``: the longest a batch can be (the trainer pads each batch
    to its longest row rounded up to a bucket, so this is the worst case).
    """
    size = model_cfg.clip.image_size
    frames = jax.ShapeDtypeStruct((global_batch, model_cfg.num_frames, size, size, 3), jnp.uint8)
    text = jax.ShapeDtypeStruct((global_batch, config.data.max_text_len), jnp.int32)
    out = {}
    for name in stage.batches:
        b = dict(input_ids=text, labels=text, attention_mask=text)
        if name == "pair":
            b.update(ego_frames=frames, exo_frames=frames)
        else:
            b["frames"] = frames
        out[name] = b
    return out


def _with_shardings(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


def _bytes(shapes: Any, shardings: Any) -> int:
    return sum(sharding_lib.shard_bytes(shapes, shardings).values())


def tpu_devices(topology: str) -> list[jax.Device]:
    """The chips of a TPU slice ``topology`` (e.g. ``v5e:4x4``, ``v5p:2x2x2``) for
    ahead-of-time compilation by libtpu's compiler on any host (no TPU needed)."""
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise PlanError(
                f"--tpu={topology} compiles with libtpu, which is not installed: "
                "pip install 'jax[tpu]' (no TPU needed to plan)"
            ) from None
        raise PlanError(f"--tpu={topology}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - libtpu's own errors (e.g. an unknown layout)
        raise PlanError(f"--tpu={topology}: {str(e).splitlines()[0]}") from None


def plan(
    config,
    devices: int,
    *,
    name: str = "",
    hbm_gib: float = 16.0,
    fast_compile: bool = False,
    tpu: str | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> PlanRow:
    """Compiles the train step of a prepared ``config`` (:func:`prepare_config`) for the
    first ``devices`` devices and returns its per-device memory.

    Nothing is allocated: parameters, optimizer state and batch are ``ShapeDtypeStruct`` s.
    ``tpu``: a TPU slice topology (``v5e:4x4``) of exactly ``devices`` chips, compiled by
    libtpu ahead of time (attention ``auto`` then picks the TPU kernel) instead of XLA:CPU.
    """
    available = tpu_devices(tpu) if tpu else jax.devices()
    if tpu and devices != len(available):
        raise PlanError(
            f"--devices={devices} but --tpu={tpu} has {len(available)} chips; plan the whole "
            "slice (--devices is optional with --tpu)"
        )
    if devices > len(available):
        raise PlanError(
            f"{devices} devices requested but JAX has {len(available)}; run as a script (it "
            f"sets {_DEVICE_FLAG}) or set XLA_FLAGS={_DEVICE_FLAG}={devices} before JAX starts"
        )
    target = attention.target_backend("tpu") if tpu else contextlib.nullcontext()
    with target:
        return _plan(config, devices, available, name, hbm_gib, fast_compile, tpu, log)


def _plan(config, devices, available, name, hbm_gib, fast_compile, tpu, log) -> PlanRow:
    resolved = config_lib.resolve(config, num_devices=devices, check_inputs=False)
    model_cfg, stage, rules = resolved.model, resolved.stage, resolved.rules
    model = Exo2Ego(model_cfg)
    try:
        mesh = sharding_lib.make_mesh(config.mesh.shape, devices=available[:devices])
    except ValueError as e:
        raise PlanError(str(e)) from None
    o = config.optim
    accum = o.grad_accum or 1
    ways = sharding_lib.batch_ways(mesh, rules)
    micro_global = o.batch_size // accum

    # Parameters: the trainer's layout (shard_init uses param_shardings == these shardings).
    specs, shapes = sharding_lib.abstract_boxed(model)
    shardings = sharding_lib.logical_to_shardings(specs, mesh, rules, shapes=shapes)
    patterns = stages.trainable_patterns(stage, model)
    t_shapes, f_shapes = stages.split_params(shapes, patterns)
    t_shard, f_shard = stages.split_params(shardings, patterns)
    frozen = cast_frozen(_with_shardings(f_shapes, f_shard), model_cfg.llm.dtype)  # as trains

    # Optimizer: the step count only shapes the schedule, not the state.
    optimizer = make_optimizer(o, 1000)
    trainable = _with_shardings(t_shapes, t_shard)
    o_shard = sharding_lib.optimizer_state_shardings(optimizer, t_shard, trainable)
    o_shapes = jax.eval_shape(optimizer.init, trainable)
    state = TrainState(trainable, _with_shardings(o_shapes, o_shard))

    batch_shapes = abstract_batch(config, model_cfg, stage, micro_global)
    b_shard = batch_shardings(batch_shapes, mesh, rules)
    batch = _with_shardings(batch_shapes, b_shard)
    rng = jax.eval_shape(lambda: jax.random.key(0))

    # The very function the trainer compiles (training.step.jit_train_step).
    jitted = jit_train_step(
        model,
        stage,
        optimizer,
        state_shardings=TrainState(t_shard, o_shard),
        frozen_shardings=f_shard,
        batch_shardings=b_shard,
    )
    label = name or f"stage {stage.stage}"
    log(
        f"{label}: {devices} devices, mesh {dict(mesh.shape)}, rules {config.mesh.rules}, "
        f"remat {config.model.remat_policy}, micro-batch {micro_global // ways}/device; compiling"
    )
    t0 = time.time()
    # Activation constraints are baked in at trace time: lower inside the rules context.
    with sharding_lib.sharding_context(mesh, rules):
        lowered = jitted.lower(state, frozen, batch, rng)
    options = sharding_lib.FAST_COMPILE_OPTIONS if fast_compile else None
    compiled = lowered.compile(options)
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    if mem is None:
        raise PlanError(f"backend {jax.default_backend()} has no memory_analysis()")

    batch_bytes = _bytes(batch_shapes, b_shard) + rng.dtype.itemsize
    outputs = max(0, int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes))
    row = PlanRow(
        config=name,
        stage=stage.stage,
        devices=devices,
        mesh=tuple(int(v) for v in mesh.shape.values()),
        rules=config.mesh.rules,
        remat=config.model.remat_policy,
        micro_batch_per_device=micro_global // ways,
        batch_shards=ways,
        grad_accum=accum,
        global_batch=o.batch_size,
        llm_tokens=config.data.max_text_len + stages.visual_tokens(stage, model) - 1,
        params_trainable=_bytes(t_shapes, t_shard),
        params_frozen=_bytes(frozen, f_shard),
        opt_state=_bytes(o_shapes, o_shard),
        batch=batch_bytes,
        temp=int(mem.temp_size_in_bytes),
        outputs_unaliased=outputs,
        xla_arguments=int(mem.argument_size_in_bytes),
        compile_seconds=seconds,
        hbm_bytes=int(hbm_gib * GiB),
        compiled_for=f"{available[0].device_kind} ({tpu}, libtpu AOT)" if tpu else "XLA:CPU",
    )
    log(
        f"{label}: compiled in {seconds:.0f}s; total {row.total / GiB:.2f} GiB/device "
        f"(temp {row.temp / GiB:.2f} GiB)"
    )
    return row


# ----------------------------------------------------------------------------- report


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _micro(r: PlanRow) -> str:
    # Under fsdp_tp the batch is split over data·fsdp only: a tensor group shares its rows.
    share = r.devices // r.batch_shards
    return str(r.micro_batch_per_device) + (f" (per {share} devices)" if share > 1 else "")


def markdown_table(rows: Sequence[PlanRow]) -> str:
    """The rows as a Markdown table (GiB per device)."""
    hbm = {r.hbm_bytes for r in rows}
    fits = f"fits {_gib(hbm.pop()).rstrip('0').rstrip('.')} GiB?" if len(hbm) == 1 else "fits?"
    head = (
        "stage",
        "devices",
        "mesh (d,f,t)",
        "rules",
        "remat",
        "micro-batch/device",
        "grad_accum",
        "LLM tokens",
        "params (train+frozen)",
        "opt state",
        "temp",
        "batch+out",
        "total GiB",
        fits,
        "compile s",
        "compiled for",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = (
            str(r.stage),
            str(r.devices),
            ",".join(map(str, r.mesh)),
            r.rules,
            r.remat,
            _micro(r),
            str(r.grad_accum),
            str(r.llm_tokens),
            f"{_gib(r.params)} ({_gib(r.params_trainable)}+{_gib(r.params_frozen)})",
            _gib(r.opt_state),
            _gib(r.temp),
            _gib(r.other),
            f"**{_gib(r.total)}**",
            "yes" if r.fits else "no",
            f"{r.compile_seconds:.0f}",
            r.compiled_for,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- CLI


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    """The tool's flags, on a fresh ``FlagValues`` (so :func:`main` can run in-process);
    ``argv`` names the ``--config.*`` overrides to define."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Stage config file, e.g. configs/stage3.py:paper; override fields with --config.a.b=v.",
        flag_values=fv,
        lock_config=False,
        sys_argv=list(argv),
    )
    flags.DEFINE_list("stages", [], "Plan these stages of --config's preset.", flag_values=fv)
    flags.DEFINE_list("devices", None, "Device counts, e.g. 8,16,32.", flag_values=fv)
    flags.DEFINE_list(
        "rules", [], "fsdp | fsdp_tp | dp (default: config.mesh.rules).", flag_values=fv
    )
    flags.DEFINE_list(
        "remat", [], f"{' | '.join(REMAT_POLICIES)} (default: the config's).", flag_values=fv
    )
    flags.DEFINE_string("mesh", "auto", "auto | config | D,F,T (one may be -1).", flag_values=fv)
    flags.DEFINE_integer("batch_per_device", None, "Micro-batch per device.", flag_values=fv)
    flags.DEFINE_integer("grad_accum", None, "Micro-batches per optimizer update.", flag_values=fv)
    flags.DEFINE_float("hbm_gib", 16.0, "Device memory for 'fits?'.", flag_values=fv)
    flags.DEFINE_bool(
        "fast_compile", False, "Compile with sharding.FAST_COMPILE_OPTIONS.", flag_values=fv
    )
    flags.DEFINE_string(
        "tpu",
        None,
        "Compile for this TPU slice with libtpu, ahead of time on any host, e.g. v5e:4x4 "
        "(pip install 'jax[tpu]'); --devices defaults to its chip count.",
        flag_values=fv,
    )
    flags.DEFINE_string("out", None, "Also write the Markdown table to this file.", flag_values=fv)
    return fv


def parse_flags(argv: Sequence[str], *, known_only: bool = False) -> flags.FlagValues:
    """Parses ``argv`` (without the program name); a bad flag is a :class:`PlanError`."""
    argv = ["memory_plan", *argv]
    fv = _flag_values(argv)
    try:
        cli.check_config_overrides(argv)
        fv(argv, known_only=known_only)
    except (flags.Error, OSError, config_lib.ConfigError) as e:
        raise PlanError(str(e).splitlines()[0]) from None
    if fv.config is None and not known_only:
        raise PlanError("--config is required, e.g. --config=configs/stage3.py:paper")
    return fv


def load_config(spec: str):
    """``path/to/stageN.py[:arg]`` loaded by ml_collections' own loader (``config_flags``)."""
    return parse_flags([f"--config={spec}"]).config


def _device_counts(values: Sequence[str] | None) -> list[int]:
    try:
        counts = [int(v) for v in values or ()]
    except ValueError:
        raise PlanError(f"--devices={','.join(values)}: use integers, e.g. 8,16,32") from None
    if not counts or any(n < 1 for n in counts):
        raise PlanError("--devices: give positive device counts, e.g. --devices=8,16")
    return counts


def main(argv: Sequence[str] | None = None, *, log: Callable[[str], None] = print) -> list[PlanRow]:
    """Runs the planner for every (stage, devices, rules, remat) combination of ``argv``;
    prints (and with ``--out`` writes) the Markdown table and returns the rows."""
    fv = parse_flags(sys.argv[1:] if argv is None else argv)
    if fv.tpu and not fv.devices:
        counts = [len(tpu_devices(fv.tpu))]
    else:
        counts = _device_counts(fv.devices)
    overrides = config_flags.get_override_values(fv["config"])
    name = fv["config"].config_filename
    rows = []
    for base in stage_configs(fv.config, fv.stages, overrides):
        for devices in counts:
            for rules in fv.rules or [None]:
                for remat in fv.remat or [None]:
                    config = prepare_config(
                        base,
                        devices,
                        rules=rules,
                        remat=remat,
                        mesh=fv.mesh,
                        batch_per_device=fv.batch_per_device,
                        grad_accum=fv.grad_accum,
                    )
                    label = name if not fv.stages else f"stage{base.stage.stage}:{base.preset}"
                    rows.append(
                        plan(
                            config,
                            devices,
                            name=label,
                            hbm_gib=fv.hbm_gib,
                            fast_compile=fv.fast_compile,
                            tpu=fv.tpu,
                            log=log,
                        )
                    )
    table = markdown_table(rows)
    log(table)
    if fv.out:
        atomic.write_text(fv.out, table)
    return rows


def _request_devices(argv: Sequence[str]) -> None:
    """Sets the fake-CPU device count for the largest ``--devices`` (before JAX starts)."""
    try:
        fv = parse_flags(argv, known_only=True)
        if fv.tpu:  # libtpu's topology devices: no fake CPU devices needed
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
            return
        wanted = max(_device_counts(fv.devices))
    except PlanError:
        return  # main() reports the bad flag
    flag_text = os.environ.get("XLA_FLAGS", "")
    have = re.search(rf"{_DEVICE_FLAG}=(\d+)", flag_text)
    if have and int(have.group(1)) >= wanted:
        return
    flag_text = re.sub(rf"{_DEVICE_FLAG}=\d+", "", flag_text).strip()
    os.environ["XLA_FLAGS"] = f"{flag_text} {_DEVICE_FLAG}={wanted}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
    _request_devices(sys.argv[1:])
    try:
        main()
    except PlanError as e:
        sys.exit(f"memory_plan: error: {e}")
