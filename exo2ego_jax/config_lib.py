"""Resolves an ml_collections config once, at the entry: every field validated, then the
model / stage / sharding objects the rest of the code takes.

Everything here runs before any compute, so a bad field fails in seconds with a message that
names the field and the fix. Entry points (``main.py``, ``training.loop.train``,
``eval.evaluate``, ``chat``, ``tools.memory_plan``) call :func:`resolve` once and pass the
:class:`ResolvedConfig` down.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from exo2ego_jax.models import exo2ego, remat
from exo2ego_jax.models.attention import (
    ATTENTION_IMPLS,
    AttentionImplError,
    check_attention_impl,
    current_backend,
)
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mapping import MappingConfig
from exo2ego_jax.sharding import MESH_AXES, LogicalRules, batch_ways, rules_for
from exo2ego_jax.stages import StageConfig

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


PRNG_IMPLS = ("", "threefry2x32", "rbg", "unsafe_rbg")


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and what to do."""


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every dotted field path of ``config`` (``["seed", "optim.lr", ...]``)."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            out += field_paths(value, f"{path}.")
    return out


def _is_abbreviation(short: str, long: str) -> bool:
    """``lr`` of ``learning_rate``: the same first letter, the rest in order."""
    short, long = short.replace("_", ""), long.replace("_", "")
    if len(short) < 2 or short[0] != long[0] or len(short) >= len(long):
        return False
    rest = iter(long)
    return all(ch in rest for ch in short)


def closest_fields(paths: list[str], path: str, n: int = 3) -> list[str]:
    """The valid field paths most like the misspelled ``path``: siblings first (by spelling
    or as an abbreviation of the leaf), then any path spelled alike."""
    parent, _, leaf = path.rpartition(".")
    scored = []
    for p in paths:
        p_parent, _, p_leaf = p.rpartition(".")
        score = difflib.SequenceMatcher(None, leaf, p_leaf).ratio()
        if _is_abbreviation(p_leaf, leaf) or _is_abbreviation(leaf, p_leaf):
            score = max(score, 0.9)
        if p_parent != parent:
            score = min(score, difflib.SequenceMatcher(None, path, p).ratio()) - 0.05
        if score >= 0.6:
            scored.append((score, p))
    return [p for _, p in sorted(scored, key=lambda t: -t[0])[:n]]


def check_override_paths(config: ml_collections.ConfigDict, argv: list[str], flag: str = "config"):
    """Refuses ``--config.<path>=...`` arguments naming no field of ``config``, naming the
    closest valid fields (ml_collections itself raises a bare ``AttributeError``)."""
    paths = field_paths(config)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        path = arg[len(flag) + 3 :].split("=", 1)[0]
        if path in paths:
            continue
        close = closest_fields(paths, path)
        hint = f"; did you mean {', '.join(f'--{flag}.{c}' for c in close)}?" if close else ""
        raise ConfigError(f"--{flag}.{path}: the config has no field {path!r}{hint}")


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """A validated config and what it resolves to (built once per run)."""

    config: ml_collections.ConfigDict
    model: exo2ego.Exo2EgoConfig
    stage: StageConfig
    rules: LogicalRules

    @property
    def is_inference(self) -> bool:
        """Evaluation or chat (``config.run``), rather than training a stage."""
        return self.config.get("run", "train") != "train"


def _dtype(field: str, name: str):
    if name not in _DTYPES:
        raise ConfigError(f"config.{field}={name!r}: use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def build_model_config(m: ml_collections.ConfigDict) -> exo2ego.Exo2EgoConfig:
    """``config.model`` -> :class:`Exo2EgoConfig` (architecture presets + overrides)."""
    dtype = _dtype("model.dtype", m.dtype)
    pdtype = _dtype("model.param_dtype", m.param_dtype)
    if m.size not in ("tiny", "paper"):
        raise ConfigError(f"config.model.size={m.size!r}: use 'tiny' or 'paper'")
    if m.remat_policy not in remat.REMAT_POLICIES:
        raise ConfigError(
            f"config.model.remat_policy={m.remat_policy!r}: use one of "
            + ", ".join(remat.REMAT_POLICIES)
        )
    attention_impl = m.get("attention_impl", "auto")
    if attention_impl not in ATTENTION_IMPLS:
        raise ConfigError(
            f"config.model.attention_impl={attention_impl!r}: use one of "
            + ", ".join(ATTENTION_IMPLS)
        )
    lora = None
    if m.lora.enabled:
        lora = LoRAConfig(
            rank=m.lora.rank,
            alpha=m.lora.alpha,
            dropout=m.lora.dropout,
            targets=tuple(m.lora.targets),
        )
    if m.size == "paper":
        base = exo2ego.paper()
    else:
        base = exo2ego.tiny()
    patch = m.get("patch_size", 0) or base.clip.patch_size
    if m.image_size % patch:
        raise ConfigError(
            f"config.model.image_size={m.image_size} is not a multiple of the CLIP patch size "
            f"{patch}; use e.g. {m.image_size - m.image_size % patch or patch}"
        )
    clip = dataclasses.replace(
        base.clip,
        image_size=m.image_size,
        patch_size=patch,
        dtype=dtype,
        param_dtype=pdtype,
        remat=m.remat_policy,
        attention_impl=attention_impl,
    )
    shape = {k: v for k, v in m.get("llm", {}).items() if v}  # 0 = the preset's
    if "hidden_size" in shape or "num_heads" in shape:
        shape["head_dim"] = None  # recomputed as hidden_size // num_heads
    heads = {k: shape.get(k, getattr(base.llm, k)) for k in ("hidden_size", "num_heads")}
    heads["num_kv_heads"] = shape.get("num_kv_heads", base.llm.num_kv_heads)
    if heads["hidden_size"] % heads["num_heads"] or heads["num_heads"] % heads["num_kv_heads"]:
        raise ConfigError(
            "config.model.llm: LLM heads do not divide: "
            + ", ".join(f"{k}={v}" for k, v in heads.items())
        )
    llm = dataclasses.replace(
        base.llm,
        **shape,
        vocab_size=m.vocab_size,
        dtype=dtype,
        param_dtype=pdtype,
        remat_policy=m.remat_policy,
        attention_impl=attention_impl,
        lora=lora,
    )
    connector = dataclasses.replace(
        base.connector, out_size=llm.hidden_size, dtype=dtype, param_dtype=pdtype
    )
    try:
        mapping = MappingConfig(
            kind=m.mapping.kind,
            ngf=m.mapping.ngf,
            n_blocks=m.mapping.n_blocks,
            norm=m.mapping.norm,
            dtype=dtype,
            param_dtype=pdtype,
        )
        return exo2ego.Exo2EgoConfig(
            clip=clip,
            connector=connector,
            mapping=mapping,
            llm=llm,
            num_frames=m.num_frames,
            select_layer=m.select_layer,
            fusion=m.fusion,
            video_token_index=m.video_token_index,
            with_exo=m.with_exo,
            with_mapping=m.with_mapping,
        )
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from e


def build_stage_config(s: ml_collections.ConfigDict) -> StageConfig:
    try:
        return StageConfig(
            stage=s.stage,
            train_clip=s.train_clip,
            stage0_encoders=tuple(s.stage0_encoders),
            lambda_vtg=s.lambda_vtg,
            lambda_kl=s.lambda_kl,
            lambda_ccl=s.lambda_ccl,
            use_kl=s.use_kl,
            use_ccl=s.use_ccl,
            ccl_forward_only=s.ccl_forward_only,
            kl_temperature=s.kl_temperature,
            train_lora=s.train_lora,
            fusion=s.fusion or None,
        )
    except ValueError as e:
        raise ConfigError(f"config.stage: {e}") from e


# ----------------------------------------------------------------------------- ranges

_Range = tuple[str, Callable[[Any], bool], str]


def _num(lo: float | None = None, hi: float | None = None, *, lo_open=False, hi_open=False):
    """A predicate for an int / float in a (half-)open or closed range, and its text."""

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return False
        if lo is not None and (v <= lo if lo_open else v < lo):
            return False
        return not (hi is not None and (v >= hi if hi_open else v > hi))

    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    text = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    return ok, text


def _int(lo: int, hi: int | None = None):
    ok_num, text = _num(lo, hi)
    return (lambda v: isinstance(v, int) and ok_num(v)), f"an integer in {text}"


def _positive():
    ok, _ = _num(0, lo_open=True)
    return ok, "a number > 0"


def _fraction(hi_open: bool = True):
    ok, text = _num(0, 1, hi_open=hi_open)
    return ok, f"a number in {text}"


#: Every numeric field with a meaningful range: ``(dotted path, predicate, allowed range)``.
RANGES: tuple[_Range, ...] = (
    ("seed", *_int(0)),
    ("log_every", *_int(1)),
    ("model.num_frames", *_int(1)),
    ("model.image_size", *_int(1)),
    ("model.patch_size", *_int(0)),
    ("model.vocab_size", *_int(1)),
    ("model.mapping.ngf", *_int(1)),
    ("model.mapping.n_blocks", *_int(0)),
    ("model.lora.rank", *_int(1)),
    ("model.lora.alpha", *_positive()),
    ("model.lora.dropout", *_fraction()),
    ("stage.lambda_vtg", *_num(0)),
    ("stage.lambda_kl", *_num(0)),
    ("stage.lambda_ccl", *_num(0)),
    ("stage.kl_temperature", *_positive()),
    ("data.max_text_len", *_int(2)),
    ("data.workers", *_int(0)),
    ("data.max_bad_fraction", *_fraction(hi_open=False)),
    ("optim.batch_size", *_int(1)),
    ("optim.lr", *_positive()),
    ("optim.warmup_ratio", *_fraction(hi_open=False)),
    ("optim.num_epochs", *_int(0)),
    ("optim.weight_decay", *_num(0)),
    ("optim.b1", *_fraction()),
    ("optim.b2", *_fraction()),
    ("optim.eps", *_positive()),
    ("optim.grad_clip", *_num(0)),
    ("optim.grad_accum", *_int(1)),
    ("checkpoint.every_steps", *_int(1)),
    ("checkpoint.keep", *_int(1)),
    ("chat.max_new_tokens", *_int(1)),
    ("chat.temperature", *_num(0)),
    ("chat.top_p", *_num(0, 1, lo_open=True)),
    ("web.max_upload_mb", *_positive()),
    ("web.max_seconds", *_positive()),
    ("web.max_question_chars", *_int(1)),
    ("web.max_turns", *_int(0)),
    ("web.num_examples", *_int(0)),
    ("web.max_queue", *_int(1)),
    ("web.warmup_buckets", *_int(1)),
)


def check_ranges(config: ml_collections.ConfigDict) -> None:
    """Refuses, before any compute, a numeric field outside its range (:data:`RANGES`),
    naming the field, the value and the allowed range."""
    values = dict(_flat_items(config))
    for path, ok, allowed in RANGES:
        if path not in values:
            continue
        if path.startswith("model.lora.") and not config.model.lora.enabled:
            continue
        value = values[path]
        if not ok(value):
            raise ConfigError(f"config.{path}={value!r}: must be {allowed}")
    o = config.optim
    if not (o.num_steps == -1 or (isinstance(o.num_steps, int) and o.num_steps >= 1)):
        raise ConfigError(f"config.optim.num_steps={o.num_steps!r}: must be -1 (epochs) or >= 1")
    if o.num_steps == -1 and o.num_epochs < 1:
        raise ConfigError(
            f"config.optim.num_epochs={o.num_epochs!r}: must be >= 1 (or set "
            "config.optim.num_steps > 0)"
        )


def _flat_items(config: ml_collections.ConfigDict, prefix: str = ""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _check_pretrained(config: ml_collections.ConfigDict) -> None:
    """A paper-size model must start from pretrained CLIP and Mistral weights.

    Stage checkpoints hold only what each stage trained (never the frozen LLM or CLIP), so
    without ``init.llm`` / ``init.clip`` (or ``init.converted``) the run would train on top
    of random towers and a random 7B LLM.
    """
    init = config.init
    if config.model.size != "paper" or init.get("allow_random", False):
        return
    missing = [f for f in ("clip", "llm") if not (init.get(f) or init.get("converted"))]
    if missing:
        fields = " and ".join(f"config.init.{f}" for f in missing)
        raise ConfigError(
            f"{fields} empty: this paper-size run would start from randomly initialised "
            f"{' and '.join('CLIP' if f == 'clip' else 'LLM' for f in missing)} weights. Set "
            "--config.init.clip=<HF CLIP dir> and --config.init.llm=<HF Mistral dir> (or "
            "--config.init.converted=<tools.convert output>), or pass "
            "--config.init.allow_random=True to train from scratch on purpose"
        )


def check_backend(m: ml_collections.ConfigDict, backend: str | None = None) -> None:
    """``config.model`` fields that the backend (default: the running one) cannot run: an
    attention kernel it lacks, host offload without a ``pinned_host`` memory space."""
    backend = backend or current_backend()
    try:
        check_attention_impl(m.get("attention_impl", "auto"), backend)
    except AttentionImplError as e:
        raise ConfigError(f"config.model.attention_impl: {e}") from e
    if remat.offloads(m.remat_policy) and not remat.host_offload_supported():
        raise ConfigError(
            f"config.model.remat_policy={m.remat_policy!r} offloads to host memory, which "
            f"the {backend!r} backend lacks (no 'pinned_host' memory space); use "
            f"{m.remat_policy.replace('offload_', 'save_')!r} instead"
        )


def resolve(
    config: ml_collections.ConfigDict, *, num_devices: int | None = None, check_inputs: bool = True
) -> ResolvedConfig:
    """Validates every field and cross-field constraint (and what the backend can run:
    :func:`check_backend`), then builds the model, stage and sharding objects.
    ``num_devices`` defaults to ``jax.device_count()``; ``check_inputs=False`` skips the
    checks of input paths (planning without data)."""
    check_ranges(config)
    if config.get("prng_impl", "") not in PRNG_IMPLS:
        raise ConfigError(
            f"config.prng_impl={config.prng_impl!r}: use one of {PRNG_IMPLS} ('' = JAX's default)"
        )
    n = num_devices if num_devices is not None else jax.device_count()
    shape = list(config.mesh.shape)
    if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"config.mesh.shape={tuple(shape)}: give 3 positive sizes, at most one -1"
        )
    known = math.prod(s for s in shape if s != -1)
    if (-1 in shape and n % known) or (-1 not in shape and known != n):
        raise ConfigError(
            f"config.mesh.shape={tuple(shape)} does not match the {n} available devices; "
            f"use e.g. --config.mesh.shape='({n},1,1)' or put -1 on one axis"
        )
    o = config.optim
    if o.batch_size % (o.grad_accum or 1):
        raise ConfigError(
            f"config.optim.batch_size={o.batch_size} must be divisible by "
            f"config.optim.grad_accum={o.grad_accum}"
        )
    filled = dict(zip(MESH_AXES, (n // known if s == -1 else s for s in shape), strict=True))
    try:
        rules = rules_for(config.mesh.rules, config.mesh.get("rule_overrides"))
    except ValueError as e:
        raise ConfigError(f"config.mesh.rules: {e}") from e
    data_ways = batch_ways(filled, rules)  # devices the batch is split over
    micro = o.batch_size // (o.grad_accum or 1)
    if micro % data_ways:
        raise ConfigError(
            f"config.optim.batch_size={o.batch_size} (micro-batch {micro}) is not divisible by "
            f"the {data_ways} data-parallel devices of mesh {tuple(shape)}"
        )
    if config.data.on_bad_video not in ("skip", "raise"):
        raise ConfigError(f"config.data.on_bad_video={config.data.on_bad_video!r}: skip | raise")
    stage = build_stage_config(config.stage)
    model = build_model_config(config.model)
    check_backend(config.model)
    if check_inputs:
        for i, wd in enumerate(config.init.stages):
            if not Path(wd).is_dir():
                raise ConfigError(
                    f"config.init.stages[{i}]={wd!r}: no such workdir. Run that stage first "
                    "(python main.py --config=configs/stageN.py) or point the field at its workdir"
                )
        for field in ("clip", "llm", "mm_projector", "converted"):
            path = config.init.get(field, "")
            if path and not Path(path).exists():
                raise ConfigError(f"config.init.{field}={path!r}: not found")
        _check_pretrained(config)
    return ResolvedConfig(config, model, stage, rules)
