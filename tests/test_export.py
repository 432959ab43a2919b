"""``tools.export``: a tiny trained stage-3 model exported, then loaded by other code.

The model: a perturbed base LLM (every norm weight distinct, saved as ``config.init.llm``)
and stage 0-3 checkpoints whose every trainable leaf is perturbed (LoRA ``A`` and ``B``
both nonzero, connector and F/G norms off 1 / 0), so a merge, a scale or a transpose that
went wrong changes the numbers. Each export is then read by independent code:

* ``hf_mistral/``: ``transformers`` (``AutoModelForCausalLM``, ``AutoTokenizer``) vs our
  ``MistralLM`` with the LoRA *unmerged*, on token ids and on a spliced video prompt;
* ``peft_adapter/``: ``peft.PeftModel`` on our pre-LoRA weights saved by ``save_mistral``;
* ``mm_projector.*``: the project's loader and the PyTorch reference connector
  (``tests/reference/stc_connector_torch.py``), and VideoLLaMA2's key filter;
* ``mapping_F/G``: ``weights.mapping_net.load_mapping`` vs the model's F and G.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util
from hf_helpers import perturb_params, right_padded_batch
from reference.stc_connector_torch import STCConnector as TorchSTC

from configs import common
from configs import eval as eval_config
from exo2ego_jax import config_lib, runtime, stages
from exo2ego_jax import sharding as sharding_lib
from exo2ego_jax.models.exo2ego import Exo2Ego
from exo2ego_jax.models.lora import lora_param_filter
from exo2ego_jax.models.mistral import MistralLM
from exo2ego_jax.tools import export as export_lib
from exo2ego_jax.training import checkpoints
from exo2ego_jax.weights import mapping_net, peft_adapter
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_clip import load_clip_vision
from exo2ego_jax.weights.hf_mistral import save_mistral
from exo2ego_jax.weights.mm_projector import load_mm_projector
from exo2ego_jax.weights.tensors import TensorSource
from input_pipeline.templates import VIDEO_TOKEN_INDEX
from input_pipeline.tokenizer import load_tokenizer, train_demo_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # max |logit diff| in float32
TEXTS = ["the camera wearer picks up a red cup", "C opens the fridge and takes a bottle"]


def _save_stage(workdir: Path, stage: int, model: Exo2Ego, params) -> None:
    """A stage checkpoint as the trainer writes it: the stage's trainable leaves, each
    perturbed (constant leaves such as norm scales, biases and the zero LoRA ``B`` get
    their own large noise)."""
    stage_cfg = config_lib.build_stage_config(common.base_config(stage, "demo").stage)
    trainable, _ = stages.split_params(params, stages.trainable_patterns(stage_cfg, model))
    trainable = perturb_params(trainable, seed=100 + stage)
    ckpt = checkpoints.StageCheckpointer(workdir, async_save=False)
    meta = {"stage": stage, **checkpoints.param_meta(trainable)}
    ckpt.save(7 + stage, trainable, {"count": np.zeros((), np.int32)}, meta, {}, force=True)
    ckpt.close()


def _config(root: Path):
    config = eval_config.get_config("demo")
    config.data.tokenizer = str(root / "tokenizer")
    config.init.llm = str(root / "base_llm")
    config.init.clip = ""
    config.init.stages = tuple(str(root / f"stage{i}") for i in range(4))
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(config, trained, out)``: stage checkpoints, the model as export assembled it, and
    the export directory (every part, ``mm_projector.bin`` too)."""
    root = tmp_path_factory.mktemp("export")
    train_demo_tokenizer(TEXTS, root / "tokenizer", vocab_size=300)
    config = _config(root)
    model_cfg = config_lib.build_model_config(config.model)
    # The pretrained base LLM (config.init.llm): random, every tensor perturbed.
    base_cfg = dataclasses.replace(model_cfg.llm, lora=None)
    base = jax.jit(MistralLM(base_cfg).init)(jax.random.key(5), jnp.zeros((1, 2), jnp.int32))
    base = perturb_params(nn.meta.unbox(base["params"]), seed=5)
    save_mistral(base_cfg, base, root / "base_llm")

    model = Exo2Ego(model_cfg)
    mesh = sharding_lib.make_mesh(config.mesh.shape)
    rules = sharding_lib.rules_for(config.mesh.rules)
    with sharding_lib.sharding_context(mesh, rules):
        params, _ = runtime.init_params(model, mesh, rules, config.seed)
        for i, wd in enumerate(config.init.stages):
            _save_stage(Path(wd), i, model, params)

    seen = {}
    load = runtime.load_trained

    def spy(*args, **kwargs):
        seen["trained"] = load(*args, **kwargs)
        return seen["trained"]

    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runtime, "load_trained", spy)
        record = export_lib.export(config, out, projector_bin=True, log=lambda s: None)
    assert record["parts"].keys() == {"hf", "peft", "projector", "mapping"}
    return config, seen["trained"], out


def _host_llm(trained) -> dict:
    return jax.tree.map(np.asarray, trained.params["llm"])


def _without_lora(params: dict) -> dict:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: v for p, v in flat.items() if not lora_param_filter(p)})


def _our_logits(module: MistralLM, params, ids, mask) -> np.ndarray:
    fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, attention_mask=m).logits)
    return np.asarray(fn(params, jnp.asarray(ids), jnp.asarray(mask)))


def _torch_logits(model, mask, **inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(attention_mask=torch.tensor(mask), **inputs)
    return out.logits.float().numpy()


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def _spliced_prompt(trained, seed=3):
    """Prompt embeddings of two video questions (the second right-padded) with their ego
    clips spliced in, as chat does, and our logits on them.

    Run on host copies of the params outside the mesh: the mesh splits a batch 8 ways.
    """
    model, cfg = trained.model, trained.model.config
    params = jax.tree.map(np.asarray, trained.params)
    ids = np.array(
        [
            [1, 30, 41, VIDEO_TOKEN_INDEX, 52, 63, 74, 85],
            [1, 33, VIDEO_TOKEN_INDEX, 44, 55, 0, 0, 0],
        ],
        np.int32,
    )
    mask = (np.arange(8) < np.array([[8], [5]])).astype(np.int32)
    size = cfg.clip.image_size
    frames = np.random.default_rng(seed).standard_normal((2, cfg.num_frames, size, size, 3))
    visual, _, _ = jax.jit(model.ego_visual_tokens)(params, frames.astype(np.float32))
    embeds, mask, _ = jax.jit(model.embed_multimodal)(params, ids, visual, mask)
    logits = jax.jit(model.lm_logits)(params, embeds, mask)
    return np.array(embeds), np.asarray(mask), np.asarray(logits)


# ----------------------------------------------------------------------------- hf_mistral


def test_hf_mistral_matches_unmerged_lora(setup):
    config, trained, out = setup
    llm = trained.model.config.llm
    assert llm.lora is not None and llm.lora.scale == 2.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf_mistral").eval()
    assert type(hf).__name__ == "MistralForCausalLM" and hf.dtype == torch.float32
    ids, mask = right_padded_batch([12, 7], 12, llm.vocab_size, low=4)
    ours = _our_logits(MistralLM(llm), _host_llm(trained), ids, mask)  # LoRA on, unmerged
    diff = _max_diff(_torch_logits(hf, mask, input_ids=torch.tensor(ids)), ours, mask)
    # The comparison is not vacuous: the adapters move the logits far more than TOL.
    no_lora = _without_lora(_host_llm(trained))
    plain = _our_logits(MistralLM(dataclasses.replace(llm, lora=None)), no_lora, ids, mask)
    effect = _max_diff(plain, ours, mask)
    print(f"hf_mistral vs ours (LoRA unmerged), token ids: max|logit diff| = {diff:.2e} "
          f"(LoRA moves logits by {effect:.2f})")  # fmt: skip
    assert effect > 0.1
    assert diff < TOL

    embeds, mask2, ours2 = _spliced_prompt(trained)
    theirs = _torch_logits(hf, mask2, inputs_embeds=torch.from_numpy(embeds))
    diff2 = _max_diff(theirs, ours2, mask2)
    print(f"hf_mistral vs ours, spliced video prompt (inputs_embeds): max|logit diff| = "
          f"{diff2:.2e}")  # fmt: skip
    assert diff2 < TOL


def test_hf_mistral_tokenizer_and_config(setup):
    config, trained, out = setup
    tok = transformers.AutoTokenizer.from_pretrained(out / "hf_mistral")
    ours = load_tokenizer(config.data.tokenizer)
    for text in [*TEXTS, "a sentence the tokenizer never saw"]:
        assert tok(text)["input_ids"] == ours(text)["input_ids"]
    hf_cfg = json.loads((out / "hf_mistral" / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (
        ours.bos_token_id,
        ours.eos_token_id,
    )
    assert hf_cfg["vocab_size"] == trained.model.config.llm.vocab_size
    names = safetensors.torch.load_file(out / "hf_mistral" / "model.safetensors")
    assert not any("lora" in n for n in names)


# ----------------------------------------------------------------------------- PEFT


def test_peft_adapter_on_base_matches(setup, tmp_path):
    config, trained, out = setup
    llm = trained.model.config.llm
    # Base: our pre-LoRA weights, saved by save_mistral.
    flat = traverse_util.flatten_dict(_host_llm(trained))
    base_params = _without_lora(_host_llm(trained))
    save_mistral(dataclasses.replace(llm, lora=None), base_params, tmp_path / "base")
    base = transformers.MistralForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.PeftModel.from_pretrained(base, out / "peft_adapter").eval()
    ids, mask = right_padded_batch([11, 5], 11, llm.vocab_size, seed=1, low=4)
    ours = _our_logits(MistralLM(llm), _host_llm(trained), ids, mask)
    diff = _max_diff(_torch_logits(model, mask, input_ids=torch.tensor(ids)), ours, mask)
    print(f"PEFT adapter on base vs ours, token ids: max|logit diff| = {diff:.2e}")
    assert diff < TOL
    embeds, mask2, ours2 = _spliced_prompt(trained)
    diff2 = _max_diff(
        _torch_logits(model, mask2, inputs_embeds=torch.from_numpy(embeds)), ours2, mask2
    )
    print(f"PEFT adapter on base vs ours, spliced video prompt: max|logit diff| = {diff2:.2e}")
    assert diff2 < TOL

    # The layout, and back into JAX: the same adapters.
    adapter_cfg = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == llm.lora.rank == 8 and adapter_cfg["lora_alpha"] == 16
    assert adapter_cfg["base_model_name_or_path"] == config.init.llm
    assert adapter_cfg["target_modules"] == list(llm.lora.targets)
    tensors = safetensors.torch.load_file(out / "peft_adapter" / "adapter_model.safetensors")
    a = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    b = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert tuple(tensors[a].shape) == (8, llm.intermediate_size)  # [r, in]
    assert tuple(tensors[b].shape) == (llm.hidden_size, 8)  # [out, r]
    assert len(tensors) == 2 * 7 * llm.num_layers

    lora, adapters = peft_adapter.load_peft_adapter(out / "peft_adapter", llm)
    assert (lora.rank, lora.alpha, lora.targets) == (8, 16, llm.lora.targets)
    got = traverse_util.flatten_dict(adapters)
    assert got.keys() == {p for p in flat if lora_param_filter(p)}
    for p, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), flat[p])


# ----------------------------------------------------------------------------- projector


def test_projector_loads_in_ours_and_the_torch_reference(setup):
    _, trained, out = setup
    cfg = trained.model.config.connector
    ours_params = jax.tree.map(np.asarray, trained.params["ego_encoder"]["connector"])
    clip = trained.model.config.clip
    x = np.random.default_rng(4).standard_normal(
        (2, trained.model.config.num_frames, clip.num_patches, clip.hidden_size), np.float32
    )
    want = np.asarray(jax.jit(trained.model.connector.apply)({"params": ours_params}, x))
    module, params = load_mm_projector(out / "mm_projector.safetensors")
    assert dataclasses.replace(module.config, dtype=cfg.dtype, param_dtype=cfg.param_dtype) == cfg
    got = np.asarray(jax.jit(module.apply)({"params": params}, x))
    assert np.abs(got - want).max() == 0.0

    state = safetensors.torch.load_file(out / "mm_projector.safetensors")
    from_bin = torch.load(out / "mm_projector.bin", map_location="cpu", weights_only=True)
    assert state.keys() == from_bin.keys()
    assert all(torch.equal(state[k], from_bin[k]) for k in state)
    # VideoLLaMA2's loader keeps the keys holding 'mm_projector' and strips up to it.
    stripped = {k.split("mm_projector.")[1]: v for k, v in from_bin.items() if "mm_projector" in k}
    assert len(stripped) == len(state)
    ref = TorchSTC(
        cfg.in_channels,
        cfg.hidden_size,
        downsample=cfg.downsample,
        depth=cfg.depth,
        mlp_depth=cfg.mlp_depth,
        bottle_ratio=cfg.bottle_ratio,
        group_size=cfg.group_size,
        se_ratio=cfg.se_ratio,
    ).eval()
    ref.load_state_dict(stripped, strict=True)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x)).numpy()
    diff = float(np.abs(theirs - want).max())
    print(f"mm_projector.bin in the PyTorch reference vs ours: max|diff| = {diff:.2e} "
          f"(max|out| = {np.abs(want).max():.2f})")  # fmt: skip
    assert np.abs(want).max() > 0.1 and diff < TOL


# ----------------------------------------------------------------------------- F and G


def test_mapping_reloads_f_and_g(setup):
    _, trained, out = setup
    cfg = trained.model.config
    tokens = np.random.default_rng(6).standard_normal(
        (2, cfg.tokens_per_clip, cfg.llm.hidden_size), np.float32
    )
    for name in ("F", "G"):
        module, params, grid = mapping_net.load_mapping(out / f"mapping_{name}.safetensors")
        assert grid == cfg.visual_grid and module.features == cfg.llm.hidden_size
        assert module.config == cfg.mapping
        meta = json.loads((out / f"mapping_{name}.json").read_text())
        assert meta["name"] == name and meta["format"] == mapping_net.FORMAT
        net = {"F": trained.model.map_ego_to_exo, "G": trained.model.map_exo_to_ego}[name]
        want = jax.jit(net)(jax.tree.map(np.asarray, trained.params), tokens)
        got = jax.jit(module.apply, static_argnums=2)({"params": params}, tokens, grid)
        diff = float(jnp.abs(got - want).max())
        print(f"mapping_{name}.safetensors vs the model's {name}: max|diff| = {diff:.2e}")
        assert float(jnp.abs(want).max()) > 0.1 and diff == 0.0
    # The documented key layout, read without our loader: path joined by ".", Flax layout.
    for name in ("F", "G"):
        tensors = safetensors.torch.load_file(out / f"mapping_{name}.safetensors")
        flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, trained.params[name]))
        assert tensors.keys() == {".".join(p) for p in flat}
        for p, v in flat.items():
            np.testing.assert_array_equal(tensors[".".join(p)].numpy(), v)
    assert tuple(tensors["resnet.stem.conv.kernel"].shape) == (7, 7, cfg.llm.hidden_size, 8)
    assert tuple(tensors["resnet.up_1.norm.scale"].shape) == (8,)  # demo: norm="layer"


# ----------------------------------------------------------------------------- record, errors


def test_export_json_names_the_sources(setup):
    config, _, out = setup
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "exo2ego-export"
    assert [(s["stage"], s["step"]) for s in record["stages"]] == [(0, 7), (1, 8), (2, 9), (3, 10)]
    parts = record["parts"]

    def stages_of(by):
        return [s["stage"] for s in by]

    assert stages_of(parts["peft"]["trained_by"]) == [3]
    assert stages_of(parts["hf"]["trained_by"]) == [3] and parts["hf"]["lora_merged"]
    assert parts["hf"]["base_weights"] == f"config.init.llm={config.init.llm}"
    assert stages_of(parts["projector"]["trained_by"]) == [0, 2, 3]
    assert parts["projector"]["files"] == ["mm_projector.safetensors", "mm_projector.bin"]
    assert stages_of(parts["mapping"]["F"]["trained_by"]) == [2, 3]
    assert stages_of(parts["mapping"]["G"]["trained_by"]) == [2]
    assert record["skipped"] == {}
    assert record["config"]["init"]["stages"] == list(config.init.stages)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]  # staging gone


def _resolved(config):
    probe = config.copy_and_resolve_references()
    with probe.unlocked():
        probe.run = "export"
    return runtime.resolve_for_inference(probe)


def test_parts_missing_are_skipped_or_refused(setup):
    config, _, out = setup
    stage_infos = export_lib.read_stages(config)
    no_lora = config.copy_and_resolve_references()
    no_lora.model.lora.enabled = False
    parts, skipped = export_lib.plan_parts(_resolved(no_lora), None, stage_infos)
    assert "peft" not in parts and "config.model.lora.enabled=False" in skipped["peft"]
    assert not parts["hf"]["lora_merged"]
    with pytest.raises(export_lib.ExportError, match=r"--what=peft: config.model.lora.enabled"):
        export_lib.plan_parts(_resolved(no_lora), ["peft"], stage_infos)

    no_map = config.copy_and_resolve_references()
    no_map.model.with_mapping, no_map.model.fusion = False, "x_only"
    with pytest.raises(export_lib.ExportError, match=r"config.model.with_mapping=False"):
        export_lib.plan_parts(_resolved(no_map), ["mapping"], stage_infos)
    # No stage-3 workdir: the adapters were never trained.
    with pytest.raises(
        export_lib.ExportError, match=r"config.init.stages: no checkpoint holds the LoRA"
    ):
        export_lib.plan_parts(_resolved(config), ["peft"], stage_infos[:3])
    # Only stage 3: F's and the connector's stage-3 values, G never trained.
    parts, skipped = export_lib.plan_parts(_resolved(config), ["mapping"], stage_infos[3:])
    assert list(parts["mapping"]) == ["F"] and "mapping_G" in skipped
    with pytest.raises(export_lib.ExportError, match=r"--what=hf,nope: choose from"):
        export_lib.plan_parts(_resolved(config), ["hf", "nope"], stage_infos)
    with pytest.raises(export_lib.ExportError, match=r"exists; pass --overwrite"):
        export_lib.export(config, out)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "EXO2EGO_TRACEBACK": ""}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    cmd = [sys.executable, "-m", "exo2ego_jax.tools.export", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _tuple(items) -> str:
    return "(" + "".join(f"{x!r}," for x in items) + ")"


@pytest.mark.slow
def test_command_line(setup, tmp_path):
    config, trained, out = setup
    flags = [
        "--config=configs/eval.py:demo",
        f"--config.data.tokenizer={config.data.tokenizer}",
        f"--config.init.llm={config.init.llm}",
        "--config.init.clip=",
        f"--config.init.stages={_tuple(config.init.stages)}",
    ]
    run = _cli(*flags, f"--out={tmp_path / 'cli'}", "--what=projector,mapping,clip")
    assert run.returncode == 0, run.stderr
    for name in ("mm_projector.safetensors", "mapping_F.safetensors", "mapping_G.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (out / name).read_bytes(), name
    assert not (tmp_path / "cli" / "hf_mistral").exists()
    # The ego CLIP tower (opt-in): a HF CLIPVisionModel holding the model's tower.
    transformers.CLIPVisionModel.from_pretrained(tmp_path / "cli" / "clip_vision")
    _, clip = load_clip_vision(tmp_path / "cli" / "clip_vision")
    want = traverse_util.flatten_dict(
        jax.tree.map(np.asarray, trained.params["ego_encoder"]["clip"])
    )
    got = traverse_util.flatten_dict(clip)
    assert got.keys() == want.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=str(k))
    record = json.loads((tmp_path / "cli" / "export.json").read_text())
    assert record["parts"]["clip"]["base_weights"] == "random initialisation"

    bad = _cli(
        *flags, "--config.model.lora.enabled=False", f"--out={tmp_path / 'x'}", "--what=peft"
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--what=peft: config.model.lora.enabled=False" in lines[0], (
        bad.stderr
    )
    assert not (tmp_path / "x").exists()


def test_bfloat16_and_refused_files(setup, tmp_path):
    """``--dtype=bfloat16`` stores bfloat16 (the merge in float32 first); adapters and mapping
    files this model cannot run exactly are refused naming the field."""
    _, trained, out = setup
    llm = trained.model.config.llm
    save_mistral(llm, trained.params["llm"], tmp_path / "bf16", dtype="bfloat16")
    hf_cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    source = TensorSource(tmp_path / "bf16")
    assert hf_cfg["torch_dtype"] == "bfloat16"
    assert {str(source.dtype(n)) for n in source.names()} == {"bfloat16"}
    f32 = TensorSource(out / "hf_mistral")
    name = "model.layers.0.self_attn.q_proj.weight"  # a merged kernel: bf16 of the f32 merge
    np.testing.assert_array_equal(source.read(name), f32.read(name).astype(source.dtype(name)))

    shutil.copytree(out / "peft_adapter", tmp_path / "rs")
    cfg = json.loads((tmp_path / "rs" / "adapter_config.json").read_text())
    (tmp_path / "rs" / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: field 'use_rslora' = True"):
        peft_adapter.load_peft_adapter(tmp_path / "rs", llm)
    shutil.copy(out / "mapping_F.safetensors", tmp_path / "lonely.safetensors")
    with pytest.raises(CheckpointError, match=r"lonely.json: missing"):
        mapping_net.load_mapping(tmp_path / "lonely.safetensors")
