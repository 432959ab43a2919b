"""Shared pieces of the dataset builders: field access, file reading, the TFDS base builder
and atomic builds. The error type and the path rule every builder uses are
:mod:`input_pipeline.annotations`; the skip tally is :mod:`.report`, the options
:mod:`.options`.

Every builder reads annotation files of a *data root* (the demo world, or a real download
laid out the same way) and writes an ArrayRecord TFDS dataset that stores **relative video
paths and time windows**, never decoded frames (see docs/data.md, "Prepared datasets").
TFDS 4.9 builds ArrayRecord datasets without TensorFlow, and ``tfds.data_source`` /
``tfds.builder_from_directory`` read them back without it.
"""

from __future__ import annotations

import csv
import dataclasses
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

from input_pipeline import atomic
from input_pipeline.annotations import AnnotationError
from input_pipeline.datasets.options import BuildOptions
from input_pipeline.datasets.report import BuildReport, summary_lines
from input_pipeline.datasets.tfds_spill import tf_free_spill

__all__ = [
    "WorldBuilder",
    "build_dataset",
    "csv_header",
    "field",
    "flag",
    "iter_csv_rows",
    "opt_time",
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


_TRUE = {"true": True, "1": True, "false": False, "0": False}


def flag(record: Any, name: str, *, file: str, where: str, default: Any = ...) -> bool:
    """A yes/no field: JSON true/false, 1/0, or the strings ``"true"``/``"false"``/``"1"``/
    ``"0"`` (Ego-Exo4D writes ``ego_visible: "0"``, and ``is_ego`` as text in places)."""
    value = field(record, name, file=file, where=where, default=default)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return _TRUE[value.strip().lower()]
    raise AnnotationError(
        f"{file}: {where} field {name!r} must be true or false (or 1 / 0), got {value!r:.80}"
    )


def opt_time(record: Any, name: str, *, file: str, where: str) -> float:
    """An optional time in seconds; NaN when absent (= the start / end of the video)."""
    value = number(record, name, file=file, where=where, default=None)
    return math.nan if value is None else value


# ----------------------------------------------------------------------------- files


def _annotation_file(root: Path, rel: str) -> Path:
    """``root / rel``, or an :class:`AnnotationError` when it is missing or empty."""
    path = root / rel
    if not path.is_file():
        raise AnnotationError(f"{rel}: annotation file not found under the data root {root}")
    if path.stat().st_size == 0:
        raise AnnotationError(f"{rel}: the file is empty (0 bytes); nothing to build from it")
    return path


def read_json(root: Path, rel: str) -> Any:
    """The parsed JSON file ``rel`` of the data root (missing, empty or invalid: an error)."""
    path = _annotation_file(root, rel)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{rel}: not valid JSON ({e})") from e


def csv_header(root: Path, rel: str, *, delimiter: str, required: Iterable[str]) -> list[str]:
    """The header of a CSV/TSV file, checked to hold the ``required`` columns."""
    with _annotation_file(root, rel).open(encoding="utf-8", errors="replace", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), [])
    missing = [c for c in required if c not in header]
    if missing:
        sep = "tab" if delimiter == "\t" else repr(delimiter)
        raise AnnotationError(
            f"{rel}: missing column(s) {missing} in the header {header[:12]} (a {sep}-separated "
            "file whose first line names the columns)"
        )
    return header


def iter_csv_rows(
    root: Path, rel: str, *, delimiter: str, report: BuildReport
) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line, row)`` of every well-formed data row of a CSV/TSV file, **streamed**.

    Rows are dicts keyed by the header (:func:`csv_header` checks it first). A row that is
    not valid UTF-8, cannot be parsed (e.g. a quote left open) or has the wrong number of
    fields is counted in ``report`` (read and skipped) and left out, as EgoVLP's
    ``pd.read_csv(..., error_bad_lines=False)`` leaves it out; blank lines are not rows.
    """
    with (root / rel).open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                report.add_read()
                report.skip("unparseable row", f"{rel}: line {reader.line_num}: {e}")
                continue
            if not row:
                continue
            report.add_read()
            where = f"{rel}: line {reader.line_num}"
            if len(row) != len(header):
                report.skip(
                    "wrong number of fields",
                    f"{where}: {len(row)} fields, the header has {len(header)}",
                )
                continue
            try:
                delimiter.join(row).encode("utf-8")
            except UnicodeEncodeError:
                report.skip("not valid UTF-8", f"{where}: bytes that are not UTF-8")
                continue
            yield reader.line_num, dict(zip(header, row, strict=True))


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

    Subclasses define ``_features()`` and ``_parse(root) -> {split: records}``, where
    ``records`` iterates ``(key, example)`` (a generator, so a big file is streamed) and
    counts what it reads, skips and filters in ``self.new_report(split, file)``. File-level
    problems (a missing, empty or unreadable file) raise in ``_parse``, before anything is
    written. Per record, this base class then skips repeated keys and (with
    ``options.missing_videos == "skip"``) records whose video file is absent, and at the
    end of each split refuses to finish when nothing was kept or more than
    ``options.max_bad_fraction`` was skipped (:meth:`BuildReport.check`); the build
    directory is then discarded. The reports go to ``metadata.json`` (``build_report``).
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the data root (the demo world from `python -m input_pipeline.synthetic`, "
        "or a real download in the same layout) as manual_dir; see docs/data.md."
    )
    DESCRIPTION = ""
    #: Whether ``options.missing_videos`` applies (EgoBench keeps every item).
    CHECKS_VIDEOS = True

    def __init__(self, *, options: BuildOptions | None = None, **kwargs):
        self.options = options or BuildOptions()
        self._reports: dict[str, BuildReport] = {}
        self._video_exists: dict[str, bool] = {}
        super().__init__(**kwargs)

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

    def _parse(self, root: Path) -> dict[str, Iterable[tuple[str, dict]]]:
        raise NotImplementedError

    def _extra_metadata(self, root: Path) -> dict:
        return {}

    def new_report(self, split: str, file: str) -> BuildReport:
        """The report of ``split`` (read from ``file``), which ``_parse``'s records fill."""
        config = self.builder_config
        name = self.name if config is None else f"{self.name}/{config.name}"
        self._reports[split] = BuildReport(name, split, file)
        return self._reports[split]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/exo2ego-jax (docs/data.md)",
        )

    def _split_generators(self, dl_manager):
        self._root = Path(os.fspath(dl_manager.manual_dir)).absolute()
        splits = self._parse(self._root)
        self.info.metadata.update(
            source_root=os.fspath(self._root),
            build_options=dataclasses.asdict(self.options),
            missing_videos=0,
            build_report={},
            **self._extra_metadata(self._root),
        )
        return {
            name: self._generate_examples((self._reports[name], records))
            for name, records in splits.items()
        }

    def _generate_examples(
        self, split: tuple[BuildReport, Iterable[tuple[str, dict]]]
    ) -> Iterator[tuple[str, dict]]:
        """The records of one split, less repeated keys and missing videos; then the
        verdict on the split (:meth:`BuildReport.check`)."""
        report, records = split
        seen = _KeySet()
        for key, example in records:
            if not seen.add(key):
                report.skip("repeated id", f"{report.file}: id {key!r} appears again")
                continue
            missing = self._missing_videos(example)
            if missing and self.CHECKS_VIDEOS and self.options.missing_videos == "skip":
                report.skip(
                    "video file missing",
                    f"{report.file}: record {key!r}: {missing[0]} not found under the data root",
                )
                continue
            report.keep()
            yield key, example
        report.check(self.options.max_bad_fraction)
        self._finish(report)

    def _missing_videos(self, example: Mapping[str, Any]) -> list[str]:
        """The video files ``example`` names that are absent (each file checked once)."""
        paths = [example[k] for k in ("video", "ego_video") if k in example]
        for k in ("exo_videos", "videos"):
            paths.extend(example.get(k, ()))
        missing = []
        for rel in paths:
            if rel not in self._video_exists:
                self._video_exists[rel] = (self._root / rel).is_file()
            if not self._video_exists[rel]:
                missing.append(rel)
        return missing

    def _finish(self, report: BuildReport) -> None:
        """Store and log the verdict of a finished split."""
        stored = report.to_json()
        self.info.metadata["build_report"] = {
            **self.info.metadata["build_report"],
            report.split: stored,
        }
        missing = sorted(p for p, ok in self._video_exists.items() if not ok)
        self.info.metadata["missing_videos"] = len(missing)
        if missing and (not self.CHECKS_VIDEOS or self.options.missing_videos == "keep"):
            log.warning(
                "%d of %d video files named by %s are missing under %s (e.g. %s); their "
                "records are kept and the pipeline's on_bad_video decides",
                len(missing),
                len(self._video_exists),
                self.name,
                self._root,
                missing[:3],
            )
        for line in summary_lines(stored):
            log.info("%s", line)


class _KeySet:
    """The keys of a split seen so far: canonical non-negative integers below 10**8 (EgoClip's
    ``clip_idx``) as bits (4 M keys in 0.5 MB), any other key in a set."""

    def __init__(self):
        self._bits = bytearray()
        self._other: set[str] = set()

    def add(self, key: str) -> bool:
        """Add ``key``; False when it was already there."""
        if key.isascii() and key.isdigit() and len(key) <= 8 and (key == "0" or key[0] != "0"):
            k = int(key)
            byte, bit = k >> 3, 1 << (k & 7)
            if byte >= len(self._bits):
                self._bits.extend(bytes(byte + 1 - len(self._bits)))
            if self._bits[byte] & bit:
                return False
            self._bits[byte] |= bit
            return True
        if key in self._other:
            return False
        self._other.add(key)
        return True


# ----------------------------------------------------------------------------- atomic build


def build_dataset(
    builder_cls: type[WorldBuilder],
    world: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    config: str | tfds.core.BuilderConfig | None = None,
    options: BuildOptions | None = None,
    overwrite: bool = False,
    exist_ok: bool = False,
) -> Path:
    """Build one dataset of ``world`` into ``data_dir`` atomically; return its directory.

    ``options`` (:class:`BuildOptions`) say how the annotation files are read; what was
    kept and skipped is in the dataset's ``metadata.json`` (``build_report``).

    TFDS writes into ``<data_dir>/.tmp-build-<hex>/`` (spilling records past
    :data:`~.tfds_spill.SPILL_ABOVE` bytes to bucket files there, :mod:`.tfds_spill`) and
    only a complete build is renamed
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
        builder = builder_cls(data_dir=tmp, file_format="array_record", options=options, **kwargs)
        with tf_free_spill():  # big splits spill to disk, without TensorFlow
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(world))
            )
        built = Path(os.fspath(builder.data_dir))
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.swap_dir_into_place(built, target)
        log.info("built %s", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
