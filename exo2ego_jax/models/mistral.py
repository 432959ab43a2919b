"""Mistral decoder-only language model (Mistral-7B-Instruct v0.2 and shrunk variants).

Architecture as Hugging Face ``MistralForCausalLM``: token embedding, ``num_layers`` pre-norm
blocks (RMSNorm → grouped-query attention with rotary embeddings → residual; RMSNorm →
SwiGLU MLP → residual), final RMSNorm, untied (or tied) LM head.

Parameter tree (``scan_layers=True``; every leaf has logical axis names)::

    embed_tokens/embedding            [V, D]        (vocab, embed)
    layers/self_attn/q_proj/kernel    [L, D, N*H]   (layers, embed, heads)
    layers/self_attn/{k,v}_proj/kernel[L, D, K*H]   (layers, embed, kv_heads)
    layers/self_attn/o_proj/kernel    [L, N*H, D]   (layers, heads, embed)
    layers/mlp/{gate,up}_proj/kernel  [L, D, F]     (layers, embed, mlp)
    layers/mlp/down_proj/kernel       [L, F, D]     (layers, mlp, embed)
    layers/{input,post_attention}_layernorm/scale [L, D]  (layers, norm)
    norm/scale                        [D]           (norm)
    lm_head/kernel                    [D, V]        (embed, vocab)   absent when tied

so an HF tensor converts by a transpose (and stacking over layers). With
``scan_layers=False`` the blocks are ``layers_0 ... layers_{L-1}`` without the leading axis.
LoRA adds ``lora_a [.., in, r]`` / ``lora_b [.., r, out]`` beside the targeted kernels.

Dimension letters: B batch, T query length, S key length (cache slots), D model width,
N query heads, K key/value heads, G = N / K query heads per KV head, H head width,
F MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from exo2ego_jax.models import remat
from exo2ego_jax.models.attention import ATTENTION_IMPLS, MaskSpec, attend
from exo2ego_jax.models.lora import LoRAConfig, LoRADense


@dataclasses.dataclass(frozen=True)
class MistralConfig:
    """Architecture and numerics of a Mistral LM.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. ``remat_policy`` names
    what each block keeps for the backward pass (:data:`remat.REMAT_POLICIES`: ``"none"``
    stores all activations, ``"full"`` recomputes each block, ``"save_qkvo_mlp"`` keeps the
    projection outputs, ...; see :mod:`exo2ego_jax.models.remat`). ``attention_impl`` picks
    the attention kernel (:data:`attention.ATTENTION_IMPLS`, ``"auto"`` by backend; see
    :mod:`exo2ego_jax.models.attention`). ``sliding_window=None`` disables the window; with
    a window W a query at position q attends to keys k with ``q - W < k <= q`` (HF
    semantics). ``scan_layers`` stacks the blocks under ``nn.scan`` (one compiled block,
    leading ``layers`` axis on every block parameter); ``scan_unroll`` is passed to the scan.
    ``lora`` adds adapters to the projections it targets.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "auto"
    scan_layers: bool = True
    scan_unroll: int = 1
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}"
            )
        remat.check_policy(self.remat_policy)
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl={self.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def paper(**overrides: Any) -> MistralConfig:
    """Mistral-7B-Instruct-v0.2 (the paper's LLM): 7,241,732,096 parameters."""
    return dataclasses.replace(
        MistralConfig(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            rope_theta=1e6,
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
            max_position_embeddings=32768,
        ),
        **overrides,
    )


def tiny(**overrides: Any) -> MistralConfig:
    """A few-layer Mistral for tests and demos (GQA with 2 query heads per KV head)."""
    return dataclasses.replace(
        MistralConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
        ),
        **overrides,
    )


def from_hf_config(hf: dict, **overrides: Any) -> MistralConfig:
    """Builds a config from a Hugging Face ``config.json`` dict (``model_type == "mistral"``).

    Raises ``ValueError`` for settings this implementation does not support (non-SiLU
    activation, scaled RoPE variants).
    """
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (Mistral uses 'silu')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported (only default RoPE)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    num_heads = hf["num_attention_heads"]
    return dataclasses.replace(
        MistralConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or None,
            rope_theta=float(theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            initializer_range=hf.get("initializer_range", 0.02),
        ),
        **overrides,
    )


def to_hf_config(config: MistralConfig, torch_dtype: str = "float32") -> dict:
    """The ``config.json`` dict ``MistralForCausalLM.from_pretrained`` reads."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_word_embeddings,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


@flax.struct.dataclass
class KVCache:
    """Preallocated keys / values of every layer: ``float[L, B, S, K, H]`` each.

    Slot ``s`` of row ``b`` holds the token at position ``s`` of that row, so right-padded
    rows of different lengths each append at their own position.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned params (``layers/...`` with a leading layer axis) -> ``layers_0 ...``, for a
    module built with ``scan_layers=False``. Slicing a stacked kernel copies it, so a decode
    loop over scanned params re-copies every layer's weights each token; unstacking once
    before the loop avoids that (at the price of one copy of the layer weights)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], params["layers"])
    return out


def init_cache(config: MistralConfig, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """Zero cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


@flax.struct.dataclass
class MistralOutput:
    """``logits float[B, T, V]`` (or ``[B, P, V]`` with ``logits_index``), final-normed
    ``hidden float[B, T, D]``, and the updated cache (None without a cache)."""

    logits: jax.Array
    hidden: jax.Array
    cache: KVCache | None = None


# ----------------------------------------------------------------------------- blocks


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """RoPE in HF's ``rotate_half`` layout: ``x float[B, T, N, H]``, ``positions int[B, T]``.

    The two halves of the head width (not interleaved pairs) form the complex pairs, so HF
    q/k weights are used unchanged. Angles are computed in float32.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    """``x / rms(x) * scale`` over the last axis, computed in float32 (as HF)."""

    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * scale.astype(self.dtype)


def _proj(cfg: MistralConfig, name: str, features: int, axes: tuple[str, str]) -> LoRADense:
    lora = cfg.lora if cfg.lora is not None and name in cfg.lora.targets else None
    return LoRADense(
        features=features,
        kernel_axes=axes,
        lora=lora,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(cfg.initializer_range),
        name=name,
    )


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional sliding window and KV cache."""

    config: MistralConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: MaskSpec,
        positions: jax.Array,
        cache: KVCache | None,
        layer: jax.Array | int,
        deterministic: bool,
    ) -> tuple[jax.Array, KVCache | None]:
        """``x float[B, T, D]``, ``mask`` which keys each query sees (:func:`mask_spec_for`),
        ``positions int[B, T]``. Without a cache S == T (the block attends to itself); with
        one, the new keys are first written at slots ``positions`` of layer ``layer`` and the
        queries attend over all S cache slots. The kernel is ``config.attention_impl``'s."""
        cfg = self.config
        b, t, _ = x.shape
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _proj(cfg, "q_proj", n * h, ("embed", "heads"))(x, deterministic)
        kk = _proj(cfg, "k_proj", k * h, ("embed", "kv_heads"))(x, deterministic)
        vv = _proj(cfg, "v_proj", k * h, ("embed", "kv_heads"))(x, deterministic)
        q = checkpoint_name(q, remat.QUERY)
        kk = checkpoint_name(kk, remat.KEY)
        vv = checkpoint_name(vv, remat.VALUE)
        q = rope(q.reshape(b, t, n, h), positions, cfg.rope_theta)
        kk = rope(kk.reshape(b, t, k, h), positions, cfg.rope_theta)
        vv = vv.reshape(b, t, k, h)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        kk = nn.with_logical_constraint(kk, ("batch", "length", "act_kv_heads", None))
        vv = nn.with_logical_constraint(vv, ("batch", "length", "act_kv_heads", None))

        if cache is not None:
            rows = jnp.arange(b)[:, None]
            new_k = cache.k.at[layer, rows, positions].set(kk.astype(cache.k.dtype), mode="drop")
            new_v = cache.v.at[layer, rows, positions].set(vv.astype(cache.v.dtype), mode="drop")
            cache = KVCache(k=new_k, v=new_v)
            kk = new_k[layer].astype(cfg.dtype)  # [B, S, K, H]
            vv = new_v[layer].astype(cfg.dtype)

        # Query head n = k * G + g uses KV head k (HF repeat_kv order).
        out = attend(q, kk, vv, mask, impl=cfg.attention_impl).reshape(b, t, n * h)
        out = _proj(cfg, "o_proj", cfg.hidden_size, ("heads", "embed"))(out, deterministic)
        return checkpoint_name(out, remat.OUT), cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    config: MistralConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        f = cfg.intermediate_size
        gate = _proj(cfg, "gate_proj", f, ("embed", "mlp"))(x, deterministic)
        up = _proj(cfg, "up_proj", f, ("embed", "mlp"))(x, deterministic)
        gate, up = checkpoint_name(gate, remat.MLP_IN), checkpoint_name(up, remat.MLP_IN)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        out = _proj(cfg, "down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden, deterministic)
        return checkpoint_name(out, remat.MLP_OUT)


class DecoderLayer(nn.Module):
    """One pre-norm block. Scan-compatible: ``(carry, layer) -> (carry, None)`` where
    ``carry = (x float[B, T, D], cache | None)``."""

    config: MistralConfig

    @nn.compact
    def __call__(
        self,
        carry: tuple[jax.Array, KVCache | None],
        layer: jax.Array | int,
        mask: MaskSpec,
        positions: jax.Array,
        deterministic: bool,
    ) -> tuple[tuple[jax.Array, KVCache | None], None]:
        cfg = self.config
        x, cache = carry
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn, cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), mask, positions, cache, layer, deterministic
        )
        x = x + attn
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x), deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return (x, cache), None


def mask_spec_for(
    config: MistralConfig,
    positions: jax.Array,
    attention_mask: jax.Array | None,
    cached: bool,
) -> MaskSpec:
    """Causal (+ sliding window) (+ key padding) mask of a forward pass, as a
    :class:`~exo2ego_jax.models.attention.MaskSpec` every attention kernel takes.

    Without a cache, queries and keys are the same T tokens and causality is by sequence
    index (as HF); the key-padding mask ``attention_mask int[B, T]`` hides padded keys. With a
    cache, slot == position, so a query at position p sees slots ``s <= p`` (every such slot
    of a right-padded row holds a real prompt or generated token).
    """
    key_valid = None
    if attention_mask is not None and not cached:
        key_valid = attention_mask.astype(bool)
    return MaskSpec(
        key_valid=key_valid,
        query_pos=positions if cached else None,
        causal=True,
        window=config.sliding_window,
    )


def attention_mask_for(
    config: MistralConfig,
    positions: jax.Array,
    attention_mask: jax.Array | None,
    key_len: int,
    cached: bool,
) -> jax.Array:
    """``bool[B, T, S]``: the dense form of :func:`mask_spec_for` (True = may attend)."""
    b, t = positions.shape
    return mask_spec_for(config, positions, attention_mask, cached).dense(b, t, key_len)


def default_positions(attention_mask: jax.Array | None, batch: int, length: int) -> jax.Array:
    """``int[B, T]``: 0, 1, ... over real tokens; padded slots keep their index, so a
    right-padded batch gets exactly ``0..T-1`` (and a left-padded one starts real tokens at 0)."""
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if attention_mask is None:
        return idx
    m = attention_mask.astype(bool)
    return jnp.where(m, jnp.cumsum(m, axis=-1, dtype=jnp.int32) - 1, idx)


class MistralLM(nn.Module):
    """Mistral causal LM. See the module docstring for the parameter tree.

    Call with token ids ``int[B, T]`` or ``inputs_embeds float[B, T, D]`` (e.g. text
    embeddings with visual tokens spliced in); returns :class:`MistralOutput`.
    ``embed(ids)`` (``module.apply(v, ids, method="embed")``) gives the token embeddings.
    """

    config: MistralConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")
            ),
        )
        # argnums count self: (self, carry, layer, mask, positions, deterministic).
        layer_cls = remat.remat_layer(
            DecoderLayer, cfg.remat_policy, prevent_cse=not cfg.scan_layers, static_argnums=(5,)
        )
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                unroll=cfg.scan_unroll,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                # Logits in float32 straight from the matmul (the loss and sampling read
                # them in float32; a bfloat16 round trip would lose their small differences).
                dot_general=functools.partial(
                    jax.lax.dot_general, preferred_element_type=jnp.float32
                ),
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")
                ),
            )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """``int[B, T] -> float[B, T, D]`` token embeddings (compute dtype)."""
        return self.embed_tokens(input_ids)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """``float[..., D] -> float[..., V]`` LM head on final-normed hidden states."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        logits_index: jax.Array | None = None,
        deterministic: bool = True,
    ) -> MistralOutput:
        """Forward pass.

        Args:
          input_ids: ``int[B, T]``; exactly one of this and ``inputs_embeds``.
          inputs_embeds: ``float[B, T, D]``.
          attention_mask: ``int|bool[B, T]``, 1 on real tokens (right padding). Ignored with a
            cache (slot causality already hides unwritten slots).
          positions: ``int[B, T]`` RoPE positions (and cache slots); default from the mask.
          cache: a :class:`KVCache`; new keys / values are written at slots ``positions``.
          logits_index: ``int[B, P]`` sequence indices; if given, logits are computed only
            there (``float[B, P, V]``), e.g. the last prompt token during generation.
          deterministic: False enables LoRA dropout (needs a ``'dropout'`` rng).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(cfg.dtype)
        b, t, _ = x.shape
        if positions is None:
            positions = default_positions(attention_mask, b, t)
        mask = mask_spec_for(cfg, positions, attention_mask, cache is not None)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        carry = (x, cache)
        if cfg.scan_layers:
            carry, _ = self.layers(
                carry, jnp.arange(cfg.num_layers), mask, positions, deterministic
            )
        else:
            for i, layer in enumerate(self.layers):
                carry, _ = layer(carry, i, mask, positions, deterministic)
        x, cache = carry

        hidden = self.norm(x)
        h = hidden
        if logits_index is not None:
            h = jnp.take_along_axis(hidden, logits_index[:, :, None], axis=1)
        logits = self.logits_from_hidden(h)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return MistralOutput(logits=logits, hidden=hidden, cache=cache)
