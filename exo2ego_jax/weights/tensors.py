"""The one reader of checkpoint tensors: :class:`TensorSource`.

Every loader (HF CLIP, HF Mistral, the VideoLLaMA2 projector) and the streaming converter
read through it. A source lists tensor names with shapes and dtypes from the headers
alone, then reads one tensor, or a run of its leading-axis rows, at a time:

* a ``.safetensors`` file, or a directory of them (one file, or shards listed in
  ``model.safetensors.index.json``): headers checked by
  :func:`~exo2ego_jax.weights.safetensors_format.read_header`, tensors read straight from
  disk (nothing is unpickled);
* any other file: a PyTorch state dict (``mm_projector.bin``), loaded whole with
  ``torch.load(weights_only=True)``, which refuses pickled code; torch is imported only
  then;
* an in-memory state dict (:meth:`TensorSource.from_state_dict`).

Directories are read as safetensors only: a directory of ``pytorch_model*.bin`` is refused
with a hint, since those are whole-model pickles.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.safetensors_format import (
    INDEX_FILE,
    TensorEntry,
    read_header,
    read_index,
)

#: Suffixes named as files in "no such file" errors (anything else is a directory).
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TensorSource:
    """Tensors of one checkpoint, listed from headers and read one at a time.

    Args:
      path: a directory of ``*.safetensors`` (single or sharded), a ``.safetensors`` file,
        or a PyTorch state-dict file (``.bin`` / ``.pt`` / ``.pth``; needs torch).

    Raises:
      CheckpointError: the path is missing, a header or the index is malformed, a tensor
        is listed twice, or a PyTorch file is not a plain state dict of tensors.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.where = str(path)
        if path.is_dir():
            self._entries: dict[str, TensorEntry | Any] = _directory_entries(path)
        elif path.is_file() and path.suffix == ".safetensors":
            self._entries = dict(read_header(path)[0])
        elif path.is_file():
            self._entries = _torch_state_dict(path)
        elif path.suffix in _FILE_SUFFIXES:
            raise CheckpointError(f"{path}: no such file")
        else:
            raise CheckpointError(f"{path}: no such checkpoint directory")

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], where: str = "state dict") -> TensorSource:
        """A source over an in-memory ``{name: torch.Tensor | np.ndarray}``."""
        source = cls.__new__(cls)
        source.where = where
        source._entries = _checked_state_dict(state, where)
        return source

    def names(self) -> list[str]:
        """Tensor names in checkpoint order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> TensorEntry | Any:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"{self.where}: tensor {name!r} not found in the checkpoint"
            ) from None

    def describe(self, name: str) -> str:
        """``"<file>: tensor '<name>'"``, the start of every error about one tensor."""
        entry = self._entry(name)
        return f"{entry.file if isinstance(entry, TensorEntry) else self.where}: tensor {name!r}"

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name).shape)

    def dtype(self, name: str) -> np.dtype:
        entry = self._entry(name)
        return entry.dtype if isinstance(entry, TensorEntry) else _memory_dtype(entry)

    def get(self, name: str) -> np.ndarray:
        """``float[*shape]`` (the file's dtype), lazily: a read-only memory map of a file.

        Nothing is read until the array is used; a PyTorch tensor is converted to numpy.
        """
        entry = self._entry(name)
        if not isinstance(entry, TensorEntry):
            return _to_numpy(entry)
        if entry.nbytes == 0:
            return np.zeros(entry.shape, entry.dtype)
        return np.memmap(
            entry.file, dtype=entry.dtype, mode="r", offset=entry.offset, shape=entry.shape
        )

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of the leading axis (the whole tensor by default), read now.

        ``float[stop - start, *shape[1:]]`` in the file's dtype; only those bytes are read,
        with a plain read rather than a memory map, so file pages never count as this
        process's memory. A 0-d tensor is returned whole.
        """
        entry = self._entry(name)
        shape = tuple(entry.shape)
        if not shape:
            start, stop = 0, None
        n = shape[0] if shape else 1
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"{self.describe(name)}: rows {start}:{stop} outside 0:{n}")
        if not isinstance(entry, TensorEntry):
            return _to_numpy(entry if not shape else entry[start:stop])
        row = math.prod(shape[1:])
        count = (stop - start) * row
        if count == 0:
            return np.zeros((stop - start, *shape[1:]) if shape else (), entry.dtype)
        offset = entry.offset + start * row * entry.dtype.itemsize
        a = np.fromfile(entry.file, dtype=entry.dtype, count=count, offset=offset)
        if a.size != count:
            raise CheckpointError(f"{self.describe(name)} is truncated (file changed?)")
        return a.reshape((stop - start, *shape[1:]) if shape else ())


def _directory_entries(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of a directory: shards from the index, else every ``*.safetensors``."""
    index_file = path / INDEX_FILE
    weight_map = read_index(path) if index_file.is_file() else None
    if weight_map is not None:
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index_file} but missing")
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = (
                f" (found {bins}: convert them to safetensors; pickled .bin files are not "
                "loaded because unpickling untrusted files can run code)"
                if bins
                else ""
            )
            raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for name, entry in read_header(f)[0].items():
            if name in entries:
                raise CheckpointError(
                    f"{path}: tensor {name!r} is in both {entries[name].file.name} and {f.name}"
                )
            entries[name] = entry
    for name, shard in (weight_map or {}).items():
        if name not in entries or entries[name].file.name != shard:
            raise CheckpointError(
                f"{index_file}: weight_map puts tensor {name!r} in {shard}, which does not hold it"
            )
    return entries


# ----------------------------------------------------------------------------- PyTorch


def _torch_reason(e: Exception) -> str:
    """The informative line of a ``torch.load`` error (not its advice to drop weights_only)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower() or "blocked" in line:
            return line
    return lines[0] if lines else type(e).__name__


def _torch_state_dict(file: Path) -> dict[str, Any]:
    try:
        import torch  # optional dependency: only PyTorch state-dict files need it
    except ImportError as e:
        raise CheckpointError(
            f"{file}: reading a PyTorch .bin checkpoint needs torch; `pip install torch` (CPU "
            "build is enough) or convert the file to safetensors first"
        ) from e
    try:
        # weights_only: tensors and plain containers only; pickled code is refused, not run.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for bad files
        raise CheckpointError(
            f"{file}: cannot read as a PyTorch state dict with torch.load(weights_only=True) "
            f"({_torch_reason(e)}); only plain state dicts of tensors are loaded"
        ) from None
    return _checked_state_dict(state, str(file))


def _is_torch_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "is_floating_point")


def _checked_state_dict(state: Any, where: str) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"{where}: expected a state dict of tensors, got {type(state).__name__}"
        )
    out = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: state dict key {name!r} is not a string")
        if isinstance(value, np.ndarray) or _is_torch_tensor(value):
            _memory_dtype(value, f"{where}: tensor {name!r}")  # refuse unknown dtypes now
            out[name] = value
        else:
            raise CheckpointError(
                f"{where}: tensor {name!r} is of type {type(value).__name__}; expected a "
                "state dict of tensors"
            )
    return out


def _torch_dtypes() -> dict[Any, np.dtype]:
    import torch  # only reached for torch tensors, so torch is already imported

    return {
        torch.float64: np.dtype(np.float64),
        torch.float32: np.dtype(np.float32),
        torch.float16: np.dtype(np.float16),
        torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
        torch.int64: np.dtype(np.int64),
        torch.int32: np.dtype(np.int32),
        torch.int16: np.dtype(np.int16),
        torch.int8: np.dtype(np.int8),
        torch.uint8: np.dtype(np.uint8),
        torch.bool: np.dtype(np.bool_),
    }


def _memory_dtype(value: Any, where: str = "tensor") -> np.dtype:
    if isinstance(value, np.ndarray):
        return value.dtype
    dtype = _torch_dtypes().get(value.dtype)
    if dtype is None or str(value.layout) != "torch.strided":
        raise CheckpointError(
            f"{where}: unsupported PyTorch tensor ({value.dtype}, {value.layout}); "
            "expected a dense float, int or bool tensor"
        )
    return dtype


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array of the same dtype; bfloat16 through its bits, as numpy lacks it."""
    if isinstance(value, np.ndarray):
        return value
    dtype = _memory_dtype(value)
    t = value.detach().cpu()
    if dtype == np.dtype(ml_dtypes.bfloat16):
        import torch  # only reached for torch tensors, so torch is already imported

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
