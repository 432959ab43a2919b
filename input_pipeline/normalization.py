"""CLIP's input normalisation (OpenAI CLIP / VideoLLaMA2), in one place.

A light module (numpy only) so that both the input pipeline (host side) and the models
(device side, ``exo2ego_jax.models.clip.normalize_uint8``) read the same constants.
"""

from __future__ import annotations

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames: np.ndarray) -> np.ndarray:
    """``uint8[..., 3]`` RGB frames -> CLIP-normalised ``float32[..., 3]``."""
    x = np.asarray(frames, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
