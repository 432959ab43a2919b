"""exo2ego-jax: Exo2Ego (egocentric video understanding guided by exocentric knowledge) in
JAX / Flax Linen.

The curated public API (docs/api.md). Every model is a pure function of explicit
parameters; call them inside your own ``jax.jit`` / ``jax.grad``::

    import exo2ego_jax as e2e

    model = e2e.Exo2Ego(e2e.tiny())              # or e2e.paper(): CLIP-L/14-336 + Mistral-7B
    params = model.init(jax.random.key(0))
    logits, labels = model(params, frames, input_ids, attention_mask, labels)

Running whole stages, evaluations and chats is the job of ``main.py`` (or
``exo2ego_jax.training.loop.train``, ``exo2ego_jax.eval.evaluate.evaluate``,
``exo2ego_jax.chat.ChatSession``); those are not imported here, so ``import exo2ego_jax``
stays light.
"""

from exo2ego_jax.losses import cycle_consistency_loss, kl_migration_loss, vtg_loss
from exo2ego_jax.models import clip, connector, decode, lora, mapping, mistral
from exo2ego_jax.models.clip import CLIPVisionConfig, CLIPVisionTower, clip_features
from exo2ego_jax.models.connector import STCConnector, STCConnectorConfig
from exo2ego_jax.models.decode import GenerateOutput, generate
from exo2ego_jax.models.exo2ego import Exo2Ego, Exo2EgoConfig, paper, tiny, with_lora
from exo2ego_jax.models.lora import LoRAConfig, merge_lora
from exo2ego_jax.models.mapping import MappingConfig, MappingNetwork
from exo2ego_jax.models.mistral import KVCache, MistralConfig, MistralLM, init_cache
from exo2ego_jax.stages import StageConfig, make_train_step, split_params, stage_loss
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf import load_clip_vision, load_mistral, save_clip_vision, save_mistral
from exo2ego_jax.weights.mm_projector import load_mm_projector

__all__ = [
    # the model and its presets
    "Exo2Ego",
    "Exo2EgoConfig",
    "paper",
    "tiny",
    "with_lora",
    # its parts (each module also has its own tiny() / paper() presets)
    "clip",
    "connector",
    "mapping",
    "mistral",
    "lora",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "clip_features",
    "STCConnector",
    "STCConnectorConfig",
    "MappingConfig",
    "MappingNetwork",
    "MistralConfig",
    "MistralLM",
    "KVCache",
    "init_cache",
    "LoRAConfig",
    "merge_lora",
    # losses and the stage step
    "vtg_loss",
    "kl_migration_loss",
    "cycle_consistency_loss",
    "StageConfig",
    "stage_loss",
    "make_train_step",
    "split_params",
    # decoding
    "decode",
    "generate",
    "GenerateOutput",
    # weights in and out (Hugging Face, VideoLLaMA2)
    "load_clip_vision",
    "load_mistral",
    "save_clip_vision",
    "save_mistral",
    "load_mm_projector",
    "CheckpointError",
]
