r"""Streaming conversion of pretrained weights into one Orbax params checkpoint.

    python -m exo2ego_jax.tools.convert --clip=DIR --llm=DIR [--projector=FILE] \
        --out=DIR [--dtype=float32|bfloat16] [--block_mib=32] [--compress] [--overwrite]

reads a Hugging Face CLIP vision tower (``CLIPVisionModel`` / ``CLIPModel`` directory), a
Hugging Face ``MistralForCausalLM`` directory and optionally a VideoLLaMA2 ``mm_projector``
(file or directory) and writes their tensors under the Exo2Ego param paths:

=================================  ==========================================
``ego_encoder/clip/...``           the CLIP tower (``--clip``)
``exo_encoder/clip/...``           the same tower again (own copy: E_exo trains separately)
``exo_encoder/connector/...``      the STC connector (``--projector``)
``llm/...``                        Mistral base weights (no LoRA adapters)
=================================  ==========================================

``exo2ego_jax.weights.converted.restore_converted`` (or ``config.init.converted``) reads
it straight into sharded device arrays on any mesh.

Memory: the checkpoint is written **block by block**, never a whole model nor a whole
layer-stacked parameter on the host. Each Orbax leaf is a lazy :class:`Leaf` written by
:class:`_StreamingHandler`, a custom Orbax type handler: it opens the leaf's TensorStore
array (the spec Orbax would use for a numpy leaf, so the result is a standard Orbax
checkpoint) and fills it one block at a time, one leaf after another. A block is a run of
whole rows of one source tensor (HF ``[out, in]`` rows, i.e. columns of our ``[in, out]``
kernel; the output channels of a conv kernel), read with ``np.fromfile`` (no memory map,
so file pages never count as process memory), transposed / cast, and written as whole zarr
chunks (the chunk shape *is* the block shape, so TensorStore never buffers a partly
written chunk). Chunks are uncompressed unless ``--compress`` (zstd makes TensorStore hold
several compressed copies of a block). Peak host memory above the import baseline is about
2-3 blocks (``--block_mib``, default 32 MiB): measured +78 MiB for a 2.8 GiB model whose
largest tensor is 640 MiB (``tests/test_convert.py``, ``docs/checkpoints.md``). CLIP
attention tensors, whose layout change includes a reshape (≤ 4 MiB at ViT-L), are converted
whole. A PyTorch ``mm_projector.bin`` is loaded whole by ``torch.load(weights_only=True)``;
convert it to safetensors to stream it too.

Sources, checks and layouts are the loaders' own: each ``open_checkpoint`` (``hf_clip``,
``hf_mistral``, ``mm_projector``) reads through one
:class:`~exo2ego_jax.weights.tensors.TensorSource` and returns the
:class:`~exo2ego_jax.weights.param_map.ParamMapping` table this module turns into leaves.

Atomicity: Orbax writes into a hidden ``.<out>.tmp-*`` directory beside ``--out`` that is
renamed to ``--out`` only when every tensor and the metadata are written; an interrupted
run leaves at most that hidden directory, never a checkpoint at ``--out``.

Every tensor is checked (present, shape, float dtype) before anything is written; errors
name the file and the tensor.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import traverse_util
from orbax.checkpoint import future as ocp_future
from tqdm.auto import tqdm

from exo2ego_jax.weights import hf_clip, hf_mistral, mm_projector
from exo2ego_jax.weights.converted import FORMAT, FORMAT_VERSION
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.param_map import MappedCheckpoint, ParamMapping
from exo2ego_jax.weights.tensors import TensorSource

CLIP_SUBTREES = ("ego_encoder/clip", "exo_encoder/clip")
LLM_SUBTREE = "llm"
PROJECTOR_SUBTREE = "exo_encoder/connector"
#: Bytes written at once (and zarr chunk size) in MiB.
DEFAULT_BLOCK_MIB = 32

# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class Piece:
    """One source tensor -> one layer slice (``layer``) or the whole of an output leaf.

    ``mapping.streamable``: our layout is ``tensor.transpose(mapping.perm)`` and is produced
    from runs of the tensor's leading-axis rows; otherwise (a reshape too, e.g. CLIP
    attention kernels) from the whole tensor by ``mapping.to_ours``.
    """

    source: TensorSource
    name: str
    layer: int | None
    mapping: ParamMapping


@dataclasses.dataclass(eq=False)
class Leaf:
    """A lazy output array: ``shape`` / ``dtype`` of the param, filled from ``pieces``.

    ``chunks`` is the zarr chunk shape and also the block shape written at once: one layer,
    and along the streamed axis as many rows as fit in ``block_bytes``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: list[Piece]
    block_bytes: int = DEFAULT_BLOCK_MIB * 2**20
    chunks: tuple[int, ...] = ()

    def __post_init__(self):
        stacked = self.pieces[0].layer is not None
        per = list(self.shape[1:] if stacked else self.shape)
        mapping = self.pieces[0].mapping
        if mapping.streamable and per:
            axis = mapping.perm.index(0)
            row_bytes = int(np.prod(per, dtype=np.int64)) // max(per[axis], 1)
            row_bytes *= self.dtype.itemsize
            per[axis] = int(min(max(self.block_bytes // max(row_bytes, 1), 1), per[axis]))
        self.chunks = tuple([1, *per] if stacked else per)

    # Attributes Orbax reads from a leaf value.
    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def blocks(self) -> Iterator[tuple[tuple[Any, ...], np.ndarray]]:
        """``(index into the leaf, block in our layout and dtype)``, one at a time."""
        stacked = self.pieces[0].layer is not None
        per_chunks = self.chunks[1:] if stacked else self.chunks
        for p in self.pieces:
            lead = (p.layer,) if stacked else ()
            m = p.mapping
            if not m.streamable or not m.hf_shape:
                whole = m.to_ours(p.source.read(p.name))
                yield (*lead, Ellipsis), np.asarray(whole, self.dtype)
                continue
            axis = m.perm.index(0)
            n, step = m.hf_shape[0], per_chunks[axis]
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                src = p.source.read(p.name, r0, r1)
                block = np.ascontiguousarray(src.transpose(m.perm), dtype=self.dtype)
                del src  # before the write: only the block in our layout stays alive
                idx = tuple(slice(r0, r1) if i == axis else slice(None) for i in range(block.ndim))
                yield (*lead, *idx), block
                del block


def leaves_of(
    subtree: str, ckpt: MappedCheckpoint, dtype: np.dtype, block_bytes: int
) -> list[Leaf]:
    """One output leaf per mapping of a checked checkpoint, under ``subtree``."""
    return [
        Leaf(
            f"{subtree}/{'/'.join(m.path)}",
            m.param_shape,
            dtype,
            [
                Piece(ckpt.source, name, i if m.stacked else None, m)
                for i, name in enumerate(m.hf_names)
            ],
            block_bytes,
        )
        for m in ckpt.mappings
    ]


def clip_leaves(path: str | os.PathLike, dtype: np.dtype, block_bytes: int) -> list[Leaf]:
    """Leaves of both CLIP towers (``CLIP_SUBTREES``) from a HF CLIP directory."""
    ckpt = hf_clip.open_checkpoint(path, dtype=dtype, param_dtype=dtype, scan_layers=True)
    return [leaf for sub in CLIP_SUBTREES for leaf in leaves_of(sub, ckpt, dtype, block_bytes)]


def mistral_leaves(path: str | os.PathLike, dtype: np.dtype, block_bytes: int) -> list[Leaf]:
    """Leaves of ``llm`` (base weights, layer-stacked) from a HF Mistral directory."""
    ckpt = hf_mistral.open_checkpoint(path, dtype=dtype, param_dtype=dtype, scan_layers=True)
    return leaves_of(LLM_SUBTREE, ckpt, dtype, block_bytes)


def projector_leaves(
    path: str | os.PathLike, dtype: np.dtype, block_bytes: int, *, sampler_padding: int = 1
) -> list[Leaf]:
    """Leaves of ``exo_encoder/connector`` from a VideoLLaMA2 ``mm_projector`` (see
    ``mm_projector.load_mm_projector`` for the accepted files); sizes inferred from shapes."""
    ckpt = mm_projector.open_checkpoint(path, dtype, sampler_padding=sampler_padding)
    return leaves_of(PROJECTOR_SUBTREE, ckpt, dtype, block_bytes)


# ----------------------------------------------------------------------------- writing


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Orbax type handler for :class:`Leaf`: writes blocks in order, one leaf at a time.

    Its type string is the numpy handler's, so the checkpoint restores like one of numpy
    leaves (into any sharding). Leaves are written sequentially, not concurrently as Orbax
    does for arrays, so at most one block is in flight.
    """

    def __init__(self, on_block: Callable[[Leaf, int], None] = lambda leaf, n: None):
        super().__init__(deepcopy_host_arrays=False)
        self._on_block = on_block

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [
            ocp_future.CommitFutureAwaitingContractedSignals(
                self._write_all(values, infos, args), name="exo2ego_convert"
            )
        ]

    async def _write_all(self, values: Sequence[Leaf], infos, args) -> None:
        for leaf, info, arg in zip(values, infos, args, strict=True):
            await info.await_path_creation()
            # The spec NumpyHandler builds for a numpy leaf (same call, same arguments).
            use_ocdbt = bool(info.is_ocdbt_checkpoint)
            tspec = ocp.type_handlers.get_json_tspec_write(
                info,
                use_ocdbt=use_ocdbt,
                global_shape=leaf.shape,
                local_shape=leaf.chunks,
                dtype=leaf.dtype,
                process_index=ocp.multihost.process_index() if use_ocdbt else None,
                arg=arg,
            )
            if tspec.get("driver") != "zarr":  # zarr2: the handler is built with use_zarr3=False
                raise RuntimeError(f"unexpected TensorStore spec for {leaf.path}: {tspec}")
            # Chunks = blocks: every write covers whole chunks, none is buffered half-filled.
            tspec["metadata"]["chunks"] = list(leaf.chunks)
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=info.ts_context)
            for index, block in leaf.blocks():
                await t[index].write(block, can_reference_source_data_indefinitely=True)
                self._on_block(leaf, block.nbytes)
                del block


def plan(
    clip: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    projector: str | os.PathLike | None = None,
    *,
    dtype: Any = "float32",
    block_mib: float = DEFAULT_BLOCK_MIB,
) -> list[Leaf]:
    """Every output leaf, all sources checked (names, shapes, dtypes); nothing read yet."""
    dtype = jnp.dtype(dtype)
    if dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype.name}: use float32 or bfloat16")
    block = int(block_mib * 2**20)
    leaves: list[Leaf] = []
    if clip:
        leaves += clip_leaves(clip, dtype, block)
    if llm:
        leaves += mistral_leaves(llm, dtype, block)
    if projector:
        leaves += projector_leaves(projector, dtype, block)
    if not leaves:
        raise ValueError("nothing to convert: pass --clip, --llm and/or --projector")
    return leaves


def convert(
    out: str | os.PathLike,
    clip: str | os.PathLike | None = None,
    llm: str | os.PathLike | None = None,
    projector: str | os.PathLike | None = None,
    *,
    dtype: Any = "float32",
    block_mib: float = DEFAULT_BLOCK_MIB,
    compress: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes the converted checkpoint to ``out`` (atomically); returns a summary dict
    (``num_tensors``, ``bytes``, ``seconds``, ``largest_tensor_bytes``...).

    ``compress`` stores chunks zstd-compressed (Orbax's default for its own checkpoints):
    ~10 % smaller for float weights, but TensorStore then holds several compressed copies of
    a block while writing (measured ≈ 5 blocks above baseline instead of ≈ 2).
    """
    t0 = time.time()
    leaves = plan(clip, llm, projector, dtype=dtype, block_mib=block_mib)
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    total = sum(leaf.nbytes for leaf in leaves)
    sources = {"clip": clip, "llm": llm, "projector": projector}
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": jnp.dtype(dtype).name,
        "sources": {k: str(Path(v).absolute()) for k, v in sources.items() if v},
        "num_tensors": len(leaves),
        "bytes": total,
    }
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
        disable=not progress, dynamic_ncols=True,
    )  # fmt: skip

    def on_block(leaf: Leaf, nbytes: int) -> None:
        bar.set_postfix_str(leaf.path, refresh=False)
        bar.update(nbytes)

    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()), (Leaf, _StreamingHandler(on_block))
    )
    handler = ocp.PyTreeCheckpointHandler(
        use_ocdbt=True,
        use_zarr3=False,
        use_compression=compress,
        type_handler_registry=registry,
    )
    tree = traverse_util.unflatten_dict({leaf.path: leaf for leaf in leaves}, sep="/")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with ocp.Checkpointer(handler) as ckpt:
            ckpt.save(tmp / "ckpt", args=ocp.args.PyTreeSave(tree), custom_metadata=info)
        if out.exists():  # --overwrite: move the old one aside, then swap in the new one
            os.replace(out, tmp / "old")
        os.replace(tmp / "ckpt", out)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        **info,
        "out": str(out),
        "seconds": time.time() - t0,
        "largest_tensor_bytes": max(_piece_bytes(leaf) for leaf in leaves),
        "largest_block_bytes": max(
            int(np.prod(leaf.chunks, dtype=np.int64)) * leaf.dtype.itemsize for leaf in leaves
        ),
    }


def _piece_bytes(leaf: Leaf) -> int:
    """Bytes of one source tensor of ``leaf`` in the output dtype (one layer if stacked)."""
    return leaf.nbytes // len(leaf.pieces)


def _return_freed_blocks_to_the_os() -> None:
    """glibc: serve every allocation of 1 MiB or more with its own ``mmap``.

    Blocks are allocated and freed by several threads (ours, TensorStore's); glibc's default
    dynamic threshold soon puts blocks of up to 32 MiB on per-thread heaps, which keep freed
    blocks mapped, and peak RSS then grows by several blocks per thread (measured: 16 MiB
    blocks, 2.8 GiB model: +200 MiB instead of +40 MiB). Only the command line sets this
    process-wide option; elsewhere (e.g. on musl) it is a no-op.
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 2**20)  # M_MMAP_THRESHOLD (fixed: no dynamic growth)
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.tools.convert",
        description="Convert HF CLIP / Mistral and a VideoLLaMA2 projector into one Orbax "
        "params checkpoint of the Exo2Ego tree, streaming tensor by tensor.",
    )
    p.add_argument("--clip", default="", help="HF CLIPVisionModel / CLIPModel dir (both towers)")
    p.add_argument("--llm", default="", help="HF MistralForCausalLM dir")
    p.add_argument("--projector", default="", help="VideoLLaMA2 mm_projector file or dir (E_exo)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--block_mib", type=float, default=DEFAULT_BLOCK_MIB, help="MiB written at once")
    p.add_argument("--compress", action="store_true", help="zstd chunks (more host memory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    _return_freed_blocks_to_the_os()
    try:
        s = convert(
            a.out, a.clip, a.llm, a.projector, dtype=a.dtype, block_mib=a.block_mib,
            compress=a.compress, overwrite=a.overwrite, progress=not a.no_progress,
        )  # fmt: skip
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {s['num_tensors']} tensors ({s['bytes'] / 2**30:.2f} GiB, {s['dtype']}) to "
        f"{s['out']} in {s['seconds']:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
