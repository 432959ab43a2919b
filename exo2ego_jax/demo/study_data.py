"""The study's data: its world (``config.world``'s regime), datasets, demo LM and CLIP.

Made once in ``config.data_dir`` (default ``<root>/data``) and shared by every arm and seed;
a world found there that was generated with another regime is refused rather than reused,
since it would silently change what the study measures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from exo2ego_jax import config_lib
from exo2ego_jax.demo import runner
from input_pipeline.synthetic import generate_world, split_sizes
from input_pipeline.synthetic.concepts import StudyRegime

Log = Callable[[str], None]


def data_dir_of(config: ml_collections.ConfigDict) -> Path:
    return Path(config.data_dir) if config.data_dir else Path(config.root) / "data"


def expected_world_sizes(w: ml_collections.ConfigDict) -> dict[str, int]:
    """The per-split take counts ``generate_world`` makes from ``config.world``."""
    sizes = split_sizes(w.num_takes)
    for split, field in (
        ("pairs", "pair_takes"),
        ("ego", "ego_takes"),
        ("exo", "exo_takes"),
        ("heldout", "heldout_takes"),
    ):
        if w[field] > 0:
            sizes[split] = int(w[field])
    if w.get("val_takes", 0) > 0:
        sizes["val"] = int(w.val_takes)
    return sizes


def world_regime(w: ml_collections.ConfigDict) -> dict[str, Any]:
    """The study-regime fields of ``config.world`` (:class:`StudyRegime`'s, checked)."""
    regime = StudyRegime(
        transfer_colors=tuple(w.get("transfer_colors", ())),
        transfer_shapes=tuple(w.get("transfer_shapes", ())),
        val_takes=int(w.get("val_takes", 0)),
        transfer_heldout_fraction=float(w.get("transfer_heldout_fraction", 0.5)),
    )
    return dataclasses.asdict(regime)


def manifest_regime(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What a world on disk was generated with, in :func:`world_regime`'s terms."""
    study = manifest.get("study", {})
    return {
        "transfer_colors": tuple(study.get("transfer_colors", ())),
        "transfer_shapes": tuple(study.get("transfer_shapes", ())),
        "val_takes": int(study.get("val_takes", 0)),
        "transfer_heldout_fraction": float(study.get("transfer_heldout_fraction", 0.5)),
    }


def prepare_data(config: ml_collections.ConfigDict, *, log: Log = print) -> Path:
    """World (``config.world``'s regime), datasets, tokenizer and demo LM, each if missing."""
    data_dir, w = data_dir_of(config), config.world
    world = data_dir / "world"
    if not (world / "world.json").exists():
        t = time.time()
        generate_world(
            world,
            seed=w.seed,
            num_takes=w.num_takes,
            pair_takes=w.pair_takes or None,
            ego_takes=w.ego_takes or None,
            exo_takes=w.exo_takes or None,
            heldout_takes=w.heldout_takes or None,
            size=w.size,
            fps=w.fps,
            progress=False,
            study=StudyRegime(**world_regime(w)),
        )
        log(f"[study] generated the world in {time.time() - t:.0f}s -> {world}")
    manifest = json.loads((world / "world.json").read_text())
    want = {"seed": w.seed, "sizes": expected_world_sizes(w), "fps": w.fps, "size": w.size}
    want |= world_regime(w)
    got = {
        "seed": manifest["seed"],
        "sizes": manifest["sizes"],
        "fps": manifest["fps"],
        "size": manifest["resolution"][0],
        **manifest_regime(manifest),
    }
    if not (want["transfer_colors"] or want["transfer_shapes"]):
        want["transfer_heldout_fraction"] = got["transfer_heldout_fraction"]  # unused then
    if got != want:
        # Reusing a world of another regime would silently change what the study measures.
        raise config_lib.ConfigError(
            f"{world} was generated with {got}, config.world asks for {want}; point "
            "config.data_dir (or config.root) elsewhere or delete that world"
        )
    # Datasets, tokenizer, demo LM and CLIP (shorter pretraining in the quick preset).
    runner.prepare_data(
        data_dir,
        seed=w.seed,
        log=log,
        lm_steps=config.lm_steps,
        clip_steps=config.clip_steps,
        clip_takes=config.clip_takes,
        clip_views=tuple(config.get("clip_views", ("ego", "exo"))),
        pretrain_clip=bool(config.get("pretrain_clip", False)),
        progress=False,
    )
    return data_dir
