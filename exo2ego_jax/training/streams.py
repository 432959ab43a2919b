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
from jax.experimental import multihost_utils

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


TEXT_KEYS = ("input_ids", "labels", "attention_mask")


def length_buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The text lengths a batch is padded to: ``config.data.length_buckets`` (each < the
    maximum), or powers of two from 16, and always ``config.data.max_text_len``."""
    top = config.data.max_text_len
    given = tuple(config.data.get("length_buckets", ()) or ())
    if given:
        return tuple(sorted({int(b) for b in given if 0 < b < top} | {top}))
    out, b = [], 16
    while b < top:
        out.append(b)
        b *= 2
    return (*out, top)


def trim_to_buckets(host_batch: dict, buckets: tuple[int, ...]) -> dict:
    """Each stream's text arrays cut to its longest row rounded up to a bucket.

    Rows are right-padded, so only padding is removed (VideoLLaMA2 pads a batch to its
    longest row too). All processes agree on the length (one tiny all-gather per step on a
    multi-host run), so the global batch keeps one shape.
    """
    names = [k for k, b in host_batch.items() if "attention_mask" in b]
    longest = np.asarray(
        [int(np.asarray(host_batch[k]["attention_mask"]).sum(1).max()) for k in names], np.int32
    )
    if jax.process_count() > 1 and names:
        longest = np.asarray(multihost_utils.process_allgather(longest)).max(0)
    out = dict(host_batch)
    for name, n in zip(names, longest, strict=True):
        length = next(b for b in buckets if b >= n) if n <= buckets[-1] else int(n)
        out[name] = {
            k: (np.asarray(v)[:, :length] if k in TEXT_KEYS else v)
            for k, v in host_batch[name].items()
        }
    return out


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
        frames_dtype="uint8",  # 4x fewer bytes to the device, normalised there (clip_features)
        clip_cache_mb=config.data.get("clip_cache_mb", 0),
    )
    streams = {}
    for name in stage.batches:
        dataset = dataset_for(name, stage, config)
        size_opts = PipelineOptions(shuffle=False, num_epochs=1, shard_index=0, shard_count=1)
        size = len(record_dataset(name, data_dir, size_opts, dataset=dataset)[0])
        pipeline = make_pipeline(name, data_dir, tok, options, dataset=dataset)
        streams[name] = Stream(iter(pipeline), size)
    return streams
