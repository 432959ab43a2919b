"""``config.json`` of a Hugging Face checkpoint: read it and check its fields first.

The HF loaders and the converter check every field they use (present, of the right JSON
type, within a sane range) before building a model config or allocating anything, so a
corrupted or hostile ``config.json`` gives one :class:`CheckpointError` naming the file
and the field (``hidden_size: 10**12`` is refused here, not met as a ``MemoryError``).
Each model's table of fields lives with its loader (``hf_clip.CONFIG_FIELDS``,
``hf_mistral.CONFIG_FIELDS``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from exo2ego_jax.weights.errors import CheckpointError

_KINDS = {
    "int": "an integer",
    "number": "a number",
    "bool": "true or false",
    "str": "a string",
    "str_list": "a list of strings",
    "object": "an object",
}


@dataclasses.dataclass(frozen=True)
class Field:
    """One ``config.json`` field: JSON kind, whether it must be present, its sane range.

    Attributes:
      name: the key in ``config.json``.
      kind: ``"int"`` (a JSON integer: not a string, float or bool), ``"number"`` (int or
        finite float), ``"bool"``, ``"str"``, ``"str_list"`` or ``"object"``.
      required: must be present (optional fields take the HF default when absent).
      nullable: ``null`` is allowed and means the HF default / "off".
      low, high: inclusive bounds of an int or number.
    """

    name: str
    kind: Literal["int", "number", "bool", "str", "str_list", "object"]
    required: bool = False
    nullable: bool = False
    low: float | None = None
    high: float | None = None


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` object of a Hugging Face model directory (fields not checked)."""
    cfg_path = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{cfg_path}: missing. A Hugging Face checkpoint directory needs config.json beside "
            "its *.safetensors files (save the model with save_pretrained)."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: a JSON {type(config).__name__}, not an object")
    return config


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, dict)


def check_fields(config: Mapping[str, Any], fields: Sequence[Field], where: str) -> None:
    """Raises :class:`CheckpointError` at the first field of ``fields`` that is wrong.

    ``where`` starts each message (``".../config.json"``, or with ``" vision_config"``).
    """
    for f in fields:
        if f.name not in config:
            if f.required:
                raise CheckpointError(f"{where}: required field {f.name!r} is missing")
            continue
        value = config[f.name]
        if value is None and f.nullable:
            continue
        if not _has_kind(value, f.kind):
            raise CheckpointError(
                f"{where}: field {f.name!r} must be {_KINDS[f.kind]}, got {value!r} "
                f"({type(value).__name__})"
            )
        too_low = f.low is not None and value < f.low
        if too_low or (f.high is not None and value > f.high):
            raise CheckpointError(
                f"{where}: field {f.name!r} = {value} is outside its sane range "
                f"[{f.low}, {f.high}]; the file is corrupted or not of this model"
            )


def check_divides(config: Mapping[str, Any], divisor: str, dividend: str, where: str) -> None:
    """Raises unless ``config[dividend]`` is a multiple of ``config[divisor]`` (both ints)."""
    if config[dividend] % config[divisor]:
        raise CheckpointError(
            f"{where}: field {dividend!r} = {config[dividend]} is not divisible by "
            f"{divisor!r} = {config[divisor]}"
        )
