"""Orbax checkpoints of a stage, and the params-only hand-off between stages.

A stage's workdir holds ``checkpoints/<step>/`` with the items

``params``     the stage's *trainable* parameters only (a frozen 7B LLM is never re-saved)
``opt_state``  the optimizer state of those parameters
``meta``       JSON: stage number, step, parameter paths, the model config summary
``config``     JSON: the full ml_collections config of the run
``data_<name>`` the Grain iterator state of each input stream (resumes mid-epoch exactly)

Orbax writes each step into a temporary directory and renames it when complete, so a crash
or SIGKILL during a save never leaves a checkpoint that a restart would pick up half-written.

Hand-off: a later stage restores the ``params`` item of earlier stages' latest checkpoints
(params only, no optimizer state), validating the stage number and every shape against the
model it is loaded into, directly into the target shardings.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from exo2ego_jax.weights.errors import CheckpointError

Params = dict[str, Any]


TODELETE = ".todelete"  # where old checkpoints are renamed before their removal


class HandOffError(CheckpointError):
    """An earlier stage's checkpoint is missing, of the wrong stage, or does not fit."""


def _grain_args(iterators: Mapping[str, Any], save: bool) -> dict[str, Any]:
    import grain  # noqa: PLC0415 — heavy; only needed when iterators are checkpointed

    cls = grain.checkpoint.CheckpointSave if save else grain.checkpoint.CheckpointRestore
    return {f"data_{k}": cls(it) for k, it in iterators.items() if hasattr(it, "get_state")}


class StageCheckpointer:
    """Saves / restores one stage's training state in ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        # Old checkpoints are first renamed into `.todelete` (atomic), then removed: a kill
        # during the clean-up never leaves a half-deleted step that would be listed.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            todelete_subdir=TODELETE,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._empty_todelete()  # an interrupted clean-up

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def delete(self, step: int) -> None:
        """Removes the checkpoint of ``step`` (renamed aside first, then deleted)."""
        self.manager.delete(step)
        self._empty_todelete()

    def save(
        self,
        step: int,
        params: Params,
        opt_state: Any,
        meta: dict,
        config_json: dict,
        iterators: Mapping[str, Any] | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves (asynchronously when configured); returns True if a save was started."""
        args = dict(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
            config=ocp.args.JsonSave(config_json),
            **_grain_args(iterators or {}, save=True),
        )
        self._empty_todelete()  # what earlier saves' clean-ups renamed aside
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(
        self,
        step: int,
        abstract_params: Params,
        abstract_opt_state: Any,
        iterators: Mapping[str, Any] | None = None,
    ) -> tuple[Params, Any, dict]:
        """Restores ``(params, opt_state, meta)`` into the shardings of the abstract trees;
        iterators are restored in place."""
        args = dict(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
            **_grain_args(iterators or {}, save=False),
        )
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["params"], out["opt_state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
        self._empty_todelete()

    def _empty_todelete(self) -> None:
        shutil.rmtree(self.directory / TODELETE, ignore_errors=True)


def _abstract_with_sharding(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def read_meta(workdir: str | Path) -> tuple[int, dict]:
    """``(latest step, meta)`` of a stage workdir, or a clear :class:`HandOffError`."""
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise HandOffError(
            f"{workdir}: no checkpoints/ directory. Run that stage first, or fix config.init.stages"
        )
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise HandOffError(f"{directory}: holds no finished checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return step, meta


def restore_stage_params(
    workdir: str | Path, expected_stage: int, target: Params
) -> tuple[Params, list[str]]:
    """Overwrites the leaves of ``target`` saved by an earlier stage's latest checkpoint.

    Args:
      workdir: the earlier stage's workdir.
      expected_stage: the stage number that workdir must hold.
      target: the full parameter tree (arrays or ``ShapeDtypeStruct`` with shardings); saved
        leaves are restored directly into the matching leaf's sharding.
    Returns:
      ``(params, restored paths)`` — ``target`` with the saved leaves replaced.
    """
    step, meta = read_meta(workdir)
    if meta.get("stage") != expected_stage:
        raise HandOffError(
            f"{workdir}: holds a stage {meta.get('stage')} checkpoint, expected stage "
            f"{expected_stage}. Check the order of config.init.stages"
        )
    saved_paths = meta["param_paths"]
    flat_target = traverse_util.flatten_dict(target, sep="/")
    missing = [p for p in saved_paths if p not in flat_target]
    if missing:
        raise HandOffError(
            f"{workdir}: parameters {missing[:5]} (of {len(missing)}) do not exist in this "
            "model; was that stage trained with a different architecture config?"
        )
    shapes = meta["param_shapes"]
    for p in saved_paths:
        want = tuple(flat_target[p].shape)
        if tuple(shapes[p]) != want:
            raise HandOffError(
                f"{workdir}: parameter {p} has shape {tuple(shapes[p])} in the checkpoint but "
                f"{want} in this model; the stages' model configs differ"
            )
    abstract = traverse_util.unflatten_dict(
        {p: _abstract_with_sharding(flat_target[p]) for p in saved_paths}, sep="/"
    )
    directory = Path(workdir).absolute() / "checkpoints"
    with ocp.CheckpointManager(directory) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract))
        )["params"]
    flat = dict(flat_target)
    flat.update(traverse_util.flatten_dict(restored, sep="/"))
    logging.info(
        "restored %d tensors of stage %d from %s (step %d)",
        len(saved_paths),
        expected_stage,
        workdir,
        step,
    )
    return traverse_util.unflatten_dict(flat, sep="/"), list(saved_paths)


def param_meta(params: Params) -> dict:
    """The ``param_paths`` / ``param_shapes`` fields of ``meta`` for a params tree."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return {
        "param_paths": sorted(flat),
        "param_shapes": {k: list(v.shape) for k, v in flat.items()},
    }


def dump_json(obj: Any) -> dict:
    """A JSON-safe copy (tuples -> lists, non-JSON values -> str)."""
    return json.loads(json.dumps(obj, default=str))
