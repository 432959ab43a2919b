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

import ml_collections

PRESETS = ("default", "quick")

# The ego-only baseline's model: one encoder, no E_exo, no F / G, x alone replaces <video>.
_EGO_ONLY = {"fusion": "x_only", "with_exo": False, "with_mapping": False}


def _arm(stages: tuple[int, ...], **per_stage: dict) -> ml_collections.ConfigDict:
    """``stages`` trained in order; ``stageN=`` nested overrides of stage N's config."""
    arm = ml_collections.ConfigDict()
    arm.stages = tuple(stages)
    # "" or an arm: train each stage for as many updates as that arm's same stage.
    arm.steps_like = per_stage.pop("steps_like", "")
    for k in range(4):
        arm[f"stage{k}"] = ml_collections.ConfigDict(per_stage.get(f"stage{k}", {}))
    return arm


def arm_defs() -> ml_collections.ConfigDict:
    """Every arm the study knows (``config.arms`` picks the ones to run)."""
    mlp = {"model": {"mapping": {"kind": "mlp"}}}  # F and G exist from stage 2 on
    return ml_collections.ConfigDict(
        {
            # Same tiny model and budget, ego data only: stage 0 (E_ego) and stage 3.
            "baseline": _arm(
                (0, 3),
                stage0={"model": dict(_EGO_ONLY), "stage": {"stage0_encoders": ("ego",)}},
                stage3={"model": dict(_EGO_ONLY)},
                # Same budget as full: equal epochs of the scarce ego corpus alone would give
                # its stage 0 a fraction of the updates full's E_ego gets (steps per epoch
                # follow the largest stream, the exo corpus).
                steps_like="full",
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
    # The world, datasets, demo LM and CLIP, shared by all arms and seeds ("" = <root>/data).
    # The default world regime is the demo's, so the demo's data is reused (made if missing;
    # a world of another regime there is refused).
    c.data_dir = "demo_data"
    c.seeds = (0, 1)
    c.arms = ("baseline", "full", "no_kl", "no_g_ccl", "forward_cycle", "fc_mapping", "no_lora")
    c.arm_defs = arm_defs()

    # The synthetic world's data regime (input_pipeline.synthetic.generate_world): few
    # ego clip-text takes, many exo clip-text takes, synchronized ego-exo pairs, and the
    # held-out takes EgoBench is built from. The default is the demo world's split.
    w = c.world = ml_collections.ConfigDict()
    w.seed = 0  # fixed across study seeds: seeds vary initialisation and data order only
    w.num_takes = 64
    w.pair_takes = 16  # Ego-ExoClip: synchronized ego + exo with narrations
    w.ego_takes = 6  # EgoClip: ego clip-text (scarce)
    w.exo_takes = 32  # exo clip-text, the "web video-text" (plentiful)
    w.heldout_takes = 10  # EgoBench only
    w.size = 128  # rendered video resolution (the model resizes to model.image_size)
    w.fps = 8
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
    # Fewer epochs than the demo in stages 2-3, which are trained once per arm (5 stage-2 and
    # 7 stage-3 runs per seed), and in stage 0 (the demo's 32 would add ~25 min per seed):
    # the 90-minute budget of docs/study.md, measured with these schedules.
    c.optim.stage0.num_epochs = 8
    c.optim.stage2.num_epochs = 10
    c.optim.stage3.num_epochs = 2

    # The stage curve: EgoBench after these stages of `curve.arm` (paper: init, 2, 3).
    c.curve = ml_collections.ConfigDict()
    c.curve.arm = "full"
    c.curve.after_stages = (0, 2, 3)
    # Before stage 2, F is untrained: the model is evaluated as its ego encoder alone.
    c.curve.pre_mapping_fusion = "x_only"

    e = c.eval = ml_collections.ConfigDict()
    # All held-out items (~400 over the nine task files of the demo world): every arm is
    # scored on the same items, and eval is cheap next to training (~2 min per model).
    e.max_items = 0  # per task, 0 = all
    e.retrieval_max_clips = 0  # EPIC MIR clips, 0 = all
    e.tasks = ()  # () = all eight EgoBench tasks
    e.std_ddof = 1  # sample standard deviation over seeds
    e.plots = True  # PNGs of the ablations and the stage curve (needs matplotlib)

    if preset == "quick":
        c.root = "workdirs/study_quick"
        c.data_dir = ""  # a tiny world of its own
        c.seeds = (0,)
        c.arms = ("baseline", "full")
        w.num_takes, w.pair_takes, w.ego_takes, w.exo_takes, w.heldout_takes = 7, 2, 1, 2, 2
        w.size, w.fps = 64, 6
        c.lm_steps, c.clip_steps, c.clip_takes = 30, 30, 6
        for k in range(4):
            c.optim[f"stage{k}"].num_steps = 3
        e.max_items, e.retrieval_max_clips = 2, 3
        c.curve.after_stages = ()  # the full arm's evaluation is the only one of its chain
    return c
