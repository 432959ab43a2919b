"""Hugging Face checkpoint I/O: the public entry points.

``load_clip_vision`` / ``save_clip_vision`` live in :mod:`hf_clip`, ``load_mistral`` /
``save_mistral`` in :mod:`hf_mistral`; both read ``config.json`` + ``*.safetensors`` (sharded
or not) tensor by tensor through :class:`~exo2ego_jax.weights.tensors.TensorSource`.
"""

from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_clip import load_clip_vision, save_clip_vision
from exo2ego_jax.weights.hf_mistral import load_mistral, save_mistral

__all__ = [
    "CheckpointError",
    "load_clip_vision",
    "load_mistral",
    "save_clip_vision",
    "save_mistral",
]
