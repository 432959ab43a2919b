"""Shared pieces of the dataset builders: field access, file reading, the TFDS base builder
and atomic builds. The error type and the path rule every builder uses are
:mod:`input_pipeline.annotations`.

Every builder reads annotation files of a *data root* (the demo world, or a real download
laid out the same way) and writes an ArrayRecord TFDS dataset that stores **relative video
paths and time windows**, never decoded frames (see docs/data.md, "Prepared datasets").
TFDS 4.9 builds ArrayRecord datasets without TensorFlow, and ``tfds.data_source`` /
``tfds.builder_from_directory`` read them back without it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline.annotations import AnnotationError

__all__ = [
    "WorldBuilder",
    "build_dataset",
    "field",
    "opt_time",
    "read_csv",
    "read_json",
    "time_feature",
    "times_feature",
]

log = logging.getLogger(__name__)

VERSION = "1.0.0"


# ----------------------------------------------------------------------------- fields


def field(
    record: Any,
    name: str,
    *,
    file: str,
    where: str,
    types: type | tuple[type, ...] | None = None,
    default: Any = ...,
) -> Any:
    """``record[name]``, or an :class:`AnnotationError` naming ``file``, ``where`` and ``name``.

    ``default`` (if given) is returned for a missing field; ``types`` checks the value's type
    (``bool`` never counts as a number).
    """
    if not isinstance(record, Mapping):
        raise AnnotationError(
            f"{file}: {where} must be a JSON object / CSV row, got {type(record).__name__}"
        )
    if name not in record or record[name] is None:
        if default is not ...:
            return default
        have = ", ".join(sorted(map(str, record)))[:200]
        raise AnnotationError(f"{file}: {where} has no field {name!r} (it has: {have})")
    value = record[name]
    if types is not None:
        ok = isinstance(value, types) and not (
            isinstance(value, bool) and bool not in _as_tuple(types)
        )
        if not ok:
            want = " or ".join(t.__name__ for t in _as_tuple(types))
            raise AnnotationError(
                f"{file}: {where} field {name!r} must be {want}, got "
                f"{type(value).__name__} {value!r:.80}"
            )
    return value


def _as_tuple(types) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def number(record: Any, name: str, *, file: str, where: str, default: Any = ...) -> float:
    """A numeric field (JSON number or numeric CSV string) as float."""
    missing = object()
    value = field(record, name, file=file, where=where, default=missing)
    if value is missing:
        if default is ...:
            field(record, name, file=file, where=where)  # raises, naming the field
        return default
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise AnnotationError(
            f"{file}: {where} field {name!r} must be a number, got {value!r:.80}"
        ) from None


def opt_time(record: Any, name: str, *, file: str, where: str) -> float:
    """An optional time in seconds; NaN when absent (= the start / end of the video)."""
    value = number(record, name, file=file, where=where, default=None)
    return math.nan if value is None else value


# ----------------------------------------------------------------------------- files


def read_json(root: Path, rel: str) -> Any:
    path = root / rel
    if not path.is_file():
        raise AnnotationError(f"{rel}: annotation file not found under the data root {root}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{rel}: not valid JSON ({e})") from e


def read_csv(root: Path, rel: str, *, delimiter: str = ",", required: Iterable[str] = ()) -> list:
    """Rows of a CSV/TSV file with a header, as dicts; checks the ``required`` columns."""
    path = root / rel
    if not path.is_file():
        raise AnnotationError(f"{rel}: annotation file not found under the data root {root}")
    reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter=delimiter)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise AnnotationError(f"{rel}: missing column(s) {missing} (header: {reader.fieldnames})")
    return list(reader)


# ----------------------------------------------------------------------------- features


def time_feature() -> tfds.features.Tensor:
    """A float64 time in seconds, stored as raw bytes (tf.train.Example floats are float32,
    which would move window edges by up to a frame)."""
    return tfds.features.Tensor(shape=(), dtype=np.float64, encoding=tfds.features.Encoding.BYTES)


def times_feature() -> tfds.features.Tensor:
    return tfds.features.Tensor(
        shape=(None,), dtype=np.float64, encoding=tfds.features.Encoding.BYTES
    )


# ----------------------------------------------------------------------------- builder


class WorldBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders: reads annotations from ``dl_manager.manual_dir`` (the data root).

    Subclasses define ``_features()`` and ``_parse(root) -> {split: [(key, example)]}``.
    Parsing happens before anything is written, so a malformed annotation fails fast.
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the data root (the demo world from `python -m input_pipeline.synthetic`, "
        "or a real download in the same layout) as manual_dir; see docs/data.md."
    )
    DESCRIPTION = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        # TFDS locates a checksums file next to the builder's code; these builders download
        # nothing. (Computing the path also needs the `importlib_resources` backport.)
        return None

    # TFDS prints the (temporary) build directory to stdout; build_dataset reports the
    # final one instead.
    def _log_download_bytes(self) -> None:
        log.info("building %s", self.name)

    def _log_download_done(self) -> None:
        pass

    def _features(self) -> dict:
        raise NotImplementedError

    def _parse(self, root: Path) -> dict[str, list[tuple[str, dict]]]:
        raise NotImplementedError

    def _extra_metadata(self, root: Path) -> dict:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/exo2ego-jax (docs/data.md)",
        )

    def _split_generators(self, dl_manager):
        root = Path(os.fspath(dl_manager.manual_dir)).absolute()
        splits = self._parse(root)
        self.info.metadata.update(
            source_root=os.fspath(root),
            missing_videos=_count_missing(root, splits),
            **self._extra_metadata(root),
        )
        return {name: self._generate_examples(records) for name, records in splits.items()}

    def _generate_examples(self, records: list[tuple[str, dict]]) -> Iterator[tuple[str, dict]]:
        yield from records


def _count_missing(root: Path, splits: Mapping[str, list[tuple[str, dict]]]) -> int:
    """Warn about records whose video files are absent (the pipeline's ``on_bad_video``
    decides whether they are skipped or fatal; a partial download is legitimate)."""
    paths = set()
    for records in splits.values():
        for _, ex in records:
            for key in ("video", "ego_video"):
                if key in ex:
                    paths.add(ex[key])
            for key in ("exo_videos", "videos"):
                paths.update(ex.get(key, ()))
    missing = sorted(p for p in paths if not (root / p).is_file())
    if missing:
        log.warning(
            "%d of %d video files referenced by the annotations are missing under %s "
            "(e.g. %s); their records are kept and the pipeline's on_bad_video decides",
            len(missing),
            len(paths),
            root,
            missing[:3],
        )
    return len(missing)


# ----------------------------------------------------------------------------- atomic build


def build_dataset(
    builder_cls: type[WorldBuilder],
    world: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> Path:
    """Build one dataset of ``world`` into ``data_dir`` atomically; return its directory.

    TFDS writes into ``<data_dir>/.tmp-build-<hex>/`` and only a complete build is renamed
    to ``<data_dir>/<name>/<config>/<version>``; an existing dataset is replaced in one
    rename (``overwrite``), else kept (``exist_ok``) or refused (FileExistsError). An
    interrupted build leaves no directory that TFDS would take for a dataset.
    """
    world = Path(world)
    data_dir = Path(data_dir)
    if not world.is_dir():
        raise FileNotFoundError(f"data root {world} is not a directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"config": config} if config is not None else {}
    target = Path(os.fspath(builder_cls(data_dir=data_dir, **kwargs).data_dir))
    if target.exists() and not overwrite:
        if exist_ok:
            log.info("keeping the existing %s", target)
            return target
        raise FileExistsError(
            f"{target} already exists; pass overwrite=True (--overwrite) to rebuild it"
        )
    tmp = data_dir / f".tmp-build-{builder_cls.name}-{secrets.token_hex(4)}"
    try:
        builder = builder_cls(data_dir=tmp, file_format="array_record", **kwargs)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(world))
        )
        built = Path(os.fspath(builder.data_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        _swap_into_place(built, target)
        log.info("built %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _swap_into_place(new: Path, target: Path) -> None:
    if target.exists():
        old = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)
