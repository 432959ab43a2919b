"""LoRA adapters of :class:`MistralLM` <-> a Hugging Face PEFT adapter directory.

A PEFT LoRA adapter is ``adapter_config.json`` + ``adapter_model.safetensors``;
``peft.PeftModel.from_pretrained(MistralForCausalLM(...), dir)`` puts it on its base model.
Our ``LoRADense`` computes ``x @ kernel + (alpha / r) · x @ lora_a @ lora_b``, PEFT's
``lora.Linear`` computes ``base(x) + (lora_alpha / r) · lora_B(lora_A(x))``, so the two
are one to one (:func:`param_mappings`, derived from the base table
``hf_mistral.param_mappings`` so the module names are written once)::

    ours (layer-stacked)                            PEFT tensor of layer i
    layers/self_attn/q_proj/lora_a  [L, in, r]      base_model.model.model.layers.{i}
                                                        .self_attn.q_proj.lora_A.weight  [r, in]
    layers/self_attn/q_proj/lora_b  [L, r, out]     ... .self_attn.q_proj.lora_B.weight  [out, r]
    (the same for k_proj, v_proj, o_proj and mlp.gate_proj, mlp.up_proj, mlp.down_proj)

``adapter_config.json`` holds ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``
and ``base_model_name_or_path``; only fields every PEFT release since 0.9 reads are
written (a newer PEFT fills in its defaults, an older one would refuse unknown fields).
Reading an adapter back (:func:`load_peft_adapter`) refuses the PEFT variants whose
arithmetic differs from ours (rsLoRA, DoRA, per-module ranks, biases, ``fan_in_fan_out``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from exo2ego_jax.models.lora import ALL_PROJECTIONS, LoRAConfig
from exo2ego_jax.models.mistral import MistralConfig
from exo2ego_jax.weights import hf_mistral
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.param_map import (
    ParamMapping,
    check_tensors,
    iter_hf_tensors,
    read_params,
    unmapped,
)
from exo2ego_jax.weights.safetensors_format import write_safetensors_file
from exo2ego_jax.weights.tensors import TensorSource
from input_pipeline import atomic

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: PEFT's prefix of every tensor name: ``PeftModel.base_model`` (a ``LoraModel``) wraps the
#: ``MistralForCausalLM`` as ``.model``.
PREFIX = "base_model.model."


def _number(x: float) -> int | float:
    """``256.0`` -> ``256`` (PEFT writes an int alpha); non-integral values stay floats."""
    return int(x) if float(x).is_integer() else float(x)


def param_mappings(config: MistralConfig) -> list[ParamMapping]:
    """Every adapter of ``MistralLM(config)`` (``lora_a`` / ``lora_b`` of each targeted
    projection) and its PEFT tensor names, in checkpoint order."""
    if config.lora is None:
        raise CheckpointError("the model has no LoRA adapters (its MistralConfig.lora is None)")
    r = config.lora.rank
    maps = []
    for m in hf_mistral.param_mappings(config):
        if m.path[-1] != "kernel" or m.path[-2] not in config.lora.targets:
            continue
        out, d_in = m.hf_shape  # HF Linear [out, in]
        stems = [PREFIX + name.removesuffix(".weight") for name in m.hf_names]
        parent = m.path[:-1]
        for leaf, suffix, hf_shape in (("lora_a", "A", (r, d_in)), ("lora_b", "B", (out, r))):
            maps.append(
                ParamMapping(
                    (*parent, leaf),
                    tuple(f"{s}.lora_{suffix}.weight" for s in stems),
                    hf_shape,
                    hf_shape[::-1],
                    (1, 0),
                    m.stacked,
                )
            )
    return maps


def adapter_config(lora: LoRAConfig, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` object of a PEFT LoRA adapter with ``lora``'s settings."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": lora.rank,
        "lora_alpha": _number(lora.alpha),
        "lora_dropout": float(lora.dropout),
        "target_modules": sorted(lora.targets, key=ALL_PROJECTIONS.index),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
    }


def save_peft_adapter(
    config: MistralConfig,
    params: dict,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
) -> Path:
    """Writes the adapters of ``params`` as a PEFT LoRA adapter directory, atomically.

    Args:
      config: the LLM's config; ``config.lora`` gives ``r``, ``lora_alpha``, the targets.
      params: ``MistralLM`` params (inner dict or ``{"params": ...}``, boxed or not) holding
        ``lora_a`` / ``lora_b`` beside every targeted kernel.
      out_dir: the adapter directory (replaced if it exists).
      base_model_name_or_path: recorded in ``adapter_config.json`` (a hub id or a path of
        the base ``MistralForCausalLM`` the adapter belongs to).
      dtype: tensor dtype (default: the params').

    Raises:
      CheckpointError: the config has no LoRA, or an adapter is missing or misshapen.
    """
    tensors = iter_hf_tensors(param_mappings(config), params)
    if dtype is not None:
        tensors = ((n, a.astype(np.dtype(dtype), copy=False)) for n, a in tensors)
    tensors = list(tensors)  # every adapter checked before anything is written
    text = json.dumps(adapter_config(config.lora, base_model_name_or_path), indent=2) + "\n"
    with atomic.staged_dir(out_dir) as stage:
        write_safetensors_file(stage / WEIGHTS_FILE, tensors)
        atomic.write_text(stage / CONFIG_FILE, text)
    return Path(out_dir)


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a PEFT adapter directory needs it")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: a JSON {type(cfg).__name__}, not an object")
    return cfg


def read_lora_config(path: str | os.PathLike) -> LoRAConfig:
    """The :class:`LoRAConfig` of a PEFT adapter directory's ``adapter_config.json``.

    Raises :class:`CheckpointError` naming the field for an adapter this model cannot run
    exactly (another PEFT type, rsLoRA, DoRA, biases, per-module ranks or alphas, a subset
    of layers, ``fan_in_fan_out``, targets other than the seven projections).
    """
    path = Path(path)
    cfg = _read_adapter_config(path)
    where = path / CONFIG_FILE
    unsupported = {
        "peft_type": ("LORA",),
        "bias": ("none", None),
        "use_rslora": (False, None),
        "use_dora": (False, None),
        "fan_in_fan_out": (False, None),
        "layers_to_transform": (None,),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        "modules_to_save": (None, []),
    }
    for field, allowed in unsupported.items():
        if cfg.get(field, allowed[0]) not in allowed:
            raise CheckpointError(
                f"{where}: field {field!r} = {cfg[field]!r} is not supported (this model runs "
                f"plain LoRA on Mistral's projections; expected {allowed[0]!r})"
            )
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not set(targets) <= set(ALL_PROJECTIONS) or not targets:
        raise CheckpointError(
            f"{where}: field 'target_modules' = {targets!r}; expected a list drawn from "
            f"{list(ALL_PROJECTIONS)}"
        )
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{where}: field 'r' = {r!r} must be a positive integer")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise CheckpointError(f"{where}: field 'lora_alpha' = {alpha!r} must be a number")
    return LoRAConfig(
        rank=r,
        alpha=alpha,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        targets=tuple(t for t in ALL_PROJECTIONS if t in targets),
    )


def load_peft_adapter(
    path: str | os.PathLike, config: MistralConfig, dtype: Any = np.float32
) -> tuple[LoRAConfig, dict]:
    """Reads a PEFT LoRA adapter directory for the base model of ``config``.

    Returns ``(lora, adapters)``: the adapter's :class:`LoRAConfig` and a params tree holding
    only the ``lora_a`` / ``lora_b`` leaves (set them into the params of
    ``MistralLM(dataclasses.replace(config, lora=lora))``). Every tensor is checked (present,
    shape, float dtype) before any is read.
    """
    lora = read_lora_config(path)
    mappings = param_mappings(dataclasses.replace(config, lora=lora))
    source = TensorSource(Path(path) / WEIGHTS_FILE)
    check_tensors(source, mappings, f" (r={lora.rank} from {CONFIG_FILE})")
    leftover = unmapped(source.names(), mappings)
    if leftover:
        raise CheckpointError(
            f"{source.where}: {len(leftover)} tensors have no place in this model's adapters, "
            f"e.g. {leftover[:3]}"
        )
    return lora, read_params(source, mappings, dtype)
