"""Tensor-by-tensor reading and atomic writing of Hugging Face safetensors checkpoints.

We parse the safetensors container ourselves (8-byte little-endian header length, a JSON
header, then raw little-endian tensor bytes) and hand out ``np.memmap`` views, so reading a
7B checkpoint never materialises more than the one tensor being converted, and bfloat16 /
float8 tensors work through ``ml_dtypes`` without PyTorch.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
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
_NAMES = {v: k for k, v in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is missing, malformed, or does not fit the model it is loaded into."""


def read_hf_config(path: str | os.PathLike) -> dict:
    """Reads ``config.json`` of a Hugging Face model directory."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path}: missing. A Hugging Face checkpoint directory needs config.json beside "
            "its *.safetensors files (save the model with save_pretrained)."
        )
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e


def _read_header(file: Path) -> tuple[dict, int]:
    """Returns (header dict, byte offset of the data section) of one safetensors file."""
    try:
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{file}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100_000_000:
                raise CheckpointError(f"{file}: implausible safetensors header size {n}")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors header ({e})") from e
    header.pop("__metadata__", None)
    size = file.stat().st_size
    for name, info in header.items():
        begin, end = info["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} extends past the end of the file (truncated download?)"
            )
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
    return header, 8 + n


class TensorIndex:
    """Lazy view of every tensor in a checkpoint directory (single file or sharded + index).

    ``index.get(name)`` returns a read-only ``np.memmap``-backed array; nothing is read from
    disk until that array is used, and each tensor is read independently.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint directory")
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: listed in {index_file} but missing")
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.path.glob("*.bin"))
                hint = (
                    f" (found {bins}: convert them to safetensors; pickled .bin files are not "
                    "loaded because unpickling untrusted files can run code)"
                    if bins
                    else ""
                )
                raise CheckpointError(f"{path}: no *.safetensors files{hint}")
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for f in files:
            header, data_start = _read_header(f)
            for name, info in header.items():
                self._entries[name] = (f, data_start, info)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._info(name)[2]["dtype"]]

    def _info(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} not found in the checkpoint"
            ) from None

    def get(self, name: str) -> np.ndarray:
        file, data_start, info = self._info(name)
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(info["shape"])
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{file}: tensor {name!r} byte size does not match its shape")
        if end == begin:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _write_one(file: Path, tensors: list[tuple[str, np.ndarray]], metadata: dict | None) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {arr.dtype}")
        nbytes = arr.size * arr.dtype.itemsize
        header[name] = {
            "dtype": _NAMES[arr.dtype],
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


def iter_tensors(index: TensorIndex) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` one at a time in checkpoint order."""
    for name in index.names():
        yield name, index.get(name)
