"""Restoring a converted pretrained checkpoint directly into sharded device arrays.

``python -m exo2ego_jax.tools.convert`` turns Hugging Face CLIP / Mistral weights and a
VideoLLaMA2 projector into one Orbax params checkpoint whose leaves use the Exo2Ego param
paths (``ego_encoder/clip/...``, ``exo_encoder/clip/...``, ``exo_encoder/connector/...``,
``llm/...``; LoRA adapters and the other parts are not in it). This module reads it back:

* :func:`restore_converted` — overwrites the converted leaves of a full (initialised,
  sharded) param tree; every leaf is read by Orbax straight into the target leaf's sharding
  and dtype, so each device reads only its own shards and no host copy of the model exists.
* :func:`load_converted` — only the converted leaves, as sharded arrays of a mesh and rules
  preset (shardings from :func:`exo2ego_jax.sharding.param_shardings`).

The trainer calls :func:`restore_converted` when ``config.init.converted`` is set (after
random init and the HF loaders, before the stage hand-offs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.weights.errors import CheckpointError

Params = dict[str, Any]

#: ``custom_metadata["format"]`` of a checkpoint written by ``tools.convert``.
FORMAT = "exo2ego-converted"
FORMAT_VERSION = 1


def _flat(tree: Params) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def read_metadata(
    directory: str | os.PathLike,
) -> tuple[dict[str, tuple[tuple[int, ...], Any]], dict]:
    """``({path: (shape, stored dtype)}, conversion info)`` of a converted checkpoint.

    Reads only metadata (no array data). Raises :class:`CheckpointError` if ``directory``
    does not exist or is not a finished ``tools.convert`` output.
    """
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: no such converted checkpoint; create it with "
            "`python -m exo2ego_jax.tools.convert ... --out=DIR`"
        )
    try:
        meta = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(directory)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{directory}: not a readable Orbax checkpoint ({e})") from e
    info = dict(meta.custom_metadata or {})
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f"{directory}: not written by exo2ego_jax.tools.convert (custom_metadata format "
            f"{info.get('format')!r}); stage checkpoints go in config.init.stages instead"
        )
    tree = meta.item_metadata
    tree = getattr(tree, "tree", tree)  # TreeMetadata wraps the nested dict
    flat = {k: (tuple(m.shape), m.dtype) for k, m in _flat(dict(tree)).items()}
    return flat, info


def restore_leaves(
    directory: str | os.PathLike, abstract_flat: dict[str, jax.ShapeDtypeStruct]
) -> dict[str, Any]:
    """Restores the chosen leaves (``{"llm/norm/scale": ShapeDtypeStruct(shape, dtype,
    sharding=...)}``), each directly into its sharding and dtype; no validation."""
    directory = Path(directory).absolute()
    abstract = traverse_util.unflatten_dict(abstract_flat, sep="/")
    restore_args = jax.tree.map(
        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
        abstract,
    )
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
        restored = ckpt.restore(
            directory,
            args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True),
        )
    return _flat(restored)


def _plan(
    directory: Path, target_flat: dict[str, Any]
) -> tuple[dict[str, jax.ShapeDtypeStruct], list[str]]:
    """Validates the checkpoint against the target tree; ``(abstract leaves, skipped)``.

    Leaves under a top-level part the model does not have (``exo_encoder`` of the ego-only
    baseline) are skipped, as the HF loaders skip them; any other unknown path or a shape
    mismatch raises :class:`CheckpointError` naming the parameter.
    """
    saved, _ = read_metadata(directory)
    tops = {k.split("/")[0] for k in target_flat}
    skipped = sorted(k for k in saved if k.split("/")[0] not in tops)
    unknown = sorted(k for k in saved if k.split("/")[0] in tops and k not in target_flat)
    if unknown:
        raise CheckpointError(
            f"{directory}: parameters {unknown[:5]} (of {len(unknown)}) do not exist in this "
            "model; was it converted from checkpoints of another architecture (or with "
            "scan_layers=False)?"
        )
    abstract: dict[str, jax.ShapeDtypeStruct] = {}
    for k, (shape, _) in saved.items():
        if k in skipped:
            continue
        want = target_flat[k]
        if tuple(want.shape) != shape:
            raise CheckpointError(
                f"{directory}: parameter {k} has shape {shape} in the converted checkpoint but "
                f"{tuple(want.shape)} in this model; make config.model match the checkpoint"
            )
        sharding = getattr(want, "sharding", None)
        if sharding is None:
            raise CheckpointError(
                f"target leaf {k} has no sharding; pass jax.Arrays or ShapeDtypeStructs with "
                "sharding= (e.g. from sharding.param_shardings)"
            )
        abstract[k] = jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)
    return abstract, skipped


def restore_converted(
    directory: str | os.PathLike, target: Params, *, donate: bool = False
) -> tuple[Params, list[str]]:
    """Overwrites the leaves of ``target`` that a converted checkpoint holds.

    Args:
      directory: output of ``tools.convert``.
      target: the full parameter tree: ``jax.Array`` leaves (e.g. from ``shard_init``) or
        ``ShapeDtypeStruct`` with ``sharding``. Each converted leaf is restored directly into
        that leaf's sharding, cast to its dtype (a bfloat16 checkpoint fills float32 params).
      donate: delete the replaced ``jax.Array`` leaves of ``target`` before reading, so a
        device never holds the initial and the restored copy of a tensor at once. ``target``
        must not be used afterwards.
    Returns:
      ``(params, restored paths)``: ``target`` with the converted leaves replaced and every
      other leaf (F, G, the ego connector, LoRA adapters...) untouched.
    """
    directory = Path(directory).absolute()
    flat = _flat(target)
    abstract, skipped = _plan(directory, flat)
    if skipped:
        logging.info("%s: skipped %d tensors of parts this model lacks", directory, len(skipped))
    if donate:  # validation passed: free the initial values before the restored ones arrive
        for k in abstract:
            if isinstance(flat[k], jax.Array):
                flat[k].delete()
    flat.update(restore_leaves(directory, abstract))
    logging.info("restored %d converted tensors from %s", len(abstract), directory)
    return traverse_util.unflatten_dict(flat, sep="/"), sorted(abstract)


def load_converted(
    directory: str | os.PathLike, model: Any, mesh: jax.sharding.Mesh, rules: Any = None
) -> Params:
    """Only the converted leaves of ``model``'s params, sharded on ``mesh`` by ``rules``.

    ``model`` is an :class:`~exo2ego_jax.models.exo2ego.Exo2Ego` (anything with
    ``init_boxed``); shardings come from :func:`exo2ego_jax.sharding.param_shardings` (a
    preset name or rules table), dtypes from the model's params. Nothing else is allocated.
    """
    shardings = _flat(sharding_lib.param_shardings(model, mesh, rules))
    shapes = _flat(sharding_lib.abstract_boxed(model)[1])
    target = {
        k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[k]) for k, s in shapes.items()
    }
    directory = Path(directory).absolute()
    abstract, _ = _plan(directory, target)
    return traverse_util.unflatten_dict(restore_leaves(directory, abstract), sep="/")
