"""The built-in demo: the whole Exo2Ego pipeline on the synthetic world, on a laptop CPU.

``python main.py --demo`` (what ``make demo`` runs):

1. generate the synthetic ego/exo world (if missing;           ``<data_dir>/world``
   ``WORLD_TAKES`` takes)
2. build the datasets and the demo tokenizer (if missing)     ``<data_dir>/prepared``
3. pretrain the demo LLM on the training text (if missing)     ``<data_dir>/prepared/llm``
   (stands in for the downloaded Mistral-7B-Instruct) and the demo CLIP tower on a labelled
   corpus of freshly rendered takes (if missing)                 ``<data_dir>/prepared/clip``
   (stands in for the downloaded CLIP ViT-L/14-336); the full demo copies the tower that
   same command made, shipped with the package (``exo2ego_jax.demo.shipped_clip``), unless
   ``pretrain_clip``
4. stages 0 -> 1 -> 2 -> 3, each handing its weights to the next through Orbax checkpoints
   (``<workdir>/stageN``; a rerun resumes / skips finished stages)
5. the synthetic EgoBench with the stage-3 model, and a results table;
6. the chat check: "What is C doing?" about 20 held-out ego clips (``exo2ego_jax.demo.chat_check``).

Every step is restartable: finished pieces are found on disk and kept. Each phase's wall time
is recorded (:class:`Phases`, ``demo_summary.json``); ``bench/demo_profile.py`` profiles them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import jax

from configs import demo as demo_configs
from exo2ego_jax import config_lib
from exo2ego_jax.demo import chat_check, shipped_clip
from exo2ego_jax.demo.pretrain_clip import pretrain as pretrain_clip_tower
from exo2ego_jax.demo.pretrain_lm import pretrain as pretrain_lm
from exo2ego_jax.eval.evaluate import evaluate
from exo2ego_jax.models.mistral import from_hf_config
from exo2ego_jax.training import checkpoints
from exo2ego_jax.training.loop import train
from input_pipeline import progress
from input_pipeline.prepare import prepare
from input_pipeline.synthetic import generate_world

# Takes in the demo's world. The stage-3 model's held-out answers keep improving with the
# world's size (docs/egobench.md: 64 / 160 / 320 takes); 320 takes is about 5 min to render.
WORLD_TAKES = 320


class DemoInterrupted(RuntimeError):
    """A stage was stopped (SIGTERM) before its last step: the demo stops there too."""


class Phases:
    """The demo's phases as they run, in order: ``seconds[name]`` (wall clock) and
    ``details[name]`` (what the phase did, e.g. ``{"steps": 600}``). A phase skipped because
    its output exists is absent. Names: ``world rendering``, ``dataset preparation``,
    ``LM pretraining``, ``CLIP-corpus rendering``, ``CLIP pretraining``, ``stage 0`` ...
    ``stage 3``, ``EgoBench``, ``chat check``."""

    def __init__(self, display: progress.RunDisplay | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.details: dict[str, dict] = {}
        self.display = display

    @contextlib.contextmanager
    def timed(self, name: str, **details):
        """Times the ``with`` block as phase ``name``; yields its details dict (to add to)."""
        t0 = time.perf_counter()
        with self.showing(name):
            yield self.details.setdefault(name, dict(details))
        self.seconds[name] = time.perf_counter() - t0

    def showing(self, name: str):
        """The progress display's phase ``name`` for the ``with`` block (a phase timed by
        :meth:`record` afterwards, or split in two there, shows as one)."""
        return self.display.phase(name) if self.display else contextlib.nullcontext()

    def record(self, name: str, seconds: float, **details) -> None:
        """A phase timed elsewhere."""
        self.seconds[name] = seconds
        self.details[name] = dict(details)

    def summary(self) -> dict[str, dict]:
        """``{name: {"seconds", **details}}`` in order."""
        return {k: {"seconds": v, **self.details.get(k, {})} for k, v in self.seconds.items()}

    def line(self) -> str:
        """One line: every phase's wall time."""
        return ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())


def prepare_data(
    data_dir: Path,
    *,
    seed: int = 0,
    log=print,
    world_kwargs: dict | None = None,
    lm_steps: int = 0,
    clip_steps: int = 0,
    clip_takes: int = 0,
    progress: bool = True,
    phases: Phases | None = None,
    pretrain_clip: bool = True,
    clip_views: tuple[str, ...] = shipped_clip.DEFAULT_VIEWS,
) -> None:
    """Steps 1-3 (each skipped when its output exists), each timed into ``phases``.

    ``world_kwargs`` go to ``generate_world`` (``num_takes`` defaults to ``WORLD_TAKES``;
    an existing world is kept whatever its size); ``lm_steps`` /
    ``clip_steps`` > 0 shorten the demo LM / CLIP pretraining and ``clip_takes`` > 0 sets the
    size of the CLIP corpus (0 = their defaults) and ``clip_views`` its camera kinds
    (``("exo",)``: third-person only, as web CLIP is). ``pretrain_clip=False`` copies the
    shipped tower instead when it is what pretraining would make (:func:`clip_phase`).
    """
    phases = phases if phases is not None else Phases()
    world, prepared = data_dir / "world", data_dir / "prepared"
    outputs = prepared_outputs(data_dir)
    model = demo_configs.stage_config(0, data_dir, data_dir).model  # vocabulary, tower, LM
    shapes = config_lib.build_model_config(model)
    if not outputs["world rendering"].exists():
        kwargs = {"num_takes": WORLD_TAKES, **(world_kwargs or {})}
        with phases.timed("world rendering", takes=kwargs["num_takes"]):
            generate_world(world, seed=seed, progress=progress, **kwargs)
        seconds = phases.seconds["world rendering"]
        log(f"[demo] generated the synthetic world in {seconds:.0f}s -> {world}")
    if not outputs["dataset preparation"].exists():
        with phases.timed("dataset preparation"):
            prepare(world, prepared, progress=progress)
        seconds = phases.seconds["dataset preparation"]
        log(f"[demo] prepared datasets + tokenizer in {seconds:.0f}s -> {prepared}")
    if not outputs["LM pretraining"].exists():
        steps = {"steps": lm_steps} if lm_steps > 0 else {}
        with phases.timed("LM pretraining") as details:
            s = pretrain_lm(
                prepared,
                prepared / "llm",
                config=dataclasses.replace(shapes.llm, lora=None),
                vocab_size=model.vocab_size,
                seed=seed,
                progress=progress,
                **steps,
            )
            details["steps"] = s["steps"]
        log(
            f"[demo] demo LLM pretrained: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} "
            f"({s['seconds']:.0f}s)"
        )
    check_demo_lm(prepared / "llm", shapes.llm)
    if not outputs["CLIP pretraining"].exists() and (
        clip_phase(shapes.clip, pretrain_clip, seed, clip_steps, clip_takes, clip_views)
        == SHIPPED_CLIP
    ):
        with phases.timed(SHIPPED_CLIP):
            info = shipped_clip.install(prepared / "clip", shipped_clip.assets_for(clip_views))
        log(
            f"[demo] demo CLIP: copied the shipped tower (sha256 "
            f"{info['sha256']['model.safetensors'][:12]}..., made by `{info['command']}`; "
            "--pretrain_clip pretrains it here instead, ~30 min on 2 cores)"
        )
    if not outputs["CLIP pretraining"].exists():
        tower = shapes.clip
        sizes = {"steps": clip_steps} if clip_steps > 0 else {}
        sizes |= {"num_takes": clip_takes} if clip_takes > 0 else {}
        t0 = time.perf_counter()
        with phases.showing("CLIP pretraining"):
            s = pretrain_clip_tower(
                prepared / "clip",
                config=tower,
                views=tuple(clip_views),
                seed=seed,
                progress=progress,
                **sizes,
            )
        seconds = time.perf_counter() - t0
        clips = s["clips"] + s["val_clips"]
        phases.record("CLIP-corpus rendering", s["corpus_seconds"], clips=clips)
        phases.record("CLIP pretraining", seconds - s["corpus_seconds"], steps=s["steps"])
        acc = ", ".join(f"{k} {v:.2f}" for k, v in s["accuracy"].items())
        ego = s["accuracy_by_view"].get("ego", {}).get("all")
        ego_acc = f" (ego clips: all fields {ego:.2f})" if ego is not None else ""
        log(
            f"[demo] demo CLIP pretrained on {s['clips']} corpus clips: loss "
            f"{s['first_loss']:.2f} -> {s['last_loss']:.2f}; held-out accuracy {acc}{ego_acc} "
            f"({s['seconds']:.0f}s, of which {s['corpus_seconds']:.0f}s rendering the corpus)"
        )


#: The phase that copies the shipped stand-in CLIP instead of pretraining it.
SHIPPED_CLIP = "CLIP stand-in (shipped)"


def clip_phase(
    tower,
    pretrain_clip: bool,
    seed: int = 0,
    clip_steps: int = 0,
    clip_takes: int = 0,
    views: tuple[str, ...] = shipped_clip.DEFAULT_VIEWS,
) -> str:
    """``SHIPPED_CLIP`` when a shipped tower is exactly what pretraining would make here
    (its shape, seed 0, the default corpus size and steps, the same corpus ``views``) and
    ``pretrain_clip`` is off, else ``"CLIP pretraining"``."""
    default_run = seed == 0 and clip_steps <= 0 and clip_takes <= 0
    try:
        assets = shipped_clip.assets_for(views)
    except ValueError:  # no tower of these views is shipped
        return "CLIP pretraining"
    if not pretrain_clip and default_run and shipped_clip.matches(tower, assets):
        return SHIPPED_CLIP
    return "CLIP pretraining"


def prepared_outputs(data_dir: Path) -> dict[str, Path]:
    """The file each of steps 1-3 leaves behind (a step is skipped when its file exists)."""
    world, prepared = data_dir / "world", data_dir / "prepared"
    return {
        "world rendering": world / "world.json",
        "dataset preparation": prepared / "tokenizer",
        "LM pretraining": prepared / "llm" / "config.json",
        "CLIP pretraining": prepared / "clip" / "config.json",
    }


def check_demo_lm(path: Path, llm) -> None:
    """An existing demo LM must have the shape ``config.model.llm`` asks for (the stages would
    refuse it later, after minutes of work)."""
    saved = from_hf_config(json.loads((path / "config.json").read_text()))
    fields = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads")
    have = {k: getattr(saved, k) for k in fields}
    want = {k: getattr(llm, k) for k in fields}
    if have != want:
        raise ValueError(
            f"{path} holds a demo LM of shape {have}, but config.model.llm asks for {want}; "
            f"delete {path} to pretrain it again at the new shape (or set config.model.llm)"
        )


#: ``--quick``: the whole pipeline on a tiny world in a few minutes (first contact, CI).
#: Every piece still runs: world, datasets, both stand-ins, stages 0-3 with their Orbax
#: hand-offs, EgoBench and the chat check, each much smaller.
QUICK = {
    "world": dict(num_takes=8, heldout_takes=2, size=64, fps=6),
    "lm_steps": 30,
    "clip_steps": 20,
    "clip_takes": 4,
    "stage": {"optim.num_steps": 4, "log_every": 2},
    "eval": dict(max_items=2, retrieval_max_clips=3, open_max_new_tokens=8),
    "chat_clips": 3,
}


#: Seconds each phase of the progress display is expected to take on an idle 2-core CPU,
#: measured 2026-12-05: quick, ``python main.py --demo --quick`` (2.6 min); default, ``make
#: demo`` in a fresh clone of 514e32d (14.8 min with the shipped CLIP; docs/egobench.md; the
#: CLIP phase, ``--pretrain_clip``, is an earlier run's, corpus rendering included). The
#: display rescales them by this machine's speed on the phases already finished, so their
#: proportions matter more than their values.
EXPECTED_SECONDS = {
    "quick": {
        "world rendering": 6, "dataset preparation": 1, "LM pretraining": 6,
        "CLIP pretraining": 21, "stage 0": 30, "stage 1": 10, "stage 2": 23, "stage 3": 37,
        "EgoBench": 14, "chat check": 8,
    },
    "default": {
        "world rendering": 104, "dataset preparation": 2, "LM pretraining": 24,
        "CLIP pretraining": 1785, SHIPPED_CLIP: 1, "stage 0": 192, "stage 1": 27,
        "stage 2": 67, "stage 3": 355, "EgoBench": 102, "chat check": 9,
    },
}  # fmt: skip


def use_compilation_cache(workdir: Path) -> None:
    """A persistent XLA cache in ``<workdir>/jax_cache`` (stages and reruns share programs);
    an already configured cache is kept."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str((workdir / "jax_cache").absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def evaluate_demo(workdir: Path, data_dir: Path, *, log=print, overrides=None) -> dict:
    """Step 5: the synthetic EgoBench with the stage-3 model; prints the results table."""
    config = demo_configs.eval_config(workdir, data_dir)
    config.eval.update(overrides or {})
    _, metrics = evaluate(config, log=log)
    return metrics


def _stage_finished(config) -> int | None:
    """The last step of ``config``'s stage if its workdir holds a finished run, else None."""
    try:
        step, meta = checkpoints.read_meta(Path(config.workdir))
    except checkpoints.HandOffError:
        return None
    return step if meta.get("finished") else None


def planned_phases(
    workdir: Path,
    data_dir: Path,
    stage_overrides: dict | None = None,
    clip: str = "CLIP pretraining",
) -> list[str]:
    """The phases a run would go through, in order (finished pieces found on disk are not);
    ``clip``: the CLIP phase's name (:func:`clip_phase`)."""
    todo = [
        clip if k == "CLIP pretraining" else k
        for k, path in prepared_outputs(data_dir).items()
        if not path.exists()
    ]
    for stage in range(4):
        config = demo_configs.stage_config(stage, workdir, data_dir, **(stage_overrides or {}))
        if _stage_finished(config) is None:
            todo.append(f"stage {stage}")
    return todo + ["EgoBench", "chat check"]


def run(
    workdir: str | Path = "workdirs/demo",
    data_dir: str | Path = "demo_data",
    *,
    world_takes: int = WORLD_TAKES,
    quick: bool = False,
    log=print,
    phases: Phases | None = None,
    stage_overrides: dict | None = None,
    seed: int = 0,
    pretrain_clip: bool = False,
) -> dict:
    """Runs the demo end to end; returns per-stage loss summaries and timings, eval results,
    the chat check's counts and every phase's wall time. ``world_takes``: size of the world
    if it has to be generated; ``quick``: the :data:`QUICK` sizes; ``phases`` receives the
    phases' timings as they end; ``stage_overrides``: dotted config fields over every
    stage's (e.g. ``{"profile_timing": True}``); ``seed``: the stages' seed (initialisation
    and data order; the world and the stand-ins are always seed 0, so every seed is tested
    on the same EgoBench items); ``pretrain_clip``: pretrain the stand-in CLIP here even
    when the shipped one is what that would make (``--quick`` always pretrains its small
    one). One progress line shows the phase and the time left."""
    workdir, data_dir = Path(workdir), Path(data_dir)
    phases = phases if phases is not None else Phases()
    logging.getLogger("absl").setLevel(logging.WARNING)  # keep Orbax's INFO chatter quiet
    use_compilation_cache(workdir)
    stage_overrides = {**(QUICK["stage"] if quick else {}), "seed": seed, **(stage_overrides or {})}
    tower = demo_configs.stage_config(0, workdir, data_dir).model
    clip = clip_phase(config_lib.build_model_config(tower).clip, pretrain_clip or quick)
    plan = planned_phases(workdir, data_dir, stage_overrides, clip)
    expected = EXPECTED_SECONDS["quick" if quick else "default"]
    t0 = time.time()
    with progress.run_display("demo", plan, expected) as display:
        phases.display = display
        if quick:
            prepare_data(
                data_dir,
                log=log,
                world_kwargs=QUICK["world"],
                lm_steps=QUICK["lm_steps"],
                clip_steps=QUICK["clip_steps"],
                clip_takes=QUICK["clip_takes"],
                phases=phases,
            )
        else:
            world = {"num_takes": world_takes}
            prepare_data(
                data_dir,
                log=log,
                world_kwargs=world,
                phases=phases,
                pretrain_clip=pretrain_clip,
            )
        results = {"stages": _train_stages(workdir, data_dir, stage_overrides, phases, log)}
        with phases.timed("EgoBench"):
            results["eval"] = evaluate_demo(
                workdir, data_dir, log=log, overrides=QUICK["eval"] if quick else None
            )
        chat_clips = QUICK["chat_clips"] if quick else 20
        with phases.timed("chat check", clips=chat_clips):
            check = chat_check.check(workdir, data_dir, num_clips=chat_clips)
    results["chat_check"] = {k: check[k] for k in ("question", "correct", "total", "parts")}
    parts = ", ".join(f"{k} {v}" for k, v in check["parts"].items())
    log(
        f"[demo] chat check: {check['correct']}/{check['total']} held-out ego clips answered "
        f"exactly to {check['question']!r} (right {parts}); details: python -m "
        f"exo2ego_jax.demo.chat_check --workdir {workdir} --data_dir {data_dir}"
    )
    results["seed"] = seed
    results["seconds"] = time.time() - t0
    results["phases"] = phases.summary()
    (workdir / "demo_summary.json").write_text(json.dumps(results, indent=2))
    log(
        f"[demo] finished in {results['seconds'] / 60:.1f} min ({phases.line()}); summary in "
        f"{workdir / 'demo_summary.json'}"
    )
    return results


def _train_stages(workdir: Path, data_dir: Path, overrides: dict, phases: Phases, log) -> dict:
    """Step 4: stages 0-3 (a finished stage is kept); each stage's loss summary and timing."""
    summaries: dict = {}
    for stage in range(4):
        config = demo_configs.stage_config(stage, workdir, data_dir, **overrides)
        wd = Path(config.workdir)
        if (step := _stage_finished(config)) is not None:
            log(f"[demo] stage {stage}: already finished ({wd}, step {step})")
            continue
        t_stage = time.perf_counter()
        with phases.showing(f"stage {stage}"):
            summary = train(config, wd, log=logging.info)
        if summary["first_loss"] is None:
            log(f"[demo] stage {stage}: already finished ({wd}, step {summary['steps']})")
            continue
        if summary.get("preempted"):
            # A later stage would start from this unfinished one: stop; a rerun resumes it.
            raise DemoInterrupted(
                f"[demo] stage {stage} stopped at step {summary['steps']} (SIGTERM); its "
                f"checkpoint is in {wd}: rerun the same command to resume the demo"
            )
        steps_run = summary["steps"] - summary["start_step"]
        phases.record(f"stage {stage}", time.perf_counter() - t_stage, steps=steps_run)
        log(
            f"[demo] stage {stage}: {summary['steps']} steps, loss "
            f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
            f"({phases.seconds[f'stage {stage}']:.0f}s)"
        )
        keep = ("first_loss", "last_loss", "steps", "start_step", "compiled_shapes", "timing")
        summaries[stage] = {k: summary[k] for k in keep}
    return summaries
