"""Moved: the demo CLIP's corpus is :mod:`input_pipeline.synthetic.clip_corpus` now. This
module only re-exports its public names for old imports."""

from input_pipeline.synthetic.clip_corpus import (  # noqa: F401
    LABELS,
    Corpus,
    clip_labels,
    render_corpus,
    render_take_clips,
)
