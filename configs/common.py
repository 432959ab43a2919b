"""Shared pieces of the stage configs (ml_collections).

Every stage config is ``get_config(arg)`` with ``arg`` a preset name:

* ``paper``: method.md's sizes and per-stage hyper-parameters (CLIP-L/14-336 ×2, STC
  connectors, ResNet F/G with ngf 256, Mistral-7B-Instruct, LoRA r128/α256/dropout 0.1 in
  stage 3, 16 frames at 336 px, bfloat16 compute). The fields below are written with these
  values.
* ``demo`` (default): the paper config with one override block (:func:`demo_overrides`):
  tiny model, the built-in synthetic world, CPU-friendly sizes.

Every decision listed in method.md is a field below; override any of them on the command
line, e.g. ``--config.stage.lambda_kl=0.5`` or ``--config.model.fusion=x_only``.
"""

from __future__ import annotations

from typing import Any

import ml_collections

PRESETS = ("demo", "paper")

# Paper's per-stage schedule (method.md §4): batch, lr, warmup ratio, epochs.
PAPER_SCHEDULE = {
    0: dict(batch_size=512, lr=1e-3, warmup_ratio=0.1, num_epochs=5),
    1: dict(batch_size=256, lr=1e-4, warmup_ratio=0.03, num_epochs=2),
    2: dict(batch_size=256, lr=1e-4, warmup_ratio=0.03, num_epochs=2),
    3: dict(batch_size=64, lr=2e-5, warmup_ratio=0.03, num_epochs=1),
}

# Demo epochs per stage: 8 / 4 / 4 / 6 since 2026-12-05, after two pre-registered comparisons
# over seeds 0-2 against the earlier 32 / 15 / 20 / 10 (docs/egobench.md, "Pre-registered"):
# 8 / 8 / 8 / 8 kept the EgoBench average (33.1 +- 1.7 vs 33.9 +- 4.0) and the chat check
# (9.7 vs 9.7 of 20); 8 / 4 / 4 / 6 with stage 3's 80-token text bucket kept them too (32.8 +-
# 1.8; 10.0 of 20) at 1 046 -> about 830 s for `make demo`. Both lost more than their seed
# spread on the same four QA tasks (EgoSchema, QAEgo4D close, EgoTaskQA direct / indirect).
DEMO_EPOCHS = {0: 8, 1: 4, 2: 4, 3: 6}
# Stage 3's text length buckets in the demo: its rows are 40-75 tokens, so 80 instead of 128
# for the batches whose longest row is 65-75 (45 % of them; a step at 80 tokens costs 122 ms
# against 151 at 128, `bench/stage_step_cost.py`).
DEMO_STAGE3_BUCKETS = (16, 32, 64, 80, 128)


def parse_preset(arg: str | None) -> str:
    preset = (arg or "demo").strip() or "demo"
    if preset not in PRESETS:
        raise ValueError(f"unknown config preset {preset!r}; choose one of {PRESETS}")
    return preset


def model_config() -> ml_collections.ConfigDict:
    """Architecture fields at paper size (see ``exo2ego_jax.config_lib.build_model_config``)."""
    m = ml_collections.ConfigDict()
    m.size = "paper"  # architecture preset of every component: tiny | paper
    m.num_frames = 16
    m.image_size = 336
    m.patch_size = 0  # CLIP patch; 0 = the size preset's (14)
    m.select_layer = -2  # VideoLLaMA2: penultimate CLIP layer, CLS dropped
    m.fusion = "concat_seq"  # concat_seq | x_only | fx_only  (what replaces <video>)
    m.with_exo = True
    m.with_mapping = True
    m.video_token_index = -201
    m.vocab_size = 32000  # must match the tokenizer
    # LLM shape over the size preset's (0 = the preset's value). The demo LM is pretrained
    # by ``exo2ego_jax.demo.pretrain_lm`` at exactly this shape; a real checkpoint must
    # match it.
    m.llm = ml_collections.ConfigDict(
        dict(hidden_size=0, intermediate_size=0, num_layers=0, num_heads=0, num_kv_heads=0)
    )
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"
    # What each CLIP / LLM layer keeps for the backward pass (exo2ego_jax/models/remat.py):
    # none | full | dots | dots_no_batch | save_qkv | save_qkvo | save_qkvo_mlp | offload_qkv
    # | offload_qkvo_mlp
    m.remat_policy = "full"
    # Attention kernel (exo2ego_jax/models/attention.py, docs/attention.md): auto | xla |
    # cudnn | splash | reference. auto: cuDNN flash on GPU (bf16), splash on TPU, XLA on CPU.
    m.attention_impl = "auto"
    m.mapping = ml_collections.ConfigDict(dict(kind="resnet", ngf=256, n_blocks=9, norm="instance"))
    m.lora = ml_collections.ConfigDict(
        dict(
            enabled=False,
            rank=128,
            alpha=256,
            dropout=0.1,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        )
    )
    return m


def data_config(stage: int) -> ml_collections.ConfigDict:
    """Input-pipeline fields of ``stage`` (exo2ego_jax/training/streams.py reads them)."""
    d = ml_collections.ConfigDict()
    d.world_dir = ""
    d.prepared_dir = ""
    d.tokenizer = ""
    d.max_text_len = 2048
    # Each batch's text is padded to its longest row rounded up to one of these lengths
    # (() = powers of two from 16, and max_text_len); False pads every batch to max_text_len.
    d.dynamic_length = True
    d.length_buckets = ()
    d.workers = 8
    # Keep decoded clips in memory (MiB per process) and reuse them in later epochs
    # (input_pipeline/clip_cache.py). Off at paper size, where a 16 x 336 px clip is 5.4 MB.
    d.clip_cache_mb = 0
    d.on_bad_video = "skip"  # skip | raise
    # A run stops (naming the stream and the first bad files) once more than this fraction
    # of a stream's examples could not be read; skipped counts are logged either way.
    d.max_bad_fraction = 0.05
    d.template = "plain" if stage < 3 else "mistral"
    # Which prepared dataset feeds each input stream ("" = the stage's default, see
    # exo2ego_jax/training/streams.py), e.g. --config.data.datasets.pair=my_pairs.
    d.datasets = ml_collections.ConfigDict(
        dict(ego_caption="", exo_caption="", pair="", instruct="")
    )
    return d


def demo_overrides(stage: int) -> dict[str, Any]:
    """The ``demo`` preset: what differs from the paper config (dotted field paths)."""
    return {
        "workdir": f"workdirs/demo/stage{stage}",
        "model.size": "tiny",
        "model.num_frames": 4,
        "model.image_size": 64,
        "model.patch_size": 8,
        "model.vocab_size": 1024,
        "model.dtype": "float32",
        "model.remat_policy": "none",
        "model.mapping.ngf": 8,
        "model.mapping.n_blocks": 2,
        "model.mapping.norm": "layer",
        "model.lora.rank": 8,
        "model.lora.alpha": 16,
        "model.lora.dropout": 0.0,
        "data.world_dir": "demo_data/world",
        "data.prepared_dir": "demo_data/prepared",
        "data.tokenizer": "demo_data/prepared/tokenizer",
        # The mistral template's system prompt alone is ~40 demo tokens: instructions need room.
        "data.max_text_len": 48 if stage < 3 else 192,
        "data.length_buckets": () if stage < 3 else DEMO_STAGE3_BUCKETS,
        "data.workers": 0,
        # All ~3,900 distinct training clips of the demo world (~190 MB as uint8).
        "data.clip_cache_mb": 1024,
        "optim.batch_size": 8,
        "optim.lr": 3e-3,
        "optim.num_epochs": DEMO_EPOCHS[stage],
        # The demo is data parallel (its model fits anywhere).
        "mesh.shape": (-1, 1, 1),
        "checkpoint.every_steps": 100,
        "log_every": 10,
        "count_model_flops": False,
        # The demo's own pretrained stand-ins (``python main.py --demo`` makes them).
        "init.clip": "demo_data/prepared/clip",
        "init.llm": "demo_data/prepared/llm",
        "init.stages": _stage_workdirs("demo", stage),
    }


def _stage_workdirs(preset: str, stage: int) -> tuple[str, ...]:
    # Stage 3 starts from stages 0, 1 and 2 (stage 1 reached it through stage 2).
    return tuple(f"workdirs/{preset}/stage{i}" for i in range(stage))


def base_config(stage: int, arg: str | None) -> ml_collections.ConfigDict:
    """The full config of ``stage`` (0-3) for the preset named by ``arg``."""
    preset = parse_preset(arg)
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.workdir = f"workdirs/paper/stage{stage}"
    c.model = model_config()
    c.model.lora.enabled = stage == 3

    s = c.stage = ml_collections.ConfigDict()
    s.stage = stage
    # A randomly initialised tower must train; a pretrained CLIP stays frozen (VideoLLaMA2).
    # The demo loads its own pretrained CLIP (init.clip), so it is frozen there too.
    s.train_clip = False
    s.stage0_encoders = ("ego", "exo")
    s.lambda_vtg = 1.0
    s.lambda_kl = 1.0
    s.lambda_ccl = 1.0
    s.use_kl = True
    s.use_ccl = True
    s.ccl_forward_only = False
    s.kl_temperature = 1.0
    s.train_lora = True
    s.fusion = ""  # "" = the model's fusion

    c.data = data_config(stage)

    sched = PAPER_SCHEDULE[stage]
    o = c.optim = ml_collections.ConfigDict()
    o.batch_size = sched["batch_size"]  # global batch
    o.lr = sched["lr"]
    o.warmup_ratio = sched["warmup_ratio"]
    o.num_epochs = sched["num_epochs"]
    o.num_steps = -1  # > 0 overrides num_epochs
    o.weight_decay = 0.0  # VideoLLaMA2 default
    o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
    o.grad_clip = 1.0
    o.grad_accum = 1  # micro-batches per update (each step of the loop is one micro-batch)

    # ('data', 'fsdp', 'tensor'); -1 = every remaining device. The paper model is sharded
    # over all devices (ZeRO-3 style). rules: a preset of exo2ego_jax/sharding.py;
    # rule_overrides: single rows over it, e.g. --config.mesh.rule_overrides.vocab=tensor.
    c.mesh = ml_collections.ConfigDict(
        dict(shape=(1, -1, 1), rules="fsdp", rule_overrides=ml_collections.ConfigDict())
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=2, async_save=True))
    c.log_every = 50  # steps between host reads of the metrics (no per-step sync)
    # Performance: a profiler trace of steps [start, stop) into <workdir>/profile ((0, 0) =
    # off), and the chip's peak TFLOP/s for the logged MFU (0 = from exo2ego_jax.training.perf).
    c.profile_steps = (0, 0)
    c.peak_tflops = 0.0
    # Count each batch shape's model FLOPs (one more lowering of the step, 1-5 s each on a
    # CPU) for the logged TFLOP/s and MFU; the demo turns it off.
    c.count_model_flops = True
    # Wait for the device after every step, so that the summary's timing (device_s) holds all
    # of the steps' compute: a host sync per step, for profiling only (bench/demo_profile.py).
    c.profile_timing = False
    # PRNG of the dropout masks: "" (JAX's default, threefry2x32) | rbg | unsafe_rbg (cheap
    # masks on accelerators; what MaxText uses for dropout).
    c.prng_impl = ""

    # Where this stage's inputs come from. Earlier stages' workdirs (params only, restored in
    # order, later stages overriding earlier ones) and pretrained Hugging Face / VideoLLaMA2
    # weights (empty = random init).
    c.init = ml_collections.ConfigDict()
    c.init.stages = _stage_workdirs("paper", stage)
    c.init.clip = ""  # HF CLIPVisionModel / CLIPModel dir for both towers
    c.init.llm = ""  # HF Mistral dir
    c.init.mm_projector = ""  # VideoLLaMA2 mm_projector.bin / .safetensors for E_exo
    # Output dir of `python -m exo2ego_jax.tools.convert` (CLIP x2 / Mistral / projector at
    # the Exo2Ego paths), restored straight into the sharded params after the loaders above
    # (overriding them) and before the stage hand-offs; set clip / llm to "" when using it.
    c.init.converted = ""
    # A paper-size model without pretrained CLIP and LLM weights trains from random
    # initialisation: hours of accelerator time for nothing. Refused unless this is True.
    c.init.allow_random = False
    if preset == "demo":
        c.update_from_flattened_dict(demo_overrides(stage))
    return c
