"""The input streams of a stage, built from ``config.data`` with the Grain pipelines.

Each stream is an endless, seeded, per-host Grain iterator of host-local numpy batches
(``input_pipeline.pipeline.make_pipeline``); its position is part of every checkpoint.
Which prepared dataset feeds which stream is a config field (``config.data.datasets``):

=============  ======================  ==========================================
stream         default dataset         paper
=============  ======================  ==========================================
ego_caption    ``ego_clip``            EgoClip (stage 0, E_ego)
exo_caption    ``exo_clip_text``       web video-text (stage 0, E_exo)
               ``ego_exo_clip``        Ego-ExoClip exo side (stage 1)
pair           ``ego_exo_clip``        Ego-ExoClip synchronized pairs (stage 2)
instruct       ``ego_it``              EgoIT (stage 3)
=============  ======================  ==========================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np

from exo2ego_jax.config_lib import ConfigError
from exo2ego_jax.runtime import load_tokenizer_checked
from exo2ego_jax.stages import StageConfig
from input_pipeline import templates
from input_pipeline.pipeline import PipelineOptions, make_pipeline, record_dataset


@dataclasses.dataclass
class Stream:
    """One named input stream of a stage (e.g. ``ego_caption``).

    ``iterator`` yields host-local numpy batches (dicts of arrays with the per-host batch as
    leading axis); if it has ``get_state`` / ``set_state`` (a Grain iterator) its position
    is checkpointed. ``num_examples`` sizes an epoch.
    """

    iterator: Iterator[dict[str, np.ndarray]]
    num_examples: int


def dataset_for(stream: str, stage: StageConfig, config: ml_collections.ConfigDict) -> str:
    """The prepared dataset feeding ``stream`` in this stage (config override or default)."""
    override = config.data.get("datasets", {}).get(stream, "") if "datasets" in config.data else ""
    if override:
        return override
    if stream == "exo_caption" and stage.stage == 1:
        return "ego_exo_clip"
    return {
        "ego_caption": "ego_clip",
        "exo_caption": "exo_clip_text",
        "pair": "ego_exo_clip",
        "instruct": "ego_it",
    }[stream]


def check_text_room(config: ml_collections.ConfigDict, tokenizer) -> None:
    """``config.data.max_text_len`` must hold the template's fixed prompt and an answer."""
    template = config.data.template
    if template == "mistral":  # <s>[INST] <<SYS>> system <</SYS>> <video> [/INST]
        fixed = len(templates.build_prompt(tokenizer, "").input_ids)
    else:  # plain: <s> <video>
        fixed = 2
    need = fixed + 2  # at least one answer token and its end
    if config.data.max_text_len < need:
        raise ConfigError(
            f"config.data.max_text_len={config.data.max_text_len}: the {template!r} template's "
            f"fixed prompt alone is {fixed} tokens with this tokenizer; give at least {need} "
            f"(e.g. --config.data.max_text_len={fixed + 64})"
        )


def make_streams(config: ml_collections.ConfigDict, stage: StageConfig) -> dict[str, Stream]:
    """``{stream name: Stream}`` for every sub-batch the stage reads."""
    data_dir = config.data.prepared_dir
    if not data_dir or not Path(data_dir).is_dir():
        raise ConfigError(
            f"config.data.prepared_dir={data_dir!r}: no such directory; prepare the datasets with "
            "`python -m input_pipeline.prepare --world WORLD --out DIR`"
        )
    tok = load_tokenizer_checked(config)
    check_text_room(config, tok)
    # One micro-batch per step: the global batch over gradient-accumulation steps and hosts.
    micro = config.optim.batch_size // (config.optim.grad_accum or 1)
    if micro % jax.process_count():  # each host reads an equal, disjoint part of every batch
        raise ConfigError(
            f"config.optim.batch_size={config.optim.batch_size} (micro-batch {micro}) is not "
            f"divisible by the {jax.process_count()} processes"
        )
    per_host = micro // jax.process_count()
    options = PipelineOptions(
        batch_size=per_host,
        num_frames=config.model.num_frames,
        image_size=config.model.image_size,
        max_text_len=config.data.max_text_len,
        seed=config.seed,
        num_epochs=None,  # endless: the trainer counts steps
        workers=config.data.workers,
        on_bad_video=config.data.on_bad_video,
    )
    streams = {}
    for name in stage.batches:
        dataset = dataset_for(name, stage, config)
        size_opts = PipelineOptions(shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
        size = len(record_dataset(name, data_dir, size_opts, dataset=dataset)[0])
        pipeline = make_pipeline(name, data_dir, tok, options, dataset=dataset)
        streams[name] = Stream(iter(pipeline), size)
    return streams
