"""The one decode engine: prefill a KV cache, extend it, and generate from it.

Every caller that runs the LLM incrementally -- :func:`generate` (EgoBench's open answers
and letter mode, ``Exo2Ego.generate``), the chat session, and EgoBench's log-likelihood
scoring -- goes through one prefill / extend pair:

* :func:`llm_prefill` / :func:`prefill`: run a right-padded prompt (token ids, input
  embeddings, or, for :func:`prefill`, an ego clip spliced into the prompt at ``<video>``)
  through the LLM, writing every prompt slot of a preallocated cache, and return the logits
  of each row's last real token;
* :func:`llm_extend`: feed ``C`` more tokens per row at given positions over a cache.

The cache ``float[L, B, S, K, H]`` is allocated once per call; shapes never change while
decoding, so one compilation serves every call with the same (batch, prompt bucket, cache
length). Prompt lengths are padded to a multiple of :data:`PROMPT_BUCKET` by callers
(:func:`bucket`) so that a new question rarely recompiles.

Right-padded prompts of different lengths decode together: row ``b`` with ``n_b`` real
tokens writes its ``t``-th new token at slot / position ``n_b + t`` and attends to slots
``<= n_b + t`` only, which by then all hold its real tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from exo2ego_jax.models.mistral import KVCache, MistralLM, init_cache, unstack_layers

#: Prompt lengths are padded to a multiple of this (fewer recompilations).
PROMPT_BUCKET = 64


#: Layer weights up to this size are unstacked once per :func:`generate` call.
UNSTACK_MAX_BYTES = 2**30


def should_unstack(config: Any) -> bool:
    """Whether :func:`generate` slices scanned layer weights out once before its decode loop
    (faster: a scanned loop re-slices every layer's weights for every token) rather than per
    token: only when a second copy of the layer weights is cheap (``UNSTACK_MAX_BYTES``;
    never for a 7B model, whose layers would be held twice)."""
    if not config.scan_layers:
        return False
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    per_layer = d * h * (config.num_heads * 2 + config.num_kv_heads * 2) + 3 * d * f
    return per_layer * config.num_layers * jnp.dtype(config.param_dtype).itemsize <= (
        UNSTACK_MAX_BYTES
    )


def bucket(n: int, multiple: int = PROMPT_BUCKET) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


@flax.struct.dataclass
class GenerateOutput:
    """``tokens int32[B, N]`` (``pad_token_id`` after a row's EOS) and ``lengths int32[B]``,
    the number of generated tokens of each row including its EOS."""

    tokens: jax.Array
    lengths: jax.Array


def argmax(logits: jax.Array) -> jax.Array:
    """``float[B, V] -> int32[B]``, first index of the maximum (as ``torch.argmax``).

    Max + masked min-index: two plain reductions, ~4x faster on CPU than XLA's variadic
    (value, index) reduce behind ``jnp.argmax``.
    """
    v = logits.shape[-1]
    top = jnp.max(logits, axis=-1, keepdims=True)
    idx = jnp.min(jnp.where(logits == top, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
    return jnp.minimum(idx, v - 1)  # NaN rows: no index equals the max


def sample_token(
    logits: jax.Array,
    rng: jax.Array | None,
    temperature: jax.Array | float,
    top_p: jax.Array | float,
    greedy: bool,
) -> jax.Array:
    """``float[B, V] -> int32[B]``: argmax, or nucleus sampling at ``temperature``.

    Nucleus as HF's ``TopPLogitsWarper``: keep the smallest set of most likely tokens whose
    probability mass reaches ``top_p`` (always at least the most likely one).
    """
    if greedy:
        return argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = mass_before < top_p
    keep = keep.at[:, 0].set(True)
    # Threshold: the smallest kept logit; ties at the threshold are kept (as HF).
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- prefill / extend


def llm_prefill(
    module: MistralLM,
    params: Any,
    attention_mask: jax.Array,
    cache: KVCache,
    *,
    input_ids: jax.Array | None = None,
    inputs_embeds: jax.Array | None = None,
) -> tuple[jax.Array, KVCache, jax.Array]:
    """Runs right-padded prompts through the LLM, filling ``cache``.

    Args:
      module, params: a :class:`MistralLM` and its (inner) parameters.
      attention_mask: ``int|bool[B, P]``, 1 on real tokens.
      cache: a :class:`KVCache` with room for ``P`` + the tokens to come.
      input_ids: ``int[B, P]``, or inputs_embeds: ``float[B, P, D]`` (exactly one).
    Returns:
      ``(logits float[B, V] of each row's last real token, cache, lengths int32[B])``.
    """
    b, p = attention_mask.shape
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1)
    # Every prompt slot is written (pads too: they sit above the row's causal horizon until
    # overwritten); logits only at each row's last real token.
    out = module.apply(
        {"params": params},
        input_ids,
        inputs_embeds=inputs_embeds,
        positions=jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)),
        cache=cache,
        logits_index=jnp.maximum(lengths - 1, 0)[:, None],
    )
    return out.logits[:, 0], out.cache, lengths


def llm_extend(
    module: MistralLM, params: Any, tokens: jax.Array, positions: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feeds ``tokens int[B, C]`` at ``positions int[B, C]`` (also their cache slots).

    Returns ``(logits float[B, C, V], cache)``: the logits after each fed token.
    """
    out = module.apply({"params": params}, tokens, positions=positions, cache=cache)
    return out.logits, out.cache


def prefill(
    model: Any,
    params: Any,
    frames: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    cache_len: int,
) -> tuple[jax.Array, KVCache, jax.Array]:
    """Prefill for an :class:`~exo2ego_jax.models.exo2ego.Exo2Ego`: the ego clip's visual
    tokens spliced in at each prompt's ``<video>`` sentinel, then :func:`llm_prefill` over a
    new cache of ``cache_len`` slots.

    Args:
      frames: ``float[B, T, H, W, 3]`` CLIP-normalised ego clips.
      input_ids, attention_mask: ``int[B, P]`` right-padded prompts with one sentinel each.
    Returns:
      ``(logits float[B, V], cache, lengths int32[B])``, lengths counting spliced tokens.
    """
    embeds, mask = embed_prompt(model, params, frames, input_ids, attention_mask)
    cache = init_cache(model.config.llm, mask.shape[0], cache_len)
    return llm_prefill(model.llm, params["llm"], mask, cache, inputs_embeds=embeds)


def embed_prompt(
    model: Any, params: Any, frames: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Prompt embeddings with the ego clip's visual tokens spliced in at ``<video>``.

    ``frames float[B, T, H, W, 3]``, ``input_ids / attention_mask int[B, P]`` ->
    ``(embeds float[B, P', D], mask int[B, P'])`` with ``P' = spliced_length(model, P)``.
    """
    visual, _, _ = model.ego_visual_tokens(params, frames)
    embeds, mask, _ = model.embed_multimodal(params, input_ids, visual, attention_mask)
    return embeds, mask


def spliced_length(model: Any, prompt_len: int) -> int:
    """Length of a ``prompt_len``-token prompt once its ``<video>`` sentinel is replaced."""
    return prompt_len - 1 + model.config.visual_tokens_in_prompt


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The jitted prefill and single-token step of one Exo2Ego model (:func:`decoder`).

    ``prefill(params, frames, ids, mask, *, cache_len) -> (logits float32[B, V], cache,
    lengths int32[B])`` and ``step(params, tokens int[B], positions int[B], cache) ->
    (logits float32[B, V], cache)`` (the cache is donated and updated in place).
    """

    prefill: Callable
    step: Callable


@functools.lru_cache(maxsize=4)
def decoder(model: Any) -> Decoder:
    """The :class:`Decoder` of ``model`` (compiled once per model object and shape)."""

    @functools.partial(jax.jit, static_argnames=("cache_len",))
    def prefill_fn(params, frames, ids, mask, *, cache_len):
        logits, cache, lengths = prefill(model, params, frames, ids, mask, cache_len=cache_len)
        return logits.astype(jnp.float32), cache, lengths

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def step_fn(params, tokens, positions, cache):
        logits, cache = llm_extend(
            model.llm, params["llm"], tokens[:, None], positions[:, None], cache
        )
        return logits[:, 0].astype(jnp.float32), cache

    return Decoder(prefill_fn, step_fn)


# ----------------------------------------------------------------------------- generation


def _generate_impl(
    module: MistralLM,
    params: Any,
    input_ids: jax.Array | None,
    inputs_embeds: jax.Array | None,
    attention_mask: jax.Array,
    cache: KVCache,
    rng: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    greedy: bool,
    eos_token_id: int | None,
    pad_token_id: int,
    unstack: bool,
) -> tuple[jax.Array, jax.Array, KVCache]:
    if unstack and module.config.scan_layers:
        params = unstack_layers(params, module.config.num_layers)
        module = MistralLM(dataclasses.replace(module.config, scan_layers=False))

    def pick(logits, t):
        key = None if greedy else jax.random.fold_in(rng, t)
        return sample_token(logits, key, temperature, top_p, greedy)

    def is_eos(tok):
        if eos_token_id is None:
            return jnp.zeros(tok.shape, bool)
        return tok == eos_token_id

    b = attention_mask.shape[0]
    logits, cache, n_prompt = llm_prefill(
        module, params, attention_mask, cache, input_ids=input_ids, inputs_embeds=inputs_embeds
    )
    tok = pick(logits, 0)
    tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tok)
    done = is_eos(tok)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(state):
        t, _, _, done, _, _ = state
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
        t, tokens, last, done, lengths, cache = state
        pos = (n_prompt + t - 1)[:, None]  # slot of the token being fed
        logits, cache = llm_extend(module, params, last[:, None], pos, cache)
        tok = jnp.where(done, pad_token_id, pick(logits[:, 0], t))
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, t))
        lengths = jnp.where(done, lengths, t + 1)
        return t + 1, tokens, tok, done | is_eos(tok), lengths, cache

    state = (jnp.int32(1), tokens, tok, done, lengths, cache)
    _, tokens, _, _, lengths, cache = jax.lax.while_loop(cond, body, state)
    return tokens, lengths, cache


generate_jit = jax.jit(
    _generate_impl,
    static_argnames=(
        "module",
        "max_new_tokens",
        "greedy",
        "eos_token_id",
        "pad_token_id",
        "unstack",
    ),
    donate_argnames=("cache",),
)
"""The compiled core of :func:`generate` (exposed so callers can inspect its trace cache)."""


def generate(
    module: MistralLM,
    params: Any,
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    max_new_tokens: int = 32,
    *,
    inputs_embeds: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    cache_dtype: Any = None,
    unstack_layers: bool | None = None,
) -> GenerateOutput:
    """Greedy (``temperature == 0``) or temperature + top-p sampling.

    Args:
      module: a :class:`MistralLM`; params: its parameters (inner dict or ``{'params': ...}``).
      input_ids: ``int[B, P]`` right-padded prompts, or
      inputs_embeds: ``float[B, P, D]`` (e.g. text embeddings with visual tokens spliced in).
      attention_mask: ``int|bool[B, P]``, 1 on real tokens; default all ones.
      max_new_tokens: N, the width of the output.
      temperature, top_p: sampling controls (traced: changing them does not recompile).
      rng: PRNG key, required when sampling.
      eos_token_id: a row stops after emitting it; None never stops early.
      pad_token_id: fills the output after a row's EOS.
      cache_dtype: KV cache dtype (default: the model's compute dtype).
      unstack_layers: None (default): the engine decides (:func:`should_unstack`); or, for a
        module with ``scan_layers=True``, True to slice the per-layer weights
        out once before the decode loop instead of once per token (faster decoding, but the
        layer weights are held twice during the call). A module loaded with
        ``scan_layers=False`` needs neither.

    Returns:
      :class:`GenerateOutput` with ``tokens int32[B, N]`` and ``lengths int32[B]``.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    greedy = float(temperature) == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an explicit rng")
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    prompt = input_ids if input_ids is not None else inputs_embeds
    b, p = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = jnp.ones((b, p), jnp.int32)
    cache = init_cache(module.config, b, p + max_new_tokens, cache_dtype)
    tokens, lengths, _ = generate_jit(
        module,
        params,
        None if input_ids is None else jnp.asarray(input_ids, jnp.int32),
        inputs_embeds,
        jnp.asarray(attention_mask),
        cache,
        rng if rng is not None else jax.random.key(0),  # unused when greedy
        jnp.float32(max(float(temperature), 1e-6)),
        jnp.float32(top_p),
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        unstack=should_unstack(module.config) if unstack_layers is None else unstack_layers,
    )
    return GenerateOutput(tokens=tokens, lengths=lengths)
