"""Grain pipelines: prepared datasets (``input_pipeline.datasets``) -> numpy batches.

One builder, :func:`make_pipeline`, for every batch the stages read (see
``exo2ego_jax/stages.py``) and for evaluation::

    MapDataset.source(ArrayRecord)            random access to records (paths + windows)
      -> shuffle(seed)                        a new order every epoch
      -> repeat(num_epochs | forever)
      -> [shard_index::shard_count]           per-host slice
      -> map: decode + sample frames          load_clip + normalize_frames (or skip)
              tokenize + mask                 templates (plain / mistral)
      -> to_iter_dataset(read threads)
      -> batch (drop_remainder for training)  skipped examples counted here
      -> mp_prefetch(workers)                 0 = in-process
      -> skip counter (main process)          ``iterator.num_skipped``

Batches (numpy), L = ``max_text_len``, T = ``num_frames``, S = ``image_size``:

* ``ego_caption`` / ``exo_caption`` (``plain`` template) and ``instruct`` (``mistral``):
  ``frames float32[B, T, S, S, 3]`` (CLIP-normalised), ``input_ids int32[B, L]``,
  ``labels int32[B, L]``, ``attention_mask int32[B, L]``;
* ``pair``: ``ego_frames``, ``exo_frames`` ``float32[B, T, S, S, 3]`` of the same window, and
  the narration as a caption: ``input_ids``, ``labels``, ``attention_mask``;
* ``eval`` (one row per clip of an EgoBench item; the last batch is padded): ``frames``,
  ``input_ids int32[B, L]`` / ``attention_mask int32[B, L]`` (the inference prompt, ending
  at ``[/INST]``), ``valid bool[B]``, ``item_index int32[B]`` (record index in the task's
  split, see :func:`bench_items`), ``clip_index int32[B]``, ``task`` / ``item_id`` ``str[B]``.

The iterator is deterministic for a seed and checkpointable (``get_state`` / ``set_state``,
JSON; Orbax: ``grain.checkpoint.CheckpointSave(iterator)``). A resumed iterator yields
exactly the batches the uninterrupted one would have, for the same options (the number of
workers included: each worker batches its own slice of the stream).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np
from absl import flags

from input_pipeline import clip_cache, mixture, templates
from input_pipeline.annotations import video_path
from input_pipeline.datasets import open_dataset
from input_pipeline.tokenizer import load_tokenizer
from input_pipeline.video import VideoDecodeError, load_clip, normalize_frames

__all__ = [
    "DEFAULT_DATASETS",
    "KINDS",
    "PipelineIterator",
    "PipelineOptions",
    "bench_items",
    "bench_metadata",
    "make_pipeline",
    "record_dataset",
]

log = logging.getLogger(__name__)

Kind = Literal["ego_caption", "exo_caption", "pair", "instruct", "eval"]
KINDS: tuple[str, ...] = ("ego_caption", "exo_caption", "pair", "instruct", "eval")
DEFAULT_DATASETS = {
    "ego_caption": "ego_clip",
    "exo_caption": "exo_clip_text",
    "pair": "ego_exo_clip",
    "instruct": "ego_it",
    "eval": "ego_bench",
}
# Which prepared datasets each kind can read (stage 1 reads the exo side of Ego-ExoClip).
_ALLOWED = {
    "ego_caption": ("ego_clip", "ego_exo_clip"),
    "exo_caption": ("exo_clip_text", "ego_exo_clip"),
    "pair": ("ego_exo_clip",),
    "instruct": ("ego_it",),
    "eval": ("ego_bench",),
}
_MAX_REASONS = 32  # skip messages kept by the iterator


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """Everything that shapes a pipeline's batches (demo-size defaults).

    Attributes:
      batch_size: rows per batch (per host).
      num_frames, image_size: T and S of ``float32[B, T, S, S, 3]``.
      max_text_len: L, the fixed text length (static shapes: no recompiles).
      seed: shuffle (and exo-view) seed, in [0, 2**32).
      shuffle: shuffle records (a different order per epoch). Ignored by ``eval``, which
        reads every clip once, in order.
      num_epochs: passes over the data; None = forever. Ignored by ``eval``.
      shard_index, shard_count: this host's slice; None = ``jax.process_index()`` /
        ``jax.process_count()``.
      workers: ``mp_prefetch`` worker processes (0 = decode in this process).
      worker_buffer_size: batches each worker prepares ahead.
      read_threads: threads per process that read and decode examples.
      on_bad_video: ``"skip"`` drops (and counts) an example whose video cannot be
        decoded; ``"raise"`` re-raises the :class:`VideoDecodeError` naming the file.
      frames_dtype: ``"float32"`` CLIP-normalised frames, or ``"uint8"`` RGB frames (a
        quarter of the bytes; the model normalises them on the device).
      max_consecutive_bad: this many unreadable examples in a row, without a readable one,
        stop the pipeline with :class:`NoReadableDataError` naming the dataset and the first
        bad files (an endless stream of bad videos would otherwise never yield a batch).
      drop_remainder: drop a final partial batch; None = True except for ``eval``, whose
        last batch is padded (``valid`` False) instead.
      system_prompt: the ``mistral`` template's system prompt (instruct and eval).
      exo_view: which exo camera of an Ego-ExoClip record: the annotated ``"best"`` one,
        or a ``"random"`` one (seeded per example).
      pad_to_square: pad frames to a square (VideoLLaMA2 ``expand2square``), not crop.
      video_root: where the relative video paths point; None = the data root the dataset
        was built from (its metadata ``source_root``).
      eval_prompt: ``"question"`` (the question alone; score options by likelihood) or
        ``"mcq"`` (evaluation's lettered prompt, ``templates.letter_prompt``).
      clip_cache_mb: keep decoded clips in memory, up to this many MiB per process, and
        reuse them in later epochs (``input_pipeline.clip_cache``); 0 = decode every time.
    """

    batch_size: int = 4
    num_frames: int = 8
    image_size: int = 64
    max_text_len: int = 128
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    shard_index: int | None = None
    shard_count: int | None = None
    workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    on_bad_video: Literal["skip", "raise"] = "skip"
    max_consecutive_bad: int = 256
    frames_dtype: Literal["float32", "uint8"] = "float32"
    drop_remainder: bool | None = None
    system_prompt: str | None = templates.DEFAULT_SYSTEM_PROMPT
    exo_view: Literal["best", "random"] = "best"
    pad_to_square: bool = False
    video_root: str | None = None
    eval_prompt: Literal["question", "mcq"] = "question"
    clip_cache_mb: float = 0

    def __post_init__(self):
        for name in ("batch_size", "num_frames", "image_size", "max_text_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"PipelineOptions.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"PipelineOptions.seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(
                f"PipelineOptions.num_epochs must be >= 1 or None, got {self.num_epochs}"
            )
        if self.workers < 0 or self.read_threads < 0:
            raise ValueError("PipelineOptions.workers and read_threads must be >= 0")
        if self.clip_cache_mb < 0:
            raise ValueError(
                f"PipelineOptions.clip_cache_mb must be >= 0 (0 = off), got {self.clip_cache_mb}"
            )
        _check_choice("on_bad_video", self.on_bad_video, ("skip", "raise"))
        _check_choice("frames_dtype", self.frames_dtype, ("float32", "uint8"))
        _check_choice("exo_view", self.exo_view, ("best", "random"))
        _check_choice("eval_prompt", self.eval_prompt, ("question", "mcq"))

    def shard(self) -> tuple[int, int]:
        """(shard_index, shard_count), defaulting to this JAX process."""
        if self.shard_index is None or self.shard_count is None:
            index, count = jax.process_index(), jax.process_count()
        index = index if self.shard_index is None else self.shard_index
        count = count if self.shard_count is None else self.shard_count
        if not 0 <= index < count:
            raise ValueError(f"shard_index {index} not in [0, shard_count={count})")
        return index, count


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"PipelineOptions.{name}={value!r}; expected one of {choices}")


# ----------------------------------------------------------------------------- examples


@dataclasses.dataclass(frozen=True)
class _Skipped:
    """Marker for an example dropped because a video could not be decoded."""

    reason: str


def _str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _bound(t: Any) -> float | None:
    t = float(t)
    return None if math.isnan(t) else t


class _ExampleFn:
    """Record -> example dict (frames decoded, text tokenized), or :class:`_Skipped`.

    Picklable (it runs in ``mp_prefetch`` workers): holds the tokenizer (or its directory,
    loaded lazily per process) and plain options.
    """

    def __init__(self, kind: str, dataset: str, tokenizer: Any, opts: PipelineOptions, root: str):
        self.kind, self.dataset, self.opts, self.root = kind, dataset, opts, root
        self._tokenizer = tokenizer

    @property
    def tokenizer(self):
        if isinstance(self._tokenizer, (str, os.PathLike)):
            self._tokenizer = load_tokenizer(self._tokenizer)
        return self._tokenizer

    def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None):
        try:
            return self._example(record, rng)
        except VideoDecodeError as e:
            if self.opts.on_bad_video == "raise":
                raise
            log.warning("skipping example %s: %s", _record_id(record), e)
            return _Skipped(str(e))

    # -- pieces

    def _clip(self, rel: Any, start: Any, end: Any) -> np.ndarray:
        """``float32[T, S, S, 3]`` (CLIP-normalised) or ``uint8`` RGB frames
        (``frames_dtype``) of a stored relative path and window; decoded once per process
        when ``clip_cache_mb`` allows (``input_pipeline.clip_cache``)."""
        path, window = video_path(self.root, _str(rel)), (_bound(start), _bound(end))
        o = self.opts

        def decode() -> np.ndarray:
            return load_clip(
                path, *window, o.num_frames, o.image_size, pad_to_square=o.pad_to_square
            )

        cache = clip_cache.process_cache(o.clip_cache_mb)
        key = cache and clip_cache.file_key(path)
        if key is None:
            frames = decode()
        else:
            shape = (o.num_frames, o.image_size, o.pad_to_square)
            frames = cache.get((key, window, shape), decode)
        return frames if self.opts.frames_dtype == "uint8" else normalize_frames(frames)

    def _exo(self, record, rng) -> str:
        views = record["exo_videos"]
        i = (
            int(rng.integers(len(views)))
            if self.opts.exo_view == "random"
            else int(record["best_exo"])
        )
        return views[i]

    def _pad(self, enc: templates.Encoded) -> dict[str, np.ndarray]:
        b = templates.pad_batch([enc], self.opts.max_text_len, self.tokenizer.pad_token_id)
        return {k: v[0] for k, v in b.items()}

    def _caption(self, text: str, record) -> dict[str, np.ndarray]:
        try:
            enc = templates.encode_caption(self.tokenizer, text, max_len=self.opts.max_text_len)
        except ValueError as e:
            raise ValueError(f"record {_record_id(record)}: {e}") from e
        return self._pad(enc)

    def _example(self, r: Mapping[str, Any], rng) -> dict[str, Any]:
        kind = self.kind
        if kind == "pair":
            out = {
                "ego_frames": self._clip(r["ego_video"], r["start"], r["end"]),
                "exo_frames": self._clip(self._exo(r, rng), r["start"], r["end"]),
            }
            return out | self._caption(_str(r["text"]), r)
        if kind in ("ego_caption", "exo_caption"):
            if self.dataset == "ego_exo_clip":
                video = r["ego_video"] if kind == "ego_caption" else self._exo(r, rng)
            else:
                video = r["video"]
            return {"frames": self._clip(video, r["start"], r["end"])} | self._caption(
                _str(r["text"]), r
            )
        if kind == "instruct":
            convs = [
                {"from": _str(f), "value": _str(v)}
                for f, v in zip(
                    r["conversations"]["from"], r["conversations"]["value"], strict=True
                )
            ]
            try:
                enc = templates.encode_conversation(
                    self.tokenizer,
                    convs,
                    template="mistral",
                    system=self.opts.system_prompt,
                    max_len=self.opts.max_text_len,
                )
            except ValueError as e:
                raise ValueError(f"record {_record_id(r)}: {e}") from e
            return {"frames": self._clip(r["video"], r["start"], r["end"])} | self._pad(enc)
        return self._eval_example(r)

    def _eval_example(self, unit: Mapping[str, Any]) -> dict[str, Any]:
        r, c = unit["record"], unit["clip_index"]
        question = _str(r["question"])
        options = [_str(o) for o in r["options"]]
        if self.opts.eval_prompt == "mcq" and 0 < len(options) <= len(templates.LETTERS):
            question = templates.letter_prompt(question, options)
        try:
            enc = templates.build_prompt(
                self.tokenizer,
                question,
                system=self.opts.system_prompt,
                max_len=self.opts.max_text_len,
            )
        except ValueError as e:
            raise ValueError(f"{_str(r['task'])} item {_str(r['item_id'])}: {e}") from e
        text = self._pad(enc)
        return {
            "frames": self._clip(r["videos"][c], r["starts"][c], r["ends"][c]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "item_index": np.int32(unit["item_index"]),
            "clip_index": np.int32(c),
            "task": _str(r["task"]),
            "item_id": _str(r["item_id"]),
        }


def _record_id(r: Mapping[str, Any]) -> str:
    if "record" in r:
        r = r["record"]
    return _str(r.get("id", r.get("item_id", "?")))


class _EvalUnits:
    """Random access to (item, clip) units of an EgoBench split: EgoMCQ items have five
    clips, every other item one."""

    def __init__(self, source):
        self._source = source
        self._units = [(i, c) for i in range(len(source)) for c in range(len(source[i]["videos"]))]

    def __len__(self) -> int:
        return len(self._units)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i, c = self._units[index]
        return {"record": self._source[i], "item_index": i, "clip_index": c}


# ----------------------------------------------------------------------------- batching


def _collate(rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        out[key] = np.asarray(values) if isinstance(values[0], str) else np.stack(values)
    return out


def _pad_rows(rows: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """Pad with blank rows (zeros, "", index -1) up to ``size``; adds ``valid``."""
    blank = {
        k: ("" if isinstance(v, str) else np.full_like(v, -1 if k.endswith("_index") else 0))
        for k, v in rows[0].items()
    }
    padded = [dict(r, valid=True) for r in rows]
    padded += [dict(blank, valid=False) for _ in range(size - len(rows))]
    return padded


class NoReadableDataError(VideoDecodeError):
    """A stream found no readable example in ``max_consecutive_bad`` attempts."""


@dataclasses.dataclass(frozen=True)
class _Batching:
    batch_size: int
    drop_remainder: bool
    pad: bool
    max_consecutive_bad: int
    dataset: str


class _BatchDataset(grain.IterDataset):
    """Groups examples into batches, dropping :class:`_Skipped` markers and counting them
    (``_num_skipped`` / ``_num_read`` / ``_skip_reasons`` keys, removed again by
    :class:`_CountSkips`)."""

    def __init__(self, parent: grain.IterDataset, batching: _Batching):
        super().__init__(parent)
        self._batching = batching

    def __iter__(self) -> grain.DatasetIterator:
        return _BatchIterator(self._parent.__iter__(), self._batching)

    def __str__(self) -> str:
        b = self._batching
        return f"_BatchDataset(batch_size={b.batch_size}, drop_remainder={b.drop_remainder})"


class _BatchIterator(grain.DatasetIterator):
    def __init__(self, parent, batching: _Batching):
        super().__init__(parent)
        self._b = batching

    def __next__(self) -> dict[str, Any]:
        b = self._b
        rows, reasons, in_a_row = [], [], 0
        while len(rows) < b.batch_size:
            try:
                x = next(self._parent)
            except StopIteration:
                if not rows or b.drop_remainder:
                    raise
                break
            if isinstance(x, _Skipped):
                reasons.append(x.reason)
                in_a_row += 1
                if in_a_row >= b.max_consecutive_bad:
                    raise NoReadableDataError(
                        f"dataset {b.dataset!r}: {in_a_row} examples in a row could not be "
                        f"read; first: {'; '.join(reasons[:3])}. Check the video paths and "
                        "the data root (config.data.prepared_dir / the dataset's source root)"
                    )
            else:
                rows.append(x)
                in_a_row = 0
        num_read = len(rows) + len(reasons)
        if b.pad:
            rows = _pad_rows(rows, b.batch_size)
        batch = _collate(rows)
        batch["_num_skipped"] = len(reasons)
        batch["_num_read"] = num_read
        batch["_skip_reasons"] = reasons[-_MAX_REASONS:]
        return batch

    # Nothing is buffered between batches, so the parent's position is the whole state.
    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class _CountSkips(grain.IterDataset):
    """Last stage, in the main process: moves the skip counts out of the batches."""

    def __iter__(self) -> PipelineIterator:
        return PipelineIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "_CountSkips"


class PipelineIterator(grain.DatasetIterator):
    """Iterator over a pipeline's batches.

    Attributes:
      num_skipped: examples dropped so far because of bad videos (``on_bad_video="skip"``);
        part of the checkpointed state, so it keeps counting after a resume.
      num_read: examples read so far, skipped ones included (checkpointed too).
      skip_reasons: the most recent skip messages (each names the file).
    """

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self.num_skipped = 0
        self.num_read = 0
        self.skip_reasons: collections.deque[str] = collections.deque(maxlen=_MAX_REASONS)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._parent))
        self.num_skipped += int(batch.pop("_num_skipped"))
        self.num_read += int(batch.pop("_num_read"))
        self.skip_reasons.extend(batch.pop("_skip_reasons"))
        return batch

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # stops worker processes now rather than at garbage collection

    def get_state(self) -> dict[str, Any]:
        return {
            "pipeline": self._parent.get_state(),
            "num_skipped": self.num_skipped,
            "num_read": self.num_read,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self.num_skipped = int(state["num_skipped"])
        self.num_read = int(state.get("num_read", 0))  # absent in older checkpoints


# ----------------------------------------------------------------------------- assembly


def record_dataset(
    kind: Kind,
    data_dir: str | os.PathLike,
    options: PipelineOptions,
    *,
    dataset: str | None = None,
    split: str | None = None,
) -> tuple[grain.MapDataset, str, str | tuple[str, ...]]:
    """The index-level part: source -> shuffle -> repeat -> host slice (no decoding yet).

    Returns the MapDataset of raw records (EgoBench: ``{"record", "item_index",
    "clip_index"}`` units), the dataset name and the video root. A ``dataset`` of several
    parts (``"ego_clip+ego_exo_clip"``, :mod:`input_pipeline.mixture`) gives
    ``(part, record)`` items of the parts concatenated before shuffling, and one video root
    per part.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {KINDS}")
    parts = mixture.dataset_parts(dataset or DEFAULT_DATASETS[kind])
    for part in parts:
        if part.split("/")[0] not in _ALLOWED[kind]:
            raise ValueError(f"kind {kind!r} reads {_ALLOWED[kind]}, not {part!r}")
    if kind == "eval" and (split is None or len(parts) > 1):
        raise ValueError("an eval pipeline reads one dataset and needs split=<task>")
    sources, roots = [], []
    for part in parts:
        source, meta = open_dataset(part, data_dir, split or "train")
        root = options.video_root or meta.get("source_root")
        if not root:
            raise ValueError(f"dataset {part!r} records no source_root; pass video_root")
        sources.append(source)
        roots.append(str(root))
    if kind == "eval":  # every clip exactly once, in order
        ds = grain.MapDataset.source(_EvalUnits(sources[0]))
    else:
        source = sources[0] if len(parts) == 1 else mixture.ConcatSource(sources)
        ds = grain.MapDataset.source(source)
        if options.shuffle:
            ds = ds.shuffle(seed=options.seed)
        if options.num_epochs != 1:
            ds = ds.repeat(options.num_epochs)
    index, count = options.shard()
    if count > 1:
        ds = ds[index::count]
    names = mixture.SEPARATOR.join(p.split("/")[0] for p in parts)
    return ds, names, roots[0] if len(parts) == 1 else tuple(roots)


def make_pipeline(
    kind: Kind,
    data_dir: str | os.PathLike,
    tokenizer: Any,
    options: PipelineOptions | None = None,
    *,
    dataset: str | None = None,
    split: str | None = None,
    **overrides: Any,
) -> grain.IterDataset:
    """A Grain pipeline of ``kind`` batches from the prepared datasets in ``data_dir``.

    Args:
      kind: ``"ego_caption"``, ``"exo_caption"`` (stages 0 / 1), ``"pair"`` (stage 2),
        ``"instruct"`` (stage 3) or ``"eval"`` (EgoBench).
      data_dir: where ``python -m input_pipeline.prepare`` wrote the datasets.
      tokenizer: a fast tokenizer (``input_pipeline.tokenizer.load_tokenizer``) or its
        directory (then loaded once per worker process).
      options: :class:`PipelineOptions`; ``overrides`` replace single fields
        (``make_pipeline("pair", d, tok, batch_size=8, workers=2)``).
      dataset: the prepared dataset to read (default per kind: ``ego_clip``,
        ``exo_clip_text``, ``ego_exo_clip``, ``ego_it``, ``ego_bench``); ``ego_exo_clip``
        also serves ``ego_caption`` / ``exo_caption`` (stage 1's exo side). A config may be
        named: ``"ego_exo_clip/w680ms"``. Several joined by ``+`` are read as one stream
        (``"ego_clip+ego_exo_clip"``: every record of each, shuffled together).
      split: the split; for ``eval`` the EgoBench task (``"egoschema"``, ...).

    Returns:
      An IterDataset; ``iter()`` gives a :class:`PipelineIterator` of numpy batch dicts
      (module docstring) that counts skipped examples and checkpoints its position.
    """
    opts = dataclasses.replace(options or PipelineOptions(), **overrides)
    ds, name, root = record_dataset(kind, data_dir, opts, dataset=dataset, split=split)
    names = mixture.dataset_parts(name)
    if len(names) == 1:
        fn = _ExampleFn(kind, name, tokenizer, opts, root)
    else:
        parts = [_ExampleFn(kind, n, tokenizer, opts, r) for n, r in zip(names, root, strict=True)]
        fn = mixture.PartExampleFn(parts)
    if opts.exo_view == "random" and "ego_exo_clip" in names:
        seed = int(np.random.SeedSequence([opts.seed, 1]).generate_state(1)[0])
        ds = ds.random_map(fn, seed=seed)
    else:
        ds = ds.map(fn)
    read = grain.ReadOptions(
        num_threads=opts.read_threads, prefetch_buffer_size=max(2 * opts.batch_size, 1)
    )
    it = ds.to_iter_dataset(read)
    drop = opts.drop_remainder if opts.drop_remainder is not None else kind != "eval"
    batching = _Batching(opts.batch_size, drop, kind == "eval", opts.max_consecutive_bad, name)
    it = _BatchDataset(it, batching)
    if opts.workers > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(
            grain.multiprocessing.MultiprocessingOptions(
                num_workers=opts.workers, per_worker_buffer_size=opts.worker_buffer_size
            )
        )
    return _CountSkips(it)


def _ensure_flags_parsed() -> None:
    """Grain's worker processes read absl flags; outside an absl app (tests, notebooks,
    scripts) nobody parses them, so take their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


# ----------------------------------------------------------------------------- evaluation


def bench_items(data_dir: str | os.PathLike, task: str) -> list[dict[str, Any]]:
    """Every item of an EgoBench task, in record order (``item_index`` of eval batches).

    Each item: ``task, item_id, subtype, question, options (list[str]), answer_indices
    (list[int]), answer, videos, starts, ends, relevancy (float32[S]), extra (dict)``; the
    EPIC-MIR sentences are ``bench_metadata(...)["epic_mir_sentences"]``.
    """
    source, _ = open_dataset("ego_bench", data_dir, task)
    items = []
    for i in range(len(source)):
        r = source[i]
        items.append(
            {
                "task": _str(r["task"]),
                "item_id": _str(r["item_id"]),
                "subtype": _str(r["subtype"]),
                "question": _str(r["question"]),
                "options": [_str(o) for o in r["options"]],
                "answer_indices": [int(a) for a in r["answer_indices"]],
                "answer": _str(r["answer"]),
                "videos": [_str(v) for v in r["videos"]],
                "starts": np.asarray(r["starts"]),
                "ends": np.asarray(r["ends"]),
                "relevancy": np.asarray(r["relevancy"], np.float32),
                "extra": json.loads(_str(r["extra"])),
            }
        )
    return items


def bench_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``ego_bench`` dataset metadata (``tasks``, ``epic_mir_sentences``, ...)."""
    _, meta = open_dataset("ego_bench", data_dir, "egoschema")
    return meta
