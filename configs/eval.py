"""EgoBench evaluation / chat config: ``python main.py --config=configs/eval.py[:PRESET]``.

Presets (the part after ``:``):

* ``demo`` (default): the demo stage-3 model (``workdirs/demo/stage0..3``) on the synthetic
  EgoBench of the demo world (``demo_data/world``); table with a chance column.
* ``paper``: paper sizes; set ``--config.eval.data_root`` to the EgoBench root (and the
  per-task ``eval.loader_kwargs``, see docs/egobench.md); table with the paper column.
* ``chat``: the demo paths, in chat mode (``run='chat'``): answer ``chat.question`` about
  ``chat.video``. ``paper,chat`` does the same with the paper preset.

Every preset also carries ``web.*``, the web chat's limits (``python -m exo2ego_jax.web``).

``model`` / ``init`` / ``data`` / ``mesh`` come from ``configs/common.base_config(3, ...)``
so the model is built exactly as stage 3 trained it; ``init.stages`` lists all four stage
workdirs (params restored in order, stage 3 last).
"""

from __future__ import annotations

import ml_collections

from configs import common
from input_pipeline.egobench import TASKS


def _parse(arg: str | None) -> tuple[str, bool]:
    """``"demo" | "paper" | "chat" | "paper,chat"`` -> (training preset, chat mode)."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    chat = "chat" in parts
    rest = [p for p in parts if p != "chat"]
    if len(rest) > 1:
        raise ValueError(f"config preset {arg!r}: give one of {common.PRESETS}, optionally ',chat'")
    return common.parse_preset(rest[0] if rest else None), chat


def _loader_kwargs(preset: str) -> ml_collections.ConfigDict:
    """Per-task keyword arguments of the EgoBench loaders (``input_pipeline.egobench``):
    annotation file names and video layout.

    The demo world's layout is every loader's default. For the real benchmarks the
    documented official file names are filled in; video folders depend on where the user
    put each dataset (override them, e.g. ``--config.eval.loader_kwargs.vlnqa.video_dir=...``).
    """
    kw = ml_collections.ConfigDict({t: ml_collections.ConfigDict() for t in TASKS})
    if preset == "paper":
        kw.qaego4d_close.file = "qaego4d/annotations.QaEgo4D_test_close.json"
        kw.qaego4d_open.file = "qaego4d/annotations.QaEgo4D_test.json"
        kw.epic_mir.video_dir = "EPIC-KITCHENS"
        kw.epic_mir.video_pattern = "{participant_id}/videos/{video_id}.MP4"
    return kw


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, chat = _parse(arg)
    demo = preset == "demo"
    c = common.base_config(3, preset)
    c.run = "chat" if chat else "evaluate"  # what main.py runs with this config
    c.init.stages = tuple(f"workdirs/{preset}/stage{i}" for i in range(4))
    c.workdir = f"workdirs/{preset}/eval"

    e = c.eval = ml_collections.ConfigDict()
    e.tasks = TASKS  # eight tasks; QAEgo4D as its two sub-modes (close / open)
    e.data_root = "demo_data/world" if demo else ""  # EgoBench root (every video inside it)
    e.out_dir = f"workdirs/{preset}/eval"  # <task>.jsonl predictions, results.md / .csv
    e.batch_size = 8  # prompts per forward pass; a multiple of the data-parallel devices
    e.row_batch = 32  # (prompt, option) continuation rows per pass (log-likelihood modes)
    e.mode = "loglik"  # loglik | letters (MCQ only; EgoMCQ's options are clips: always loglik)
    e.task_detail = True  # the paper's best prompt: a task-detail line ...
    e.first_person = True  # ... and "You are the camera wearer."
    e.max_items = 0  # per task, 0 = all
    e.retrieval_max_clips = 0  # EPIC MIR clips (O(clips x sentences) rows), 0 = all
    e.open_max_new_tokens = 32  # QAEgo4D open-ended answers
    e.paper_column = not demo  # the paper's numbers mean nothing on the synthetic world
    e.chance_column = True
    e.loader_kwargs = _loader_kwargs(preset)

    h = c.chat = ml_collections.ConfigDict()
    h.video = ""  # any video file PyAV can decode
    h.question = "What am I doing in this video?"
    # EgoBench's first-person cue in the system prompt (eval.first_person); off: stage 3 trains
    # without it, and the demo model asked with it answers worse (docs/egobench.md).
    h.first_person = False
    h.max_new_tokens = 64 if demo else 256
    h.temperature = 0.0  # 0 = greedy
    h.top_p = 1.0
    h.seed = 0  # sampling only

    # The web chat (``python -m exo2ego_jax.web``, docs/web.md); it also reads chat.*.
    w = c.web = ml_collections.ConfigDict()
    w.max_upload_mb = 50.0  # larger uploads are refused (by Gradio, and again on the server)
    w.max_seconds = 600.0  # longer videos are refused (duration from the container)
    w.max_question_chars = 1000
    w.max_turns = 4  # earlier (question, answer) turns kept in the prompt of a follow-up
    w.num_examples = 8  # held-out EgoMCQ clips of eval.data_root offered as examples
    w.max_queue = 16  # questions waiting for the model; more are turned away ("queue full")
    w.warmup_buckets = 2  # 64-token prompt buckets compiled at start-up (first question: 1)
    return c
