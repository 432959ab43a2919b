"""Moved: the synthetic world is the package :mod:`input_pipeline.synthetic` now (one module
per job). This module only re-exports its public names for old imports, and
``python -m input_pipeline.synthetic_world`` still runs ``python -m input_pipeline.synthetic``.
"""

import sys

from input_pipeline.synthetic import (  # noqa: F401
    ACTION_CLASSES,
    COLORS,
    DEFAULT_CRF,
    DEFAULT_FPS,
    DEFAULT_NUM_TAKES,
    DEFAULT_PIX_FMT,
    DEFAULT_SIZE,
    DEFAULT_SPLIT_FRACTIONS,
    EGO_CAMERA,
    EGOIT_TEMPLATES,
    EXO_RIGS,
    NAV_MOTIONS,
    SHAPES,
    VERBS,
    ObjectSpec,
    Step,
    Subtask,
    TakeSpec,
    Timeline,
    action_class,
    build_specs,
    egoclip_text,
    exo_caption,
    generate_world,
    imperative,
    main,
    narration,
    object_screen_positions,
    phrase,
    render_take,
    sample_take_spec,
    simulate,
    split_sizes,
    write_mp4,
)

if __name__ == "__main__":
    sys.exit(main())
