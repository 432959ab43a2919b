"""The built-in demo's configs: ``python main.py --config=configs/demo.py:stageN|eval|chat``.

The demo (``python main.py --demo``, ``exo2ego_jax.demo.runner``) trains the ``demo``
preset of every stage with all paths inside one workdir and one data directory:

* ``<data_dir>/world``: the synthetic ego/exo world;
* ``<data_dir>/prepared``: its datasets, the demo tokenizer, the demo LM (``llm``) and the
  demo CLIP tower (``clip``) that stand in for the downloaded Mistral and CLIP weights;
* ``<workdir>/stageN``: each stage's checkpoints; ``<workdir>/eval``: EgoBench predictions.

:func:`stage_config` and :func:`eval_config` build them for any workdir / data directory
(the runner, the chat check and the study call them); :func:`get_config` gives the
defaults (``workdirs/demo``, ``demo_data``) to the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections

from configs import common
from configs import eval as eval_configs

WORKDIR = Path("workdirs/demo")
DATA_DIR = Path("demo_data")


def stage_config(
    stage: int, workdir: str | Path = WORKDIR, data_dir: str | Path = DATA_DIR, **overrides: Any
) -> ml_collections.ConfigDict:
    """The demo config of ``stage`` with every path pointed into ``workdir`` / ``data_dir``.

    ``overrides`` are dotted field paths, e.g. ``**{"optim.num_epochs": 2}``.
    """
    workdir, data_dir = Path(workdir), Path(data_dir)
    c = common.base_config(stage, "demo")
    c.workdir = str(workdir / f"stage{stage}")
    _point_at_data(c, data_dir)
    c.init.stages = tuple(str(workdir / f"stage{i}") for i in range(stage))
    c.update_from_flattened_dict(overrides)
    return c


def eval_config(
    workdir: str | Path = WORKDIR, data_dir: str | Path = DATA_DIR, *, chat: bool = False
) -> ml_collections.ConfigDict:
    """``configs/eval.py:demo`` (or ``demo,chat``) pointed at this demo's stage workdirs and
    data."""
    workdir, data_dir = Path(workdir), Path(data_dir)
    c = eval_configs.get_config("demo,chat" if chat else "demo")
    _point_at_data(c, data_dir)
    c.init.stages = tuple(str(workdir / f"stage{i}") for i in range(4))
    c.eval.data_root = str(data_dir / "world")
    c.eval.out_dir = c.workdir = str(workdir / "eval")
    return c


def _point_at_data(c: ml_collections.ConfigDict, data_dir: Path) -> None:
    prepared = data_dir / "prepared"
    c.data.world_dir = str(data_dir / "world")
    c.data.prepared_dir = str(prepared)
    c.data.tokenizer = str(prepared / "tokenizer")
    c.init.llm = str(prepared / "llm")
    c.init.clip = str(prepared / "clip")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """``stage0`` ... ``stage3`` (default ``stage0``), ``eval`` or ``chat``."""
    arg = (arg or "stage0").strip()
    if arg in ("eval", "chat"):
        return eval_config(chat=arg == "chat")
    if arg in {f"stage{i}" for i in range(4)}:
        return stage_config(int(arg[-1]))
    raise ValueError(f"demo config {arg!r}: use stage0..stage3, eval or chat")
