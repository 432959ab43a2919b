"""Scaled dot-product attention for CLIP and Mistral, with the kernel chosen by name.

``attend(q, k, v, mask, impl=...)`` is the one attention of the project. ``impl`` (the
``attention_impl`` field of :class:`~exo2ego_jax.models.mistral.MistralConfig` and
:class:`~exo2ego_jax.models.clip.CLIPVisionConfig`, ``config.model.attention_impl``) names
the kernel:

``auto``       the best kernel the backend has (table below).
``xla``        ``jax.nn.dot_product_attention(implementation="xla")``: any backend, any mask;
               logits in float32, softmax in float32 (materialises ``[B, N, T, S]`` scores).
``cudnn``      cuDNN flash attention through ``jax.nn.dot_product_attention``: CUDA GPUs,
               bfloat16 / float16 inputs, head width a multiple of 8 and at most 128 (256 on
               Hopper). Causal + sliding window + right padding as cuDNN's own mask types.
``splash``     the Pallas splash-attention kernel (TPU) under ``shard_map`` over the mesh
               axes the sharding rules give ``batch`` and ``act_heads`` (as MaxText);
               static causal / local mask, padding as segment ids.
``reference``  the hand-written ``softmax(q kᵀ) v`` this project used before (logits in the
               compute dtype, as it always did): the oracle of the parity tests.

Which kernel a call runs (:func:`resolve_attention_impl`)::

    requested   cpu           gpu (CUDA)                         tpu
    auto        xla           cudnn (bf16/f16, H<=128) else xla  splash (T>=128) else xla
    xla         xla           xla                                xla
    cudnn       error         cudnn (error for f32 / bad H)      error
    splash      error         error                              splash
    reference   reference     reference                          reference

Calls over a KV cache (prefill into / decode from :class:`~exo2ego_jax.models.mistral.KVCache`,
queries at per-row positions) run ``xla`` under ``auto``, ``cudnn`` and ``splash``: their
masks are per-row positions, which splash's static masks cannot express and which decode
(one query per row) gains nothing from a flash kernel for.

Padding semantics: ``xla`` and ``reference`` give every query exactly the mask of
:meth:`MaskSpec.dense` (a padded query sees the real keys before it). ``cudnn`` and ``splash``
agree with them on every real (unpadded) query; their outputs at padded query positions
differ (zero with cuDNN, attention among the pads with splash) and nothing reads those.
Both assume right padding (``cudnn`` counts the real keys of a row; splash is exact for any
padding).

Letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N / K, H head width.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from exo2ego_jax.sharding import fit_spec

#: Every value of ``attention_impl``.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "reference")
#: ``auto`` on TPU runs splash from this many queries on (one kernel block), xla below.
SPLASH_MIN_LENGTH = 128
#: Splash sequence blocks: the largest of these dividing the (padded) length is used.
SPLASH_BLOCKS = (512, 256, 128)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_NEG_INF = -1e30  # reference path: finite, so a fully masked row gives no NaN


class AttentionImplError(ValueError):
    """An attention implementation cannot run on this backend (or with these inputs)."""


# ----------------------------------------------------------------------------- selection


def _platform(backend: str) -> str:
    """Backend names -> ``cpu | cuda | rocm | tpu | <other>`` (``gpu`` means CUDA)."""
    name = backend.lower()
    return "cuda" if name in ("gpu", "cuda") else name


_TARGET_BACKEND: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attention_target_backend", default=None
)


@contextlib.contextmanager
def target_backend(backend: str) -> Iterator[None]:
    """Inside, :func:`current_backend` is ``backend``: tracing for another platform than the
    one running (ahead-of-time compilation for a TPU topology from a CPU host, as
    ``tools.memory_plan --tpu`` does), so ``auto`` picks that platform's kernel."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def current_backend() -> str:
    """``jax.default_backend()``, but ``"rocm"`` for AMD GPUs (which have no cuDNN), and the
    :func:`target_backend` while one is set."""
    target = _TARGET_BACKEND.get()
    if target is not None:
        return target
    backend = jax.default_backend()
    if backend == "gpu":
        version = getattr(jax.devices()[0].client, "platform_version", "") or ""
        if "rocm" in version.lower():
            return "rocm"
    return backend


def check_attention_impl(requested: str, backend: str) -> None:
    """Raises :class:`AttentionImplError` if ``requested`` is unknown or cannot run on
    ``backend`` at all (shape-free: what config resolution checks before compiling)."""
    if requested not in ATTENTION_IMPLS:
        raise AttentionImplError(
            f"attention_impl {requested!r} is not one of {', '.join(ATTENTION_IMPLS)}"
        )
    platform = _platform(backend)
    if requested == "cudnn" and platform != "cuda":
        raise AttentionImplError(
            f"attention_impl 'cudnn' (cuDNN flash attention) needs an NVIDIA GPU, but the "
            f"backend is {backend!r}; use 'auto' or 'xla'"
        )
    if requested == "splash" and platform != "tpu":
        raise AttentionImplError(
            f"attention_impl 'splash' (the Pallas TPU kernel) needs a TPU, but the backend is "
            f"{backend!r}; use 'auto' or 'xla'"
        )


def _cudnn_problem(dtype, head_dim: int, max_head_dim: int) -> str | None:
    """Why cuDNN flash attention cannot take these inputs (None if it can)."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _CUDNN_DTYPES]:
        return f"it takes bfloat16 / float16 inputs, not {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > max_head_dim:
        return f"head width {head_dim} is not a multiple of 8 up to {max_head_dim}"
    return None


def resolve_attention_impl(
    requested: str,
    backend: str,
    *,
    dtype=jnp.float32,
    head_dim: int = 128,
    q_len: int = SPLASH_MIN_LENGTH,
    cached: bool = False,
) -> str:
    """The kernel one attention call runs: ``"xla" | "cudnn" | "splash" | "reference"``.

    Args:
      requested: a value of :data:`ATTENTION_IMPLS`.
      backend: :func:`current_backend` (``"cpu"``, ``"gpu"``, ``"rocm"``, ``"tpu"``, ...).
      dtype, head_dim: of the queries / keys (cuDNN's constraints).
      q_len: query length T (``auto`` on TPU: splash only from one block of queries on).
      cached: queries over a KV cache (prefill / decode): never a flash kernel.
    Raises:
      AttentionImplError: ``requested`` is unknown, or names a kernel this backend lacks, or
        ``cudnn`` for inputs cuDNN cannot take.
    """
    check_attention_impl(requested, backend)
    platform = _platform(backend)
    if requested == "reference":
        return "reference"
    if requested == "xla" or cached:
        return "xla"
    if requested == "cudnn":
        problem = _cudnn_problem(dtype, head_dim, max_head_dim=256)
        if problem:
            raise AttentionImplError(
                f"attention_impl 'cudnn': {problem}; use 'auto' (falls back to 'xla') or 'xla'"
            )
        return "cudnn"
    if requested == "splash":
        return "splash"
    if platform == "cuda" and _cudnn_problem(dtype, head_dim, max_head_dim=128) is None:
        return "cudnn"
    if platform == "tpu" and q_len >= SPLASH_MIN_LENGTH:
        return "splash"
    return "xla"


# ----------------------------------------------------------------------------- masks


@flax.struct.dataclass
class MaskSpec:
    """Which keys each query may see, in a form every kernel can take.

    ``causal``: key index ``s`` is visible from query position ``p`` iff ``s <= p``;
    ``window`` W (with ``causal``): also ``p - s < W`` (HF's sliding window).
    ``key_valid bool[B, S]``: False on padded keys (self-attention without a cache).
    ``query_pos int[B, T]``: the queries' positions = cache slots (attention over a KV
    cache); None means positions ``0..T-1``.
    """

    key_valid: jax.Array | None = None
    query_pos: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    window: int | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def cached(self) -> bool:
        return self.query_pos is not None

    def dense(self, batch: int, q_len: int, kv_len: int) -> jax.Array | None:
        """``bool[B, T, S]`` (True = may attend), or None when every key is visible."""
        if not self.causal and self.window is None and self.key_valid is None:
            return None
        q_pos = self.query_pos
        if q_pos is None:
            q_pos = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
        delta = q_pos[:, :, None] - jnp.arange(kv_len)[None, None, :]  # [B, T, S]
        mask = jnp.ones(delta.shape, bool)
        if self.causal:
            mask &= delta >= 0
        if self.window is not None:
            mask &= delta < self.window
        if self.key_valid is not None:
            mask &= self.key_valid[:, None, :].astype(bool)
        return mask


# ----------------------------------------------------------------------------- kernels


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None):
    """The pre-kernel hand-written path (test oracle): ``q float[B, T, N, H]``, ``k, v
    float[B, S, K, H]`` -> ``float[B, T, N, H]``.

    Query head ``n = k * G + g`` uses KV head ``k`` (HF's repeat_kv order); scores are laid
    out ``[B, T, S, K, G]``, computed in the compute dtype and softmaxed in float32.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h) * jnp.asarray(h**-0.5, q.dtype)
    scores = jnp.einsum("BTKGH,BSKH->BTSKG", qg, k).astype(jnp.float32)
    dense = mask.dense(b, t, s) if mask is not None else None
    if dense is not None:
        scores = jnp.where(dense[:, :, :, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=2).astype(q.dtype)
    return jnp.einsum("BTSKG,BSKH->BTKGH", probs, v).reshape(b, t, n, h)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: MaskSpec | None):
    """``jax.nn.dot_product_attention`` (XLA) with the dense mask; shapes as
    :func:`reference_attention`."""
    dense = mask.dense(q.shape[0], q.shape[1], k.shape[1]) if mask is not None else None
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if dense is None else dense[:, None], implementation="xla"
    )


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec | None,
    *,
    implementation: str = "cudnn",
):
    """cuDNN flash attention: causal / sliding window / right padding as cuDNN mask types.

    ``implementation="xla"`` runs the same arguments through XLA (how the plumbing is tested
    without a GPU). Padded keys are counted per row (right padding); padded queries are
    masked too, so their outputs are zero.
    """
    if mask is not None and mask.cached:
        raise AttentionImplError("cudnn_attention takes no KV-cache mask (use xla_attention)")
    causal = mask is not None and mask.causal
    window = None if mask is None or mask.window is None else (mask.window - 1, 0)
    lengths = None
    if mask is not None and mask.key_valid is not None:
        # An all-pad row still gets one key: no empty softmax anywhere.
        lengths = jnp.maximum(jnp.sum(mask.key_valid, axis=-1, dtype=jnp.int32), 1)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=causal,
        local_window_size=window,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation=implementation,
    )


def _splash_block(length: int) -> int:
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


def _splash_specs(rules, mesh_shape: dict[str, int], shapes) -> tuple[P, P, P]:
    """shard_map specs of q ``[B, N, T, H]``, k / v ``[B, K, S, H]`` and segment ids ``[B,
    T]`` from the logical rules (``batch``, ``act_heads``, ``act_kv_heads``, ``length``)."""
    q_shape, kv_shape = shapes
    logical = {
        "q": ("batch", "act_heads", "length", None),
        "kv": ("batch", "act_kv_heads", "length", None),
    }
    q_spec = nn.logical_to_mesh_axes(logical["q"], rules)
    kv_spec = nn.logical_to_mesh_axes(logical["kv"], rules)
    if q_spec[2] is not None or kv_spec[2] is not None:
        raise AttentionImplError(
            "splash attention needs the sequence unsharded, but the sharding rules map "
            f"'length' to {q_spec[2]!r}; use attention_impl='xla' or drop that rule"
        )
    q_spec = fit_spec(q_spec, P(*logical["q"]), q_shape, mesh_shape, "splash query")
    kv_spec = fit_spec(kv_spec, P(*logical["kv"]), kv_shape, mesh_shape, "splash key/value")
    if q_spec[0] != kv_spec[0] or q_spec[1] != kv_spec[1]:
        # Grouped heads must stay together: a device needs the KV heads of its query heads.
        batch = q_spec[0] if q_spec[0] == kv_spec[0] else None
        q_spec = kv_spec = P(batch, None, None, None)
    return q_spec, kv_spec, P(q_spec[0], None)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec | None,
    *,
    interpret: bool = False,
):
    """The Pallas splash kernel under ``shard_map``; shapes as :func:`reference_attention`.

    Queries are pre-scaled (the kernel does not scale); sequences are padded to a multiple
    of 128 and every position carries a segment id, 1 for real tokens and 0 for padding
    (the row's own and the block padding), so real queries see only real keys and no row
    of the softmax is empty. The static mask (causal, local window or full) lets the kernel
    skip blocks. With a mesh active (``sharding.sharding_context``) the kernel runs per
    device on its batch rows and heads, the mesh axes read from the active logical rules;
    without one it runs directly. ``interpret=True`` runs the kernel in the Pallas
    interpreter (CPU, tests).
    """
    if mask is not None and mask.cached:
        raise AttentionImplError("splash_attention takes no KV-cache mask (use xla_attention)")
    b, t, n, h = q.shape
    s = k.shape[1]
    if s != t:
        raise AttentionImplError(f"splash_attention is self-attention: {t} queries, {s} keys")
    padded = -(-t // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    valid = jnp.ones((b, t), bool)
    if mask is not None and mask.key_valid is not None:
        valid = mask.key_valid.astype(bool)
    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - t)))
    use_segments = padded != t or (mask is not None and mask.key_valid is not None)

    def heads_first(x):  # [B, T, N, H] -> [B, N, T', H]
        return jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - t), (0, 0)))

    scale = jnp.asarray(h**-0.5, jnp.float32)
    q = heads_first((q.astype(jnp.float32) * scale).astype(q.dtype))
    k, v = heads_first(k), heads_first(v)
    causal = mask is not None and mask.causal
    window = None if mask is None else mask.window
    block = _splash_block(padded)

    def kernel(q, k, v, segments):
        shape = (padded, padded)
        if window is not None:
            one = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0)
        elif causal:
            one = splash.CausalMask(shape)
        else:
            one = splash.FullMask(shape)
        sizes = splash.BlockSizes(
            block_q=block,
            block_kv=block,
            block_kv_compute=block,
            block_q_dkv=block,
            block_kv_dkv=block,
            block_kv_dkv_compute=block,
            block_q_dq=block,
            block_kv_dq=block,
        )
        fn = splash.make_splash_mha(
            splash.MultiHeadMask([one] * q.shape[1]),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        ids = splash.SegmentIds(q=segments, kv=segments) if use_segments else None
        return jax.vmap(lambda q, k, v, ids: fn(q, k, v, segment_ids=ids))(q, k, v, ids)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out = kernel(q, k, v, segments)
    else:
        q_spec, kv_spec, seg_spec = _splash_specs(
            nn.get_logical_axis_rules(), dict(mesh.shape), (q.shape, k.shape)
        )
        out = jax.shard_map(
            kernel,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, segments)
    return out[:, :, :t].transpose(0, 2, 1, 3)


_KERNELS: dict[str, Callable] = {
    "reference": reference_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
}


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: MaskSpec | None = None,
    *,
    impl: str = "auto",
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Scaled dot-product attention with the kernel ``impl`` resolves to on ``backend``.

    Args:
      q: ``float[B, T, N, H]``; k, v: ``float[B, S, K, H]`` (grouped-query attention when
        K < N; query head ``n`` uses KV head ``n // (N / K)``), all in one dtype.
      mask: a :class:`MaskSpec`, or None (bidirectional, every key visible).
      impl: a value of :data:`ATTENTION_IMPLS`.
      backend: default :func:`current_backend`; tests pass ``"tpu"`` / ``"gpu"`` to take
        those paths with stand-ins.
      interpret: run the splash kernel in the Pallas interpreter (CPU tests).
    Returns:
      ``float[B, T, N, H]`` in the dtype of ``q``; softmax statistics in float32.
    """
    kind = resolve_attention_impl(
        impl,
        backend or current_backend(),
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=q.shape[1],
        cached=mask is not None and mask.cached,
    )
    if kind == "splash":
        return splash_attention(q, k, v, mask, interpret=interpret)
    return _KERNELS[kind](q, k, v, mask)
