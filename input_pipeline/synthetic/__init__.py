"""Synthetic tabletop demo world: procedures, rendering to mp4 and real-format annotations.

A *take* is a camera wearer "C" doing a short procedure (4-8 atomic actions on a table with a
few coloured objects, plus an occasional head turn or step) recorded by a head-mounted
fisheye **ego** camera (``aria01``) and fixed pinhole **exo** cameras (``cam01``..``cam03``),
time-synchronised. Takes are split into disjoint groups that mirror the paper's data regime:

* ``pairs``     synchronized ego+exo takes with timestamped atomic narrations (Ego-Exo4D
                layout: ``takes.json`` + ``annotations/atomic_descriptions_train.json``);
* ``ego``       ego-only takes with narrations (EgoClip ``egoclip/egoclip.csv``; scarce);
* ``exo``       exo-only takes with third-person captions (stand-in for web video-text;
                ``exo_web/exo_captions.json``, VideoLLaMA2 JSON with start/end; plentiful);
* ``heldout``   ego-only takes used only by the EgoBench-style task files in ``egobench/``;
* ``val``       (optional, the study regime) more such takes, with their own EgoBench files
                in ``egobench_val/`` for tuning.

With transfer concepts
(``generate_world(..., study=StudyRegime(transfer_colors=("purple",)))``) some colours and
shapes occur in exo takes but in no ego-labelled take, and held-out takes are grouped
``transfer`` / ``seen`` (module ``concepts``).

EgoIT-style instructions (``egoit/egoit_instructions.json``) are built on the ego videos of
the ``pairs`` and ``ego`` takes. See ``docs/data.md`` for every file's layout.

CLI: ``python -m input_pipeline.synthetic --out DIR --seed S [--takes N]``.

Modules, in the order a world is made:

================  ============================================================================
``vocabulary``    colours, shapes, verbs and their forms, head motions, action classes
``takes``         the take data model (objects, steps, subtasks, cameras)
``procedure``     object placement and procedure planning on the table
``concepts``      transfer concepts: the split constraints, held-out groups, item -> take
``sampling``      a take spec from a seed; the world's splits
``simulation``    hands, objects, head and gaze in every frame
``raycast``       the pure-numpy ray caster: cameras, the depth-buffered canvas, primitives
``scene``         the scene it draws (room, table, objects, actor) and whole frames
``rendering``     a take's frames from any camera, object screen positions, mp4 encoding
``language``      narrations, captions, instruction templates, answer phrases
``file_formats``  annotation times, JSON / TSV bytes, VideoLLaMA2 conversation records
``corpora``       Ego-Exo4D, EgoClip, exo caption and EgoIT files
``egobench_qa``   EgoBench question-answering records
``egobench``      every EgoBench file (with Charades-Ego and EPIC retrieval)
``parallel``      rendering jobs in spawned worker processes
``world``         :func:`generate_world`: everything written into one directory
``cli``           the command line
``clip_corpus``   the demo CLIP's pretraining corpus (new takes, never the world's)
================  ============================================================================
"""

from input_pipeline.synthetic.cli import main
from input_pipeline.synthetic.clip_corpus import (
    LABELS,
    Corpus,
    clip_labels,
    render_corpus,
    render_take_clips,
)
from input_pipeline.synthetic.concepts import (
    StudyRegime,
    TransferConcepts,
    heldout_groups,
    item_take,
)
from input_pipeline.synthetic.language import (
    EGOIT_TEMPLATES,
    action_class,
    egoclip_text,
    exo_caption,
    imperative,
    narration,
    phrase,
)
from input_pipeline.synthetic.rendering import (
    DEFAULT_CRF,
    DEFAULT_PIX_FMT,
    object_screen_positions,
    render_take,
    write_mp4,
)
from input_pipeline.synthetic.sampling import (
    DEFAULT_NUM_TAKES,
    DEFAULT_SPLIT_FRACTIONS,
    build_specs,
    sample_take_spec,
    split_sizes,
)
from input_pipeline.synthetic.simulation import Timeline, simulate
from input_pipeline.synthetic.takes import (
    DEFAULT_FPS,
    DEFAULT_SIZE,
    EGO_CAMERA,
    EXO_RIGS,
    ObjectSpec,
    Step,
    Subtask,
    TakeSpec,
)
from input_pipeline.synthetic.vocabulary import (
    ACTION_CLASSES,
    COLORS,
    NAV_MOTIONS,
    SHAPES,
    VERBS,
)
from input_pipeline.synthetic.world import generate_world

__all__ = [
    # vocabulary
    "COLORS",
    "SHAPES",
    "VERBS",
    "NAV_MOTIONS",
    "ACTION_CLASSES",
    # takes
    "DEFAULT_FPS",
    "DEFAULT_SIZE",
    "EGO_CAMERA",
    "EXO_RIGS",
    "ObjectSpec",
    "Step",
    "Subtask",
    "TakeSpec",
    "DEFAULT_NUM_TAKES",
    "DEFAULT_SPLIT_FRACTIONS",
    "sample_take_spec",
    "split_sizes",
    "build_specs",
    # transfer concepts (the study regime)
    "StudyRegime",
    "TransferConcepts",
    "heldout_groups",
    "item_take",
    # simulation and rendering
    "Timeline",
    "simulate",
    "DEFAULT_CRF",
    "DEFAULT_PIX_FMT",
    "render_take",
    "object_screen_positions",
    "write_mp4",
    # language
    "phrase",
    "narration",
    "egoclip_text",
    "imperative",
    "action_class",
    "exo_caption",
    "EGOIT_TEMPLATES",
    # the world and its CLI
    "generate_world",
    "main",
    # the demo CLIP's corpus
    "LABELS",
    "Corpus",
    "clip_labels",
    "render_corpus",
    "render_take_clips",
]
