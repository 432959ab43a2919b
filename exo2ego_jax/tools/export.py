r"""Export a trained model in formats other code loads.

    python -m exo2ego_jax.tools.export --config=configs/eval.py[:demo|:paper] --out=DIR \
        [--what=hf,peft,projector,mapping[,clip]] [--base_model=HUB_ID_OR_DIR] \
        [--dtype=float32|bfloat16|float16] [--projector_bin] [--overwrite] \
        [--config.init.stages="('runs/stage0','runs/stage1','runs/stage2','runs/stage3')" ...]

The model is assembled exactly as evaluation assembles it (``runtime.load_trained``: random
init -> ``config.init`` pretrained weights -> every checkpoint of ``config.init.stages``, the
stage-3 workdir last); the config is loaded, and its fields overridden, by ml_collections as
``main.py`` does. Written into ``--out`` (all parts by default, or those of ``--what``):

=============================  ==============================================================
``hf_mistral/``                ``hf``: the stage-3 LLM as a Hugging Face ``MistralForCausalLM``
                               (``config.json`` + safetensors, LoRA merged into the kernels)
                               and the training tokenizer's files
``peft_adapter/``              ``peft``: the LoRA adapters as a PEFT adapter
                               (``adapter_config.json`` + ``adapter_model.safetensors``)
``mm_projector.safetensors``   ``projector``: the ego STC connector with VideoLLaMA2's
                               ``model.mm_projector.*`` keys (``mm_projector.bin`` too with
                               ``--projector_bin``)
``mapping_F.safetensors``      ``mapping``: F (ego -> exo) and, when a stage trained it, G,
``mapping_F.json``             each with the JSON of its config
``clip_vision/``               ``clip`` (only when asked): the ego CLIP tower as a HF
                               ``CLIPVisionModel``
``export.json``                what was exported, from which workdirs and steps
=============================  ==============================================================

A part the model does not have (``peft`` without LoRA, ``mapping`` without F) is skipped
with a note when ``--what`` is not given and refused when it is. A part that only training
produces (the LoRA adapters, the ego connector, F) is refused when no checkpoint of
``config.init.stages`` holds it: exporting it would write its initial values.

The whole export is built in a staging directory beside ``--out`` and renamed into place
when complete, so an interrupted export never leaves a partial ``--out``.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from exo2ego_jax import cli, runtime
from exo2ego_jax.config_lib import ConfigError, ResolvedConfig
from exo2ego_jax.training import checkpoints
from exo2ego_jax.weights import hf_clip, hf_mistral, mapping_net, mm_projector, peft_adapter
from input_pipeline import atomic

PARTS = ("hf", "peft", "projector", "mapping", "clip")
#: Parts written when ``--what`` is not given.
DEFAULT_PARTS = ("hf", "peft", "projector", "mapping")
FORMAT = "exo2ego-export"
FORMAT_VERSION = 1
HF_DIR, PEFT_DIR, CLIP_DIR = "hf_mistral", "peft_adapter", "clip_vision"
PROJECTOR_FILE = "mm_projector.safetensors"
#: VideoLLaMA2 keeps only keys containing ``mm_projector.`` (``get_w`` in its
#: ``initialize_vision_modules``), as its own ``mm_projector.bin`` files are keyed.
PROJECTOR_PREFIX = "model.mm_projector."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DTYPES = ("float32", "bfloat16", "float16")
Log = Callable[[str], None]


class ExportError(ConfigError):
    """A part cannot be exported (missing from the model or never trained), or a flag is wrong."""


# ----------------------------------------------------------------------------- what to write


def read_stages(config: Any) -> list[dict[str, Any]]:
    """``{"workdir", "stage", "step", "paths"}`` of the latest checkpoint of every workdir in
    ``config.init.stages`` (metadata only)."""
    out = []
    for wd in config.init.stages:
        step, meta = checkpoints.read_meta(wd)
        out.append(
            {
                "workdir": str(Path(wd).absolute()),
                "stage": meta.get("stage"),
                "step": int(step),
                "paths": list(meta.get("param_paths", ())),
            }
        )
    return out


def trained_by(stages: Sequence[dict[str, Any]], pattern: str) -> list[dict[str, Any]]:
    """The stage checkpoints (``{"stage", "workdir", "step"}``) holding a parameter whose
    ``/``-joined path matches ``pattern``, in restore order (the last one wins)."""
    regex = re.compile(pattern)
    return [
        {k: s[k] for k in ("stage", "workdir", "step")}
        for s in stages
        if any(regex.search(p) for p in s["paths"])
    ]


def _pretrained(init: Any, field: str) -> str:
    """Where a part's starting weights came from: ``init.converted``, ``init.<field>`` or
    random initialisation."""
    if init.get("converted"):
        return f"config.init.converted={init.converted}"
    if init.get(field):
        return f"config.init.{field}={init.get(field)}"
    return "random initialisation"


def plan_parts(
    resolved: ResolvedConfig, what: Sequence[str] | None, stages: Sequence[dict[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``(parts, skipped)``: what each part to write is made of, and why others are skipped.

    ``what`` None: every part of :data:`DEFAULT_PARTS` the model has. Raises
    :class:`ExportError` (one line naming the field) for an unknown part, a part asked for
    that the model does not have, or a part no stage checkpoint trained.
    """
    explicit = what is not None
    wanted = list(dict.fromkeys(what)) if explicit else list(DEFAULT_PARTS)
    unknown = [p for p in wanted if p not in PARTS]
    if unknown or not wanted:
        raise ExportError(f"--what={','.join(wanted)}: choose from {','.join(PARTS)}")
    model, init = resolved.model, resolved.config.init
    lora = model.llm.lora
    absent = {}
    if lora is None:
        absent["peft"] = (
            "config.model.lora.enabled=False: the model has no LoRA adapters, so there is no "
            "PEFT adapter (hf_mistral holds the whole LLM)"
        )
    if not model.with_mapping:
        absent["mapping"] = "config.model.with_mapping=False: the model has no F or G"
    parts: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for part in wanted:
        if part in absent:
            if explicit:
                raise ExportError(f"--what={part}: {absent[part]}; drop it from --what")
            skipped[part] = absent[part]
            continue
        parts[part] = {}

    adapters = trained_by(stages, r"^llm/.*/lora_[ab]$")
    if lora is not None and {"hf", "peft"} & set(parts) and not adapters:
        raise ExportError(
            "config.init.stages: no checkpoint holds the LoRA adapters (llm/.../lora_a, "
            "lora_b), so the LLM would be exported with untrained adapters; list the stage-3 "
            "workdir (last) in config.init.stages"
        )
    if "hf" in parts:
        parts["hf"] = {
            "base_weights": _pretrained(init, "llm"),
            "lora_merged": lora is not None,
            "trained_by": trained_by(stages, r"^llm/"),
        }
    if "peft" in parts:
        parts["peft"] = {"trained_by": adapters}
    if "projector" in parts:
        by = trained_by(stages, r"^ego_encoder/connector/")
        if not by:
            raise ExportError(
                "config.init.stages: no checkpoint holds the ego connector "
                "(ego_encoder/connector, trained in stages 0, 2 and 3); list those workdirs"
            )
        parts["projector"] = {"trained_by": by}
    if "mapping" in parts:
        nets = {n: trained_by(stages, f"^{n}/") for n in ("F", "G")}
        if not nets["F"]:
            raise ExportError(
                "config.init.stages: no checkpoint holds the mapping network F (trained in "
                "stages 2 and 3); list those workdirs"
            )
        if not nets["G"]:
            skipped["mapping_G"] = "no checkpoint of config.init.stages trained G"
        parts["mapping"] = {n: {"trained_by": by} for n, by in nets.items() if by}
    if "clip" in parts:
        parts["clip"] = {
            "base_weights": _pretrained(init, "clip"),
            "trained_by": trained_by(stages, r"^ego_encoder/clip/"),
        }
    return parts, skipped


# ----------------------------------------------------------------------------- writers


def _copy_tokenizer(src: str, dst: Path) -> list[str]:
    """Copies the tokenizer files of ``src`` into ``dst`` verbatim; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, dst / name)
            copied.append(name)
    return copied


def _write_hf(trained: runtime.Trained, tokenizer_dir: str, dst: Path, dtype: str | None) -> dict:
    llm = trained.model.config.llm
    hf_mistral.save_mistral(llm, trained.params["llm"], dst, dtype=dtype)
    files = _copy_tokenizer(tokenizer_dir, dst)
    # config.json's special ids from the tokenizer the model was trained with.
    cfg_file = dst / "config.json"
    cfg = json.loads(cfg_file.read_text())
    tok = trained.tokenizer
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    atomic.write_text(cfg_file, json.dumps(cfg, indent=2) + "\n")
    return {"path": f"{HF_DIR}/", "dtype": cfg["torch_dtype"], "tokenizer_files": files}


def _write_peft(trained: runtime.Trained, dst: Path, base: str | None, dtype: str | None) -> dict:
    llm = trained.model.config.llm
    peft_adapter.save_peft_adapter(
        llm, trained.params["llm"], dst, base_model_name_or_path=base, dtype=dtype
    )
    cfg = peft_adapter.adapter_config(llm.lora, base)
    keep = ("r", "lora_alpha", "lora_dropout", "target_modules", "base_model_name_or_path")
    return {"path": f"{PEFT_DIR}/", **{k: cfg[k] for k in keep}}


def _write_projector(trained: runtime.Trained, out: Path, with_bin: bool) -> dict:
    cfg = trained.model.config.connector
    params = trained.params["ego_encoder"]["connector"]
    files = [mm_projector.save_mm_projector(cfg, params, out / PROJECTOR_FILE, PROJECTOR_PREFIX)]
    if with_bin:
        bin_file = out / Path(PROJECTOR_FILE).with_suffix(".bin").name
        files.append(mm_projector.save_mm_projector(cfg, params, bin_file, PROJECTOR_PREFIX))
    return {
        "files": [f.name for f in files],
        "key_prefix": PROJECTOR_PREFIX,
        "sampler_padding": cfg.sampler_padding,
    }


def _write_mapping(trained: runtime.Trained, out: Path, nets: dict[str, dict]) -> dict:
    cfg = trained.model.config
    direction = {"F": "ego -> exo", "G": "exo -> ego"}
    written = {}
    for name in nets:
        file, cfg_file = mapping_net.save_mapping(
            cfg.mapping,
            cfg.llm.hidden_size,
            cfg.visual_grid,
            trained.params[name],
            out / f"mapping_{name}.safetensors",
            info={"name": name, "direction": direction[name]},
        )
        written[name] = {"files": [file.name, cfg_file.name], **nets[name]}
    return written


def _write_clip(trained: runtime.Trained, dst: Path) -> dict:
    clip = trained.model.config.clip
    hf_clip.save_clip_vision(clip, trained.params["ego_encoder"]["clip"], dst)
    return {"path": f"{CLIP_DIR}/"}


# ----------------------------------------------------------------------------- export


def export(
    config: Any,
    out: str | Path,
    *,
    what: Sequence[str] | None = None,
    base_model: str | None = None,
    dtype: str | None = None,
    projector_bin: bool = False,
    overwrite: bool = False,
    log: Log = print,
) -> dict[str, Any]:
    """Writes the parts of the trained model of ``config`` into ``out``; returns the
    ``export.json`` record.

    Args:
      config: an evaluation-style ConfigDict (``configs/eval.py``): ``config.init.stages``
        lists the stage workdirs (stage 3 last), ``config.data.tokenizer`` the tokenizer.
      out: the export directory (refused if it exists, unless ``overwrite``).
      what: parts among :data:`PARTS`; None = every part of :data:`DEFAULT_PARTS` the model
        has.
      base_model: ``base_model_name_or_path`` of the PEFT adapter (default
        ``config.init.llm``).
      dtype: tensor dtype of ``hf_mistral`` and the adapter (default: the params').
      projector_bin: also write ``mm_projector.bin`` (PyTorch state dict; needs torch).
      overwrite: replace an existing ``out``.
    """
    if dtype and dtype not in DTYPES:
        raise ExportError(f"--dtype={dtype}: use one of {', '.join(DTYPES)}")
    if jax.process_count() > 1:
        raise ExportError("export runs in one process; start it without a multi-host launcher")
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise ExportError(f"--out={out} exists; pass --overwrite to replace it")
    probe = config.copy_and_resolve_references()
    with probe.unlocked():
        probe.run = "export"  # stage-3 workdirs restore as for evaluation
    resolved = runtime.resolve_for_inference(probe)
    stages = read_stages(resolved.config)
    parts, skipped = plan_parts(resolved, what, stages)
    for part, reason in skipped.items():
        log(f"export: skipping {part}: {reason}")
    if "hf" in parts and parts["hf"]["base_weights"] == "random initialisation":
        log("export: warning: config.init.llm is empty; the LLM's base weights are random")
    base = base_model if base_model is not None else (resolved.config.init.llm or None)

    trained = runtime.load_trained(resolved, log=log)
    record: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "stages": [{k: s[k] for k in ("stage", "workdir", "step")} for s in stages],
        "pretrained": {
            f: resolved.config.init.get(f, "") for f in ("llm", "clip", "mm_projector", "converted")
        },
        "tokenizer": str(Path(resolved.config.data.tokenizer).absolute()),
        "parts": {},
        "skipped": skipped,
    }
    with atomic.staged_dir(out) as stage:
        if "hf" in parts:
            log(f"export: {HF_DIR}/ (LoRA merged: {parts['hf']['lora_merged']})")
            info = _write_hf(trained, resolved.config.data.tokenizer, stage / HF_DIR, dtype)
            record["parts"]["hf"] = {**info, **parts["hf"]}
        if "peft" in parts:
            log(f"export: {PEFT_DIR}/")
            info = _write_peft(trained, stage / PEFT_DIR, base, dtype)
            record["parts"]["peft"] = {**info, **parts["peft"]}
        if "projector" in parts:
            log(f"export: {PROJECTOR_FILE}")
            info = _write_projector(trained, stage, projector_bin)
            record["parts"]["projector"] = {**info, **parts["projector"]}
        if "mapping" in parts:
            log(f"export: mapping {', '.join(parts['mapping'])}")
            record["parts"]["mapping"] = _write_mapping(trained, stage, parts["mapping"])
        if "clip" in parts:
            log(f"export: {CLIP_DIR}/")
            record["parts"]["clip"] = {**_write_clip(trained, stage / CLIP_DIR), **parts["clip"]}
        record["config"] = checkpoints.dump_json(resolved.config.to_dict())
        atomic.write_text(stage / "export.json", json.dumps(record, indent=2) + "\n")
    log(f"export: wrote {', '.join(record['parts'])} to {out}")
    return record


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.config is None:
        raise app.UsageError("pass --config=configs/eval.py[:demo|:paper]")
    if not f.out:
        raise app.UsageError("pass --out=DIR")
    export(
        f.config,
        f.out,
        what=f.what or None,
        base_model=f.base_model,
        dtype=f.dtype or None,
        projector_bin=f.projector_bin,
        overwrite=f.overwrite,
    )


def _define_flags() -> None:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Evaluation config of the trained model, e.g. configs/eval.py:paper; its "
        "init.stages lists the stage workdirs (stage 3 last).",
        lock_config=True,
    )
    flags.DEFINE_string("out", None, "Export directory (refused if it exists).")
    flags.DEFINE_list(
        "what", [], f"Parts to write, from {','.join(PARTS)} (default: every part it has)."
    )
    flags.DEFINE_string(
        "base_model", None, "base_model_name_or_path of the PEFT adapter (default init.llm)."
    )
    flags.DEFINE_enum("dtype", "", ["", *DTYPES], "dtype of hf_mistral and the adapter.")
    flags.DEFINE_bool("projector_bin", False, "Also write mm_projector.bin (PyTorch).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


if __name__ == "__main__":
    _define_flags()
    cli.run(main, sys.argv)
