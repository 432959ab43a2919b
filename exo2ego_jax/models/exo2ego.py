"""The Exo2Ego model: two visual encoders, the mapping networks F and G, and the LLM.

The model is a composition of pure functions over one explicit parameter tree::

    ego_encoder/clip        CLIP vision tower of E_ego           (CLIPVisionTower params)
    ego_encoder/connector   STC connector of E_ego               (STCConnector params)
    exo_encoder/clip        CLIP vision tower of E_exo           (absent with with_exo=False)
    exo_encoder/connector   STC connector of E_exo
    F                       mapping ego -> exo                   (absent with with_mapping=False)
    G                       mapping exo -> ego
    llm                     Mistral (+ LoRA adapters beside the targeted kernels)

Every function takes ``params`` explicitly and has no side effects, so it can be called from
any ``jax.jit`` (``model.encode_ego(params, frames)``). ``Exo2Ego`` itself holds only the
configuration and the stateless Linen modules.

Shapes: B batch, T frames, H×W pixels, S visual tokens per clip (``T'·h'·w'``, 1521 at paper
size), D LLM width, L text length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from exo2ego_jax.models import clip as clip_lib
from exo2ego_jax.models import connector as connector_lib
from exo2ego_jax.models import decode
from exo2ego_jax.models import mapping as mapping_lib
from exo2ego_jax.models import mistral as mistral_lib
from exo2ego_jax.models.connector import STCConnector, STCConnectorConfig
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapping import MappingConfig, MappingNetwork
from exo2ego_jax.models.splice import splice_batch
from exo2ego_jax.sharding import FAST_COMPILE_OPTIONS

Params = dict[str, Any]
Fusion = Literal["concat_seq", "x_only", "fx_only"]
FUSIONS = ("concat_seq", "x_only", "fx_only")


@dataclasses.dataclass(frozen=True)
class Exo2EgoConfig:
    """Architecture of the whole model.

    Attributes:
      clip: CLIP vision tower (both encoders share the architecture, not the weights).
      connector: STC connector (``in_channels`` = CLIP width, ``out_size`` = LLM width).
      mapping: F and G architecture.
      llm: Mistral (its ``lora`` field switches LoRA on).
      num_frames: frames per clip T.
      select_layer: CLIP hidden state fed to the connector (VideoLLaMA2: -2).
      fusion: what replaces ``<video>``: ``[x ; F(x)]``, ``x`` or ``F(x)`` (method.md §2).
      video_token_index: the sentinel id of the placeholder in ``input_ids``.
      with_exo: build E_exo (False for the ego-only baseline).
      with_mapping: build F and G (False for the ego-only baseline; needs fusion x_only).
    """

    clip: clip_lib.CLIPVisionConfig
    connector: STCConnectorConfig
    mapping: MappingConfig
    llm: mistral_lib.MistralConfig
    num_frames: int = 16
    select_layer: int = -2
    fusion: Fusion = "concat_seq"
    video_token_index: int = -201
    with_exo: bool = True
    with_mapping: bool = True

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"Exo2EgoConfig.fusion={self.fusion!r}; expected one of {FUSIONS}")
        if not self.with_mapping and self.fusion != "x_only":
            raise ValueError(
                f"Exo2EgoConfig.fusion={self.fusion!r} needs F; set with_mapping=True or "
                "fusion='x_only'"
            )
        if self.connector.in_channels != self.clip.hidden_size:
            raise ValueError(
                f"connector.in_channels={self.connector.in_channels} must equal the CLIP width "
                f"clip.hidden_size={self.clip.hidden_size}"
            )
        if self.connector.out_size != self.llm.hidden_size:
            raise ValueError(
                f"connector.out_size={self.connector.out_size} must equal the LLM width "
                f"llm.hidden_size={self.llm.hidden_size}"
            )

    @property
    def visual_grid(self) -> tuple[int, int, int]:
        """``(T', h', w')`` of the connector output for one clip."""
        return self.connector.output_grid(self.num_frames, self.clip.grid_size)

    @property
    def tokens_per_clip(self) -> int:
        """S: visual tokens of one encoder for one clip (1521 at paper size)."""
        t, h, w = self.visual_grid
        return t * h * w

    @property
    def visual_tokens_in_prompt(self) -> int:
        """Tokens that replace ``<video>`` under the configured fusion."""
        return self.tokens_per_clip * (2 if self.fusion == "concat_seq" else 1)


def paper(**overrides: Any) -> Exo2EgoConfig:
    """Method.md §2: CLIP-L/14-336 ×2, STC connectors, ResNet F/G (ngf 256), Mistral-7B."""
    cfg = dict(
        clip=clip_lib.paper(),
        connector=connector_lib.paper(),
        mapping=mapping_lib.paper(),
        llm=mistral_lib.paper(),
        num_frames=16,
    )
    cfg.update(overrides)
    return Exo2EgoConfig(**cfg)


def tiny(**overrides: Any) -> Exo2EgoConfig:
    """A CPU-sized model with the paper's structure (tests and the demo)."""
    clip = clip_lib.tiny(image_size=32, patch_size=4)  # 8×8 patch grid
    # A frozen *random* LLM must still react to its inputs: at HF's init scale (0.02) a tiny
    # Mistral has near-uniform attention and near-zero residual updates, so no visual
    # token could steer it. 0.2 gives it enough structure to be driven.
    llm = mistral_lib.tiny(initializer_range=0.2)
    cfg = dict(
        clip=clip,
        connector=connector_lib.tiny(in_channels=clip.hidden_size, out_size=llm.hidden_size),
        mapping=mapping_lib.tiny(),
        llm=llm,
        num_frames=4,
    )
    cfg.update(overrides)
    return Exo2EgoConfig(**cfg)


def for_flop_count(config: Exo2EgoConfig) -> Exo2EgoConfig:
    """The same model with every layer unrolled, rematerialisation off and ``xla`` attention:
    XLA's FLOP count of its step is the model's FLOPs (a scanned loop body is counted once,
    recomputed activations are not model work, and a fused kernel's custom call (cuDNN,
    splash) counts as zero)."""
    return dataclasses.replace(
        config,
        clip=dataclasses.replace(
            config.clip, remat="none", scan_layers=False, attention_impl="xla"
        ),
        llm=dataclasses.replace(
            config.llm, remat_policy="none", scan_layers=False, attention_impl="xla"
        ),
    )


def with_lora(config: Exo2EgoConfig, lora: LoRAConfig | None) -> Exo2EgoConfig:
    """The same model with LoRA adapters switched on (or off with ``None``)."""
    return dataclasses.replace(config, llm=dataclasses.replace(config.llm, lora=lora))


class Exo2Ego:
    """Stateless holder of the modules; every method is a pure function of ``params``."""

    def __init__(self, config: Exo2EgoConfig):
        self.config = config
        self.clip = clip_lib.CLIPVisionTower(config.clip)
        self.connector = STCConnector(config.connector)
        self.mapping = MappingNetwork(config.mapping, features=config.llm.hidden_size)
        self.llm = mistral_lib.MistralLM(config.llm)

    # ------------------------------------------------------------------ parameters

    def init_boxed(self, rng: jax.Array) -> Params:
        """Parameters with their logical-axis metadata (``nn.Partitioned`` leaves)."""
        cfg = self.config
        keys = iter(jax.random.split(rng, 8))
        size = cfg.clip.image_size
        frames = jnp.zeros((1, size, size, 3), jnp.float32)
        feats = jnp.zeros((1, cfg.num_frames, cfg.clip.num_patches, cfg.clip.hidden_size))
        tokens = jnp.zeros((1, cfg.tokens_per_clip, cfg.llm.hidden_size))

        def encoder():
            return {
                "clip": self.clip.init(next(keys), frames, output_hidden_states=False)["params"],
                "connector": self.connector.init(next(keys), feats)["params"],
            }

        params: Params = {"ego_encoder": encoder()}
        if cfg.with_exo:
            params["exo_encoder"] = encoder()
        if cfg.with_mapping:
            params["F"] = self.mapping.init(next(keys), tokens, cfg.visual_grid)["params"]
            params["G"] = self.mapping.init(next(keys), tokens, cfg.visual_grid)["params"]
        ids = jnp.zeros((1, 2), jnp.int32)
        params["llm"] = self.llm.init(next(keys), ids)["params"]
        return params

    def init(self, rng: jax.Array) -> Params:
        """Plain parameter arrays (metadata stripped), made by one jitted call.

        On CPU the init program is compiled without backend optimisation: it runs once, and
        XLA's CPU passes over hundreds of random-number initialisers otherwise dominate
        start-up time (≈18 s → ≈8 s for the tiny model on 2 cores).
        """
        lowered = jax.jit(self.init_boxed).lower(rng)
        options = FAST_COMPILE_OPTIONS if jax.default_backend() == "cpu" else None
        return nn.unbox(lowered.compile(options)(rng))

    def abstract_params(self) -> Params:
        """``jax.ShapeDtypeStruct`` tree of the parameters; nothing is allocated."""
        return nn.unbox(jax.eval_shape(self.init_boxed, jax.random.key(0)))

    def logical_specs(self) -> Params:
        """``PartitionSpec`` tree of logical axis names, one per parameter."""
        return nn.get_partition_spec(jax.eval_shape(self.init_boxed, jax.random.key(0)))

    # ------------------------------------------------------------------ visual path

    def _encode(self, params: Params, frames: jax.Array) -> jax.Array:
        feats = clip_lib.clip_features(
            self.config.clip, params["clip"], frames, select_layer=self.config.select_layer
        )
        return self.connector.apply({"params": params["connector"]}, feats)

    def encode_ego(self, params: Params, frames: jax.Array) -> jax.Array:
        """``x = E_ego(frames)``: CLIP-normalised ``float[B, T, H, W, 3]`` -> ``float[B, S, D]``."""
        return self._encode(params["ego_encoder"], frames)

    def encode_exo(self, params: Params, frames: jax.Array) -> jax.Array:
        """``y = E_exo(frames)``: ``float[B, T, H, W, 3]`` -> ``float[B, S, D]``."""
        if "exo_encoder" not in params:
            raise ValueError("this model has no exo encoder (config.with_exo=False)")
        return self._encode(params["exo_encoder"], frames)

    def _map(self, params: Params, name: str, tokens: jax.Array) -> jax.Array:
        if name not in params:
            raise ValueError(f"this model has no mapping network {name} (with_mapping=False)")
        return self.mapping.apply({"params": params[name]}, tokens, self.config.visual_grid)

    def map_ego_to_exo(self, params: Params, x: jax.Array) -> jax.Array:
        """``F(x)``: ``float[B, S, D]`` -> ``float[B, S, D]``."""
        return self._map(params, "F", x)

    def map_exo_to_ego(self, params: Params, y: jax.Array) -> jax.Array:
        """``G(y)``: ``float[B, S, D]`` -> ``float[B, S, D]``."""
        return self._map(params, "G", y)

    def fuse(self, x: jax.Array, fx: jax.Array | None, fusion: Fusion | None = None) -> jax.Array:
        """Visual tokens for the prompt: ``[x ; F(x)]`` (``[B, 2S, D]``), ``x`` or ``F(x)``."""
        fusion = fusion or self.config.fusion
        if fusion == "x_only":
            return x
        if fx is None:
            raise ValueError(f"fusion {fusion!r} needs F(x)")
        if fusion == "fx_only":
            return fx
        return jnp.concatenate([x, fx.astype(x.dtype)], axis=1)

    def ego_visual_tokens(
        self, params: Params, frames: jax.Array, fusion: Fusion | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Encodes an ego clip for the LLM: returns ``(visual, x, F(x) or None)``."""
        fusion = fusion or self.config.fusion
        x = self.encode_ego(params, frames)
        fx = None if fusion == "x_only" else self.map_ego_to_exo(params, x)
        return self.fuse(x, fx, fusion), x, fx

    # ------------------------------------------------------------------ language path

    def embed_multimodal(
        self,
        params: Params,
        input_ids: jax.Array,
        visual: jax.Array,
        attention_mask: jax.Array,
        labels: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Splices ``visual float[B, N, D]`` at the ``<video>`` sentinel of ``input_ids int[B, L]``.

        Returns ``(embeds float[B, L+N-1, D], attention_mask int[B, L+N-1], labels | None)``;
        visual positions get label -100, right padding stays at the right.
        """
        sentinel = self.config.video_token_index
        safe_ids = jnp.where(input_ids == sentinel, 0, input_ids)
        text = self.llm.apply({"params": params["llm"]}, safe_ids, method="embed")
        return splice_batch(input_ids, text, visual, attention_mask, labels, sentinel)

    def lm_logits(
        self,
        params: Params,
        embeds: jax.Array,
        attention_mask: jax.Array,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
        logits_index: jax.Array | None = None,
    ) -> jax.Array:
        """Mistral logits ``float[B, L', V]`` from input embeddings ``float[B, L', D]``, or
        ``float[B, P, V]`` at the positions ``logits_index int[B, P]`` only."""
        rngs = None if deterministic or rng is None else {"dropout": rng}
        out = self.llm.apply(
            {"params": params["llm"]},
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            deterministic=deterministic,
            rngs=rngs,
            logits_index=logits_index,
        )
        return out.logits

    def __call__(
        self,
        params: Params,
        frames: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        labels: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Full forward on an ego clip: ``(logits float[B, L+N-1, V], spliced labels | None)``."""
        visual, _, _ = self.ego_visual_tokens(params, frames)
        embeds, mask, labels = self.embed_multimodal(
            params, input_ids, visual, attention_mask, labels
        )
        logits = self.lm_logits(params, embeds, mask, deterministic=deterministic, rng=rng)
        return logits, labels

    def generate(
        self,
        params: Params,
        frames: jax.Array,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        max_new_tokens: int = 32,
        **kwargs: Any,
    ) -> decode.GenerateOutput:
        """Answers about an ego clip (no exo video needed): see ``models.decode.generate``.

        Args:
          frames: ``float[B, T, H, W, 3]`` ego clips; input_ids / attention_mask: right-padded
          prompts ``int[B, L]`` with one ``<video>`` sentinel each (``templates.build_prompt``).
        Returns:
          ``GenerateOutput(tokens int32[B, max_new_tokens], lengths int32[B])``.
        """
        embeds, mask = decode.embed_prompt(self, params, frames, input_ids, attention_mask)
        return decode.generate(
            self.llm,
            params["llm"],
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            **kwargs,
        )
