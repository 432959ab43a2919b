"""Moved: the ray-cast renderer is :mod:`input_pipeline.synthetic.raycast` now. This module
only re-exports its public names for old imports."""

from input_pipeline.synthetic.raycast import (  # noqa: F401
    OBJECT_SIZES,
    Camera,
    ObjectState,
    SceneState,
    look_rotation,
    object_size,
    render_background,
    render_scene,
)
