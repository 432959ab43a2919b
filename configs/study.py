"""Study config: ``python -m exo2ego_jax.demo.study --config=configs/study.py[:quick]``.

The study reproduces the paper's claims at demo scale (docs/study.md): an ego-only baseline,
full Exo2Ego, each Table 3 ablation (method.md §6) as one config switch, and the stage curve
(EgoBench after stage 0 / stage 2 / stage 3), each over several seeds.

Presets (the part after ``:``; ``--quick`` on the command line selects ``quick`` too):

* ``default``: the paper's data regime in the demo world (scarce ego clip-text, plentiful
  exo clip-text, synchronized pairs), every arm, several seeds; sized for ~90 min on 2 CPU
  cores (docs/study.md, "Time budget").
* ``quick``: one seed, ``baseline`` and ``full``, a tiny world, a few steps per stage and a
  small EgoBench: an end-to-end smoke test of a few minutes.

Arms are data: ``arm_defs.<name>`` lists the stages the arm trains and, per stage, the
config overrides applied on top of ``demo.stage_config`` (nested like the stage config:
``stage2.stage.use_kl=False`` is ``--config.stage.use_kl=False`` of stage 2). An arm's
evaluated model is built with the ``model`` overrides of its last stage. Identical stage
configs (same overrides, same parents) are trained once and shared between arms.
"""

from __future__ import annotations

from typing import Any

import ml_collections

PRESETS = ("default", "quick")

# The ego-only baseline's model: one encoder, no E_exo, no F / G, x alone replaces <video>.
_EGO_ONLY = {"fusion": "x_only", "with_exo": False, "with_mapping": False}


def _arm(stages: tuple[int, ...], **per_stage: Any) -> ml_collections.ConfigDict:
    """``stages`` trained in order; ``stageN=`` nested overrides of stage N's config."""
    arm = ml_collections.ConfigDict()
    arm.stages = tuple(stages)
    # "" or an arm: train each stage for as many updates as that arm's stages named in
    # ``steps_of`` ("stageK": stages whose updates are summed; default: the same stage).
    arm.steps_like = per_stage.pop("steps_like", "")
    steps_of = per_stage.pop("steps_of", {})
    arm.steps_of = ml_collections.ConfigDict(
        {f"stage{k}": tuple(steps_of.get(f"stage{k}", (k,))) for k in range(4)}
    )
    for k in range(4):
        arm[f"stage{k}"] = ml_collections.ConfigDict(per_stage.get(f"stage{k}", {}))
    return arm


def arm_defs() -> ml_collections.ConfigDict:
    """Every arm the study knows (``config.arms`` picks the ones to run)."""
    mlp = {"model": {"mapping": {"kind": "mlp"}}}  # F and G exist from stage 2 on
    return ml_collections.ConfigDict(
        {
            # Same tiny model, every ego clip and text Exo2Ego sees (the EgoClip corpus and
            # the ego halves of the Ego-ExoClip pairs with their narrations, in one stream),
            # the same number of updates; only the exo encoder, the exo data and F / G are
            # missing. Its stage 0 gets the updates of full's stages 0 and 2 (where full's
            # E_ego trains before stage 3), its stage 3 those of full's stage 3.
            "baseline": _arm(
                (0, 3),
                stage0={
                    "model": dict(_EGO_ONLY),
                    "stage": {"stage0_encoders": ("ego",)},
                    "data": {"datasets": {"ego_caption": "ego_clip+ego_exo_clip"}},
                },
                stage3={"model": dict(_EGO_ONLY)},
                steps_like="full",
                steps_of={"stage0": (0, 2)},
            ),
            "full": _arm((0, 1, 2, 3)),
            "no_kl": _arm((0, 1, 2, 3), stage2={"stage": {"use_kl": False}}),
            # use_ccl=False also leaves G untrained (stages.py); G is never used elsewhere.
            "no_g_ccl": _arm((0, 1, 2, 3), stage2={"stage": {"use_ccl": False}}),
            "forward_cycle": _arm((0, 1, 2, 3), stage2={"stage": {"ccl_forward_only": True}}),
            "fc_mapping": _arm((0, 1, 2, 3), stage2=mlp, stage3=mlp),
            "no_lora": _arm(
                (0, 1, 2, 3),
                stage3={"model": {"lora": {"enabled": False}}, "stage": {"train_lora": False}},
            ),
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = (arg or "default").strip() or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown study preset {preset!r}; choose one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.root = "workdirs/study"  # every output: data, stage runs, evaluations, tables, plots
    # The world, datasets, demo LM and CLIP, shared by all arms and seeds ("" = <root>/data:
    # the study's regime is not the demo's, so it has a world of its own; a world of another
    # regime found there is refused).
    c.data_dir = ""
    c.seeds = (0, 1, 2)
    c.arms = ("baseline", "full", "no_kl", "no_g_ccl", "forward_cycle", "fc_mapping", "no_lora")
    c.arm_defs = arm_defs()
    # Stage-config fields set for every arm that trains the stage, under the arm's own
    # overrides; None keeps the stage's default (and the jobs' ids): a study-wide change is
    # one flag, e.g. --config.all_arms.stage2.stage.kl_temperature=0.1.
    c.all_arms = ml_collections.ConfigDict({f"stage{k}": {} for k in range(4)})
    c.all_arms.stage2.stage = ml_collections.ConfigDict(
        {"kl_temperature": ml_collections.config_dict.placeholder(float)}
    )

    # The synthetic world's data regime (input_pipeline.synthetic.generate_world): few
    # ego clip-text takes, many exo clip-text takes, synchronized ego-exo pairs, and the
    # held-out takes EgoBench is built from; the transfer concepts (docs/study.md) occur in
    # the exo data only, never in a pair or ego take, and half of the held-out takes act on
    # one ("transfer" items) while the rest hold none ("seen" items).
    w = c.world = ml_collections.ConfigDict()
    w.seed = 0  # fixed across study seeds: seeds vary initialisation and data order only
    # Sizes fixed by the validation pilot's timing (docs/study.md, "The validation pilot").
    w.num_takes = 160
    w.pair_takes = 40  # Ego-ExoClip: synchronized ego + exo with narrations
    w.ego_takes = 16  # EgoClip: ego clip-text (scarce)
    w.exo_takes = 80  # exo clip-text, the "web video-text" (plentiful)
    w.heldout_takes = 24  # EgoBench only (the test items)
    w.size = 128  # rendered video resolution (the model resizes to model.image_size)
    w.fps = 8
    w.transfer_colors = ("purple",)
    w.transfer_shapes = ("knife",)
    w.transfer_heldout_fraction = 0.5
    # Held-out takes for tuning only (their own EgoBench under egobench_val/; no take is
    # shared with the test items): --config.eval.split=val scores them. 24 (12 transfer):
    # the diagnostics' probes need 4 takes of each kind per concept (docs/study.md).
    w.val_takes = 24
    # The stand-in CLIP's pretraining corpus: third-person views only, as web CLIP's
    # (a shipped tower, exo2ego_jax/demo/shipped_clip.py); ("ego", "exo") is the demo's.
    c.clip_views = ("exo",)
    # Pretrain the stand-in CLIP here (~45 min on 2 cores) even when a shipped tower is what
    # that would make (the default copies it: same bytes, exo2ego_jax/demo/shipped_clip.py).
    c.pretrain_clip = False
    # Persistent XLA compilation cache ("" = off; <root> is replaced by c.root).
    c.compilation_cache = "<root>/jax_cache"
    c.lm_steps = 0  # demo LM pretraining steps; 0 = demo.prepare_data's default
    c.clip_steps = 0  # demo CLIP pretraining steps; 0 = demo.prepare_data's default
    c.clip_takes = 0  # takes in the demo CLIP's rendered corpus; 0 = the default

    # Per-stage schedule on top of the demo's: 0 keeps the demo default. num_steps > 0
    # wins over num_epochs (as in the stage configs).
    c.optim = ml_collections.ConfigDict(
        {f"stage{k}": {"num_epochs": 0, "num_steps": 0} for k in range(4)}
    )
    # Stage 2 trains F and G to the end of their loss's fall (16 epochs: at 4 its loss was
    # still 1.87, docs/study.md "Decision before the test run"); stage 3 is trained once per
    # arm (7 runs per seed), so its epochs are what is left of the 90-minute budget (3 is
    # the largest that keeps 3 seeds within 85 min by the pre-registered time rule).
    # Stage 0: 16 epochs, where E_exo's exo captioning loss ends at 0.46 instead of 1.05 at 8
    # (docs/study.md, "The round of changes", chosen on the validation split).
    c.optim.stage0.num_epochs = 16
    c.optim.stage1.num_epochs = 4
    c.optim.stage2.num_epochs = 16
    c.optim.stage3.num_epochs = 3

    # The stage curve: EgoBench after these stages of `curve.arm` (paper: init, 2, 3).
    c.curve = ml_collections.ConfigDict()
    c.curve.arm = "full"
    c.curve.after_stages = (0, 2, 3)
    # Before stage 2, F is untrained: the model is evaluated as its ego encoder alone.
    c.curve.pre_mapping_fusion = "x_only"

    e = c.eval = ml_collections.ConfigDict()
    # "test": the held-out takes (egobench/); "val": the validation takes (egobench_val/),
    # the only split any tuning may look at.
    e.split = "test"
    # All held-out items (~400 over the nine task files of the demo world): every arm is
    # scored on the same items, and eval is cheap next to training (~2 min per model).
    e.max_items = 0  # per task, 0 = all
    e.retrieval_max_clips = 0  # EPIC MIR clips, 0 = all
    e.tasks = ()  # () = all eight EgoBench tasks
    e.std_ddof = 1  # sample standard deviation over seeds
    e.plots = True  # PNGs of the ablations and the stage curve (needs matplotlib)

    return _quick(c) if preset == "quick" else c


def _quick(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``quick`` preset over the default: a smoke test of a few minutes."""
    c.root = "workdirs/study_quick"
    c.data_dir = ""  # a tiny world of its own
    c.seeds = (0,)
    c.arms = ("baseline", "full")
    w = c.world
    w.num_takes, w.pair_takes, w.ego_takes, w.exo_takes, w.heldout_takes = 7, 2, 1, 2, 2
    w.size, w.fps = 64, 6
    w.val_takes = 0  # no tuning in a smoke test
    c.lm_steps, c.clip_steps, c.clip_takes = 30, 30, 6
    for k in range(4):
        c.optim[f"stage{k}"].num_steps = 3
    # 4 items: both EgoTaskQA kinds (direct, indirect) among the first ones
    c.eval.max_items, c.eval.retrieval_max_clips = 4, 3
    c.curve.after_stages = ()  # the full arm's evaluation is the only one of its chain
    return c
