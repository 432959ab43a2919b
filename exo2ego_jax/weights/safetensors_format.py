"""The safetensors container: header parsing with every check, the sharded index, the writer.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
header, then the raw little-endian tensor bytes. The header maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
section) plus an optional ``"__metadata__"`` map of strings. We parse it ourselves so a
7B checkpoint is read one tensor at a time and bfloat16 / float8 work through
``ml_dtypes`` without PyTorch.

:func:`read_header` refuses everything the reference ``safetensors`` library refuses
(header longer than the file or than 100 MB, not UTF-8 JSON, negative or overlapping
offsets, gaps, byte sizes that do not match the shape, data not covering the file
exactly) and a few things it lets through (duplicate names, unsupported dtypes), so no
malformed file reaches ``np.memmap``. Every refusal is a :class:`CheckpointError` naming
the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from exo2ego_jax.weights.errors import CheckpointError
from input_pipeline import atomic

#: safetensors dtype tag -> numpy dtype (the tags we can read and write).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_TAGS = {v: k for k, v in DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Largest header the reference reader accepts (``MAX_HEADER_SIZE`` in safetensors/tensor.rs).
MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``file`` at absolute byte ``offset``, ``nbytes`` long."""

    file: Path
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(file: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise CheckpointError(f"{file}: safetensors header names {k!r} twice")
            out[k] = v
        return out

    return hook


def _load_json(file: Path, raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(file))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: {what} is not valid UTF-8 JSON ({e})") from None


def _entry(file: Path, name: str, info: Any) -> tuple[str, np.dtype, tuple[int, ...], int, int]:
    """Checks one header entry on its own; returns ``(tag, dtype, shape, begin, end)``."""
    where = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: header entry is {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {missing}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str) or tag not in DTYPES:
        raise CheckpointError(
            f"{where}: unknown or unsupported dtype {tag!r} (supported: {', '.join(DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two integers")
    begin, end = offsets
    if begin < 0 or end < 0:
        raise CheckpointError(f"{where}: negative data offset in {offsets}")
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets {offsets} end before they begin")
    dtype = DTYPES[tag]
    need = math.prod(shape) * dtype.itemsize
    if end - begin != need:
        raise CheckpointError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes but shape {shape} of "
            f"{tag} needs {need} (byte size does not match the shape)"
        )
    return tag, dtype, tuple(shape), begin, end


def read_header(file: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """``({name: TensorEntry}, __metadata__)`` of one safetensors file, fully checked.

    Only the header is read. The data section must be covered exactly: tensors sorted by
    offset start at 0, follow each other without gap or overlap, and the last one ends
    at the end of the file (zero-size tensors may sit at any boundary).
    """
    try:
        return _read_header(Path(file))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; re-download the file or re-save it with safetensors") from None


def _read_header(file: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > size - 8:
                raise CheckpointError(
                    f"{file}: header length {n} is larger than the file ({size} bytes): "
                    "not a safetensors file, or truncated"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{file}: header length {n} exceeds the safetensors limit of "
                    f"{MAX_HEADER_BYTES} bytes"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e
    header = _load_json(file, raw, "safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file}: safetensors header is a JSON {type(header).__name__}, not an object"
        )
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: __metadata__ {metadata!r} is not a map of strings")

    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        tag, dtype, shape, begin, end = _entry(file, name, info)
        if end > data_len:
            raise CheckpointError(
                f"{file}: tensor {name!r} (data_offsets [{begin}, {end}]) extends past the "
                f"end of the file, whose data section has {data_len} bytes (truncated download?)"
            )
        entries[name] = TensorEntry(file, data_start + begin, dtype, shape)
        spans.append((begin, end, name))
    covered, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < covered:
            raise CheckpointError(
                f"{file}: tensor {name!r} (data_offsets [{begin}, {end}]) overlaps tensor "
                f"{last!r}, which ends at {covered}"
            )
        if begin > covered:
            after = f"after tensor {last!r}" if last is not None else "at the start of the data"
            raise CheckpointError(
                f"{file}: gap of {begin - covered} bytes {after} (tensor {name!r} begins at "
                f"{begin}): offsets do not cover the data section"
            )
        covered, last = end, name
    if covered != data_len:
        raise CheckpointError(
            f"{file}: {data_len - covered} bytes after the last tensor are not covered by any "
            f"tensor (data section {data_len} bytes, tensors end at {covered})"
        )
    return entries, metadata


def read_index(directory: str | os.PathLike) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of ``model.safetensors.index.json``."""
    directory = Path(directory)
    index_file = directory / INDEX_FILE
    try:
        raw = index_file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{index_file}: cannot read ({e})") from e
    index = _load_json(index_file, raw, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_file}: needs a 'weight_map' object of tensor name -> shard file name"
        )
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise CheckpointError(
                f"{index_file}: weight_map names {shard!r}, which is not a file inside {directory}"
            )
    return weight_map


def _write_one(file: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict | None) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in _TAGS:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": _TAGS[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section like the reference writer
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, arr in tensors:
            f.write(
                np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            )


def write_safetensors_file(
    file: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Writes ``(name, array)`` pairs as one ``.safetensors`` file, atomically.

    Every tensor is held until the header is written (use :func:`write_safetensors` to
    stream a large model into shards). The file is written beside ``file`` under a
    temporary name and renamed over it, so ``file`` is never half-written. ``metadata`` is
    the header's ``__metadata__`` (strings only; default ``{"format": "pt"}``).
    """
    file = Path(file)
    items = [(name, np.asarray(arr)) for name, arr in tensors]
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise CheckpointError(f"{file}: a tensor name is given twice")
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged_file(file) as tmp:
        _write_one(tmp, items, metadata)
    return file


def write_safetensors(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 5 * 2**30,
    config: dict | None = None,
) -> Path:
    """Writes ``(name, array)`` pairs as an HF checkpoint directory, atomically.

    Tensors are streamed into shards of at most ``max_shard_bytes`` (one tensor of the
    shard in memory at a time when the iterable is lazy); with more than one shard an index
    file is written, as ``save_pretrained`` does. Files are written into a temporary
    directory beside ``out_dir`` and moved into place only when complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    shards: list[list[str]] = []
    total = 0
    current: list[tuple[str, np.ndarray]] = []
    current_bytes = 0

    def flush():
        nonlocal current, current_bytes
        if current:
            _write_one(tmp / f"shard-{len(shards):05d}.safetensors", current, None)
            shards.append([n for n, _ in current])
            current, current_bytes = [], 0

    for name, arr in tensors:
        arr = np.asarray(arr)
        nbytes = arr.size * arr.dtype.itemsize
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current.append((name, arr))
        current_bytes += nbytes
        total += nbytes
    flush()

    if len(shards) == 1:
        os.replace(tmp / "shard-00000.safetensors", tmp / SINGLE_FILE)
    else:
        weight_map = {}
        for i, names in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / final)
            weight_map.update({n: final for n in names})
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        # Keep whatever else the directory holds (tokenizer files...) but replace weights.
        for old in list(out_dir.glob("*.safetensors")) + [out_dir / INDEX_FILE]:
            old.unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out_dir / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, out_dir)
    return out_dir
