"""The four training stages of Exo2Ego as data: what trains, what it reads, how losses combine.

A stage is a *view* of the one model (design.md principle 2):

============  ===================================  ==================  =========================
stage         trainable                            batches             loss
============  ===================================  ==================  =========================
0 init        E_ego, E_exo connectors (+ CLIP)     ego_caption,        VTG(x) + VTG(y)
                                                   exo_caption
1 demo prep   E_exo connector (+ CLIP)             exo_caption         VTG(y)
2 guidance    E_ego connector (+ CLIP), F, G       pair                λ·VTG([x;F(x)]) + λ·KL
                                                                       + λ·CCL
3 practice    LoRA(LLM), E_ego connector, F        instruct            VTG([x;F(x)])
============  ===================================  ==================  =========================

Gradients exist only for the trainable subtree: :func:`split_params` cuts the parameter tree
in two, the loss takes ``(trainable, frozen)`` and ``jax.grad`` differentiates the first
argument only, so a frozen 7B LLM costs neither gradient nor optimizer memory.

Batches (numpy or jax arrays; right-padded text with one ``<video>`` sentinel per row)::

    ego_caption / exo_caption / instruct:
        frames float[B, T, H, W, 3], input_ids int[B, L], labels int[B, L],
        attention_mask int[B, L]
    pair:
        ego_frames float[B, T, H, W, 3], exo_frames float[B, T, H, W, 3],
        input_ids, labels, attention_mask (the narration, as a caption)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from exo2ego_jax import losses
from exo2ego_jax.models import splice
from exo2ego_jax.models.exo2ego import Exo2Ego, Fusion, Params

STAGES = (0, 1, 2, 3)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage's recipe (every ablation of method.md §6 is a field here).

    Attributes:
      stage: 0 (initialization), 1 (demonstrator self-preparation), 2 (demonstrator-learner
        guidance), 3 (learner self-practice).
      train_clip: also train the CLIP towers of the encoders this stage trains (a randomly
        initialised tower must train; pretrained CLIP stays frozen by default).
      stage0_encoders: which encoders stage 0 initialises (``"ego"``, ``"exo"`` or both).
      lambda_vtg, lambda_kl, lambda_ccl: stage-2 loss weights (method.md: 1, 1, 1).
      use_kl: the KL "migration" term (ablation "no KL": False).
      use_ccl: the cycle-consistency term; False also leaves G untrained (ablation "no G and
        no CCL").
      ccl_forward_only: keep only ``|G(F(x)) − x|`` (ablation "forward cycle only").
      kl_temperature: τ of the KL term.
      train_lora: stage 3 trains LoRA adapters (ablation "no LoRA": False).
      fusion: override of the model's fusion for this stage's VTG (None = model's).
    """

    stage: int
    train_clip: bool = False
    stage0_encoders: tuple[str, ...] = ("ego", "exo")
    lambda_vtg: float = 1.0
    lambda_kl: float = 1.0
    lambda_ccl: float = 1.0
    use_kl: bool = True
    use_ccl: bool = True
    ccl_forward_only: bool = False
    kl_temperature: float = 1.0
    train_lora: bool = True
    fusion: Fusion | None = None

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"StageConfig.stage={self.stage!r}; expected one of {STAGES}")
        object.__setattr__(self, "stage0_encoders", tuple(self.stage0_encoders))
        bad = set(self.stage0_encoders) - {"ego", "exo"}
        if bad or not self.stage0_encoders:
            raise ValueError(
                f"StageConfig.stage0_encoders={self.stage0_encoders}; use a non-empty subset of "
                "('ego', 'exo')"
            )

    @property
    def batches(self) -> tuple[str, ...]:
        """The named sub-batches one step of this stage reads."""
        if self.stage == 0:
            return tuple(f"{e}_caption" for e in self.stage0_encoders)
        return {1: ("exo_caption",), 2: ("pair",), 3: ("instruct",)}[self.stage]


# ----------------------------------------------------------------------------- parameters


def _encoder_patterns(name: str, train_clip: bool) -> list[str]:
    parts = ["connector"] + (["clip"] if train_clip else [])
    return [rf"^{name}/{p}/" for p in parts]


def trainable_patterns(stage: StageConfig, model: Exo2Ego) -> tuple[str, ...]:
    """Regexes over ``'/'``-joined parameter paths selecting the stage's trainable leaves."""
    cfg = model.config
    pats: list[str] = []
    if stage.stage == 0:
        for enc in stage.stage0_encoders:
            if enc == "exo" and not cfg.with_exo:
                raise ValueError("stage 0 cannot train the exo encoder of a model without one")
            pats += _encoder_patterns(f"{enc}_encoder", stage.train_clip)
    elif stage.stage == 1:
        if not cfg.with_exo:
            raise ValueError("stage 1 trains E_exo; this model has none (config.with_exo=False)")
        pats += _encoder_patterns("exo_encoder", stage.train_clip)
    elif stage.stage == 2:
        if not (cfg.with_exo and cfg.with_mapping):
            raise ValueError("stage 2 needs E_exo, F and G (with_exo and with_mapping True)")
        pats += _encoder_patterns("ego_encoder", stage.train_clip) + [r"^F/"]
        if stage.use_ccl:
            pats.append(r"^G/")
    else:
        pats += _encoder_patterns("ego_encoder", stage.train_clip)
        if _stage_fusion(stage, model) != "x_only":
            pats.append(r"^F/")
        if stage.train_lora:
            if cfg.llm.lora is None:
                raise ValueError(
                    "stage 3 with train_lora=True needs LoRA in the model (config.llm.lora); "
                    "set train_lora=False for the no-LoRA ablation"
                )
            pats.append(r"^llm/.*/lora_[ab]$")
    return tuple(pats)


def trainable_paths(params: Params, patterns: tuple[str, ...]) -> list[str]:
    """The ``'/'``-joined paths of ``params`` matched by ``patterns`` (sorted)."""
    regex = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    flat = traverse_util.flatten_dict(params, sep="/")
    return sorted(k for k in flat if regex is not None and regex.search(k))


def split_params(params: Params, patterns: tuple[str, ...]) -> tuple[Params, Params]:
    """``(trainable, frozen)``: two disjoint nested dicts whose union is ``params``."""
    flat = traverse_util.flatten_dict(params, sep="/")
    chosen = set(trainable_paths(params, patterns))
    if not chosen:
        raise ValueError(f"no parameter matches the trainable patterns {patterns}")
    trainable = {k: v for k, v in flat.items() if k in chosen}
    frozen = {k: v for k, v in flat.items() if k not in chosen}
    return (
        traverse_util.unflatten_dict(trainable, sep="/"),
        traverse_util.unflatten_dict(frozen, sep="/"),
    )


def merge_params(trainable: Params, frozen: Params) -> Params:
    """Inverse of :func:`split_params`."""
    flat = traverse_util.flatten_dict(frozen, sep="/")
    flat.update(traverse_util.flatten_dict(trainable, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def count_params(tree: Params) -> int:
    """Number of scalars in a tree of arrays or ``ShapeDtypeStruct``."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- losses


def _stage_fusion(stage: StageConfig, model: Exo2Ego) -> Fusion:
    return stage.fusion or model.config.fusion


def visual_tokens(stage: StageConfig, model: Exo2Ego) -> int:
    """Tokens that replace ``<video>`` in this stage's LLM input: one clip's (stages 0 and 1
    caption one encoder's tokens) or the stage's fusion of ``x`` and ``F(x)`` (2 and 3)."""
    cfg = model.config
    if stage.stage < 2:
        return cfg.tokens_per_clip
    return cfg.tokens_per_clip * (2 if _stage_fusion(stage, model) == "concat_seq" else 1)


def text_positions(input_ids: jax.Array, num_visual: int, sentinel: int) -> jax.Array:
    """``int[B, L]``: where the text after each row's ``<video>`` sits in the spliced
    sequence, starting one position early (the logits there predict the first text token).

    Row ``b`` with its sentinel at ``p_b`` is ``text[:p_b] + visual(N) + text[p_b + 1:]``
    (length ``L + N - 1``); position ``p_b + N - 1 + j`` predicts text token ``p_b + 1 + j``.
    Indices past the end are clamped (their labels are masked by :func:`_gather_labels`).
    """
    p = splice.placeholder_positions(input_ids, sentinel)  # [B]
    length = input_ids.shape[1]
    idx = p[:, None] + num_visual - 1 + jnp.arange(length, dtype=jnp.int32)[None, :]
    return jnp.minimum(idx, length + num_visual - 2)


def _gather_labels(labels: jax.Array, idx: jax.Array) -> jax.Array:
    """``labels[b, idx[b, j]]``, IGNORE where an index was clamped (a repeated position)."""
    picked = jnp.take_along_axis(labels, idx, axis=1)
    repeated = jnp.concatenate([jnp.zeros_like(idx[:, :1], bool), idx[:, 1:] == idx[:, :-1]], 1)
    return jnp.where(repeated, losses.IGNORE_INDEX, picked)


def _caption_vtg(
    model: Exo2Ego, params: Params, visual: jax.Array, b: Mapping[str, jax.Array], **kw: Any
) -> tuple[jax.Array, jax.Array]:
    """VTG of a captioned / instructed batch with the LM head applied only where a label can
    be: on the text after the visual tokens (VideoLLaMA2's templates supervise nothing
    before ``<video>``). At stage 3 that skips the ~3k visual positions of ``[x; F(x)]``."""
    embeds, mask, labels = model.embed_multimodal(
        params, b["input_ids"], visual, b["attention_mask"], b["labels"]
    )
    idx = text_positions(b["input_ids"], visual.shape[1], model.config.video_token_index)
    logits = model.lm_logits(params, embeds, mask, logits_index=idx, **kw)
    return losses.vtg_loss(logits, _gather_labels(labels, idx))


def stage_loss(
    model: Exo2Ego,
    stage: StageConfig,
    trainable: Params,
    frozen: Params,
    batch: Mapping[str, Mapping[str, jax.Array]],
    rng: jax.Array | None = None,
    *,
    deterministic: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage's total loss and its components; differentiate w.r.t. ``trainable`` only.

    ``rng`` drives LoRA dropout when ``deterministic=False``.
    """
    params = merge_params(trainable, frozen)
    kw = {"deterministic": deterministic, "rng": rng}
    metrics: dict[str, jax.Array] = {}
    s = stage.stage
    if s in (0, 1):
        total = jnp.float32(0.0)
        for name in stage.batches:
            b = batch[name]
            if name == "ego_caption":
                visual = model.encode_ego(params, b["frames"])
            else:
                visual = model.encode_exo(params, b["frames"])
            vtg, n = _caption_vtg(model, params, visual, b, **kw)
            metrics[f"vtg_{name.split('_')[0]}"] = vtg
            metrics[f"tokens_{name.split('_')[0]}"] = n
            total = total + vtg
        metrics["vtg"] = total
    elif s == 2:
        b = batch["pair"]
        fusion = _stage_fusion(stage, model)
        x = model.encode_ego(params, b["ego_frames"])
        fx = model.map_ego_to_exo(params, x)
        y = jax.lax.stop_gradient(model.encode_exo(params, b["exo_frames"]))
        vtg, n = _caption_vtg(model, params, model.fuse(x, fx, fusion), b, **kw)
        total = stage.lambda_vtg * vtg
        metrics.update(vtg=vtg, tokens=n)
        if stage.use_kl:
            kl = losses.kl_migration_loss(y, fx, temperature=stage.kl_temperature)
            total = total + stage.lambda_kl * kl
            metrics["kl"] = kl
        if stage.use_ccl:
            gfx = model.map_exo_to_ego(params, fx)
            fgy = None
            if not stage.ccl_forward_only:
                fgy = model.map_ego_to_exo(params, model.map_exo_to_ego(params, y))
            ccl = losses.cycle_consistency_loss(x, gfx, y, fgy, forward_only=stage.ccl_forward_only)
            total = total + stage.lambda_ccl * ccl
            metrics["ccl"] = ccl
    else:
        b = batch["instruct"]
        visual, _, _ = model.ego_visual_tokens(params, b["frames"], _stage_fusion(stage, model))
        vtg, n = _caption_vtg(model, params, visual, b, **kw)
        total = vtg
        metrics.update(vtg=vtg, tokens=n)
    metrics["loss"] = total
    return total, metrics


# ----------------------------------------------------------------------------- train step


def make_train_step(model: Exo2Ego, stage: StageConfig, optimizer: optax.GradientTransformation):
    """``step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)``.

    Pure and jit-able; ``frozen`` is an ordinary (non-differentiated) argument.
    """

    def loss_fn(trainable, frozen, batch, rng):
        return stage_loss(model, stage, trainable, frozen, batch, rng, deterministic=rng is None)

    def step(trainable, opt_state, frozen, batch, rng=None):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, rng
        )
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return trainable, opt_state, metrics

    return step


def param_table(model: Exo2Ego, stages: list[StageConfig]) -> list[tuple[str, int, int]]:
    """``(stage name, total params, trainable params)`` from abstract shapes (no allocation)."""
    abstract = model.abstract_params()
    total = count_params(abstract)
    rows = []
    for st in stages:
        patterns = trainable_patterns(st, model)
        flat = traverse_util.flatten_dict(abstract, sep="/")
        n = sum(int(flat[k].size) for k in trainable_paths(abstract, patterns))
        rows.append((f"stage {st.stage}", total, n))
    return rows
