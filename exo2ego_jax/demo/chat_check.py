r"""Ask the trained model "What is C doing?" about held-out ego clips and count right answers.

The synthetic world's held-out takes (never trained on) carry narrations in the EgoMCQ
annotation file (``egobench/egomcq/egomcq.json``: every query and choice is a held-out clip
with its ``#C C ...`` narration). This tool takes the first ``--num_clips`` distinct clips
whose narration names an object (hand-object actions; head motions are skipped), asks the
chat model the action-recognition question about each, and compares the answer with the
narration after normalisation (lower case, no ``#C`` tag, no final period): the same
sentence is a correct answer. Per-part agreement (verb / colour / object words) is reported
too, for diagnosis. The question is asked in the prompt stage 3 trained on (the ``mistral``
template with the default system prompt); ``--first_person`` adds EgoBench's first-person cue
("You are the camera wearer.", the paper's evaluation prompt), which no training item carries:
a model's answers can change with it (seed 1 of the default demo: 9 of 20 exact without it,
0 with it, every answer one colour word, as the colour questions are answered). With
``--blank`` the same questions are also asked about black frames (what the model answers
without looking). With ``--clips train`` the question is asked about
clips stage 3 *trained* on (the world's "What is C doing?" instructions, spread evenly over
the file): how well the model fits its own training answers, a training-side signal that
does not look at the held-out clips.

    python -m exo2ego_jax.demo.chat_check --workdir workdirs/demo --data_dir demo_data \
        [--num_clips 20] [--clips heldout|train] [--first_person] [--blank] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from configs import demo as demo_configs
from exo2ego_jax.chat import ChatSession
from exo2ego_jax.eval.scoring import clip_frames_fn
from input_pipeline.egobench import Clip

QUESTION = "What is C doing in this video?"


def normalise(text: str) -> str:
    """``'#C C picks up the red cup.'`` -> ``'c picks up the red cup'``."""
    text = text.lower().replace("#c ", " ").strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", text)


def heldout_clips(world: Path, num_clips: int) -> list[tuple[Path, float, float, str]]:
    """``(video, start, end, narration)`` of distinct held-out hand-object clips."""
    path = world / "egobench" / "egomcq" / "egomcq.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; generate the demo world first (make demo)")
    seen, out = set(), []
    for rec in json.loads(path.read_text()).values():
        for clip in (rec["query"], *rec["choices"].values()):
            key = (clip["video_uid"], clip["clip_start"])
            if key in seen or not clip.get("tag_noun", "[]").strip("[] "):
                continue
            seen.add(key)
            video = world / "egobench" / "videos" / f"{clip['video_uid']}.mp4"
            out.append((video, clip["clip_start"], clip["clip_end"], clip["clip_text"]))
    return out[:num_clips]


def training_clips(world: Path, num_clips: int) -> list[tuple[Path, float, float, str]]:
    """``(video, start, end, answer)`` of distinct training clips whose instruction asks
    :data:`QUESTION`, ``num_clips`` of them spread evenly over the instruction file."""
    path = world / "egoit" / "egoit_instructions.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; generate the demo world first (make demo)")
    seen, out = set(), []
    for item in json.loads(path.read_text()):
        turns = item["conversations"]
        key = (item["video"], item["start"])
        if turns[0]["value"].replace("<video>", "").strip() != QUESTION or key in seen:
            continue
        seen.add(key)
        out.append((world / item["video"], item["start"], item["end"], turns[1]["value"]))
    return out[:: max(1, len(out) // num_clips)][:num_clips] if num_clips > 0 else []


def _verb_phrase(text: str) -> str:
    """``'C picks up the red cup.'`` -> ``'picks up'`` (empty if there is no object)."""
    m = re.match(r"c (.+?) the ", normalise(text) + " ")
    return m.group(1) if m else ""


def word_agreement(answer: str, truth: str, vocab: dict[str, list[str]]) -> dict[str, bool]:
    """For each word group (verbs, colours, shapes): does the answer use the truth's words?"""
    a, t = normalise(answer), normalise(truth)
    out = {}
    for group, words in vocab.items():
        want = [w for w in words if re.search(rf"\b{w}\b", t)]
        if want:
            out[group] = all(re.search(rf"\b{w}\b", a) for w in want)
    return out


def check(
    workdir: Path,
    data_dir: Path,
    num_clips: int = 20,
    blank: bool = False,
    clips: str = "heldout",
    first_person: bool = False,
) -> dict:
    """Runs the check on ``clips`` (``"heldout"`` or ``"train"``); returns ``{"correct",
    "total", "rows", "parts", ...}``. ``first_person``: ask with EgoBench's first-person cue
    in the system prompt instead of the training prompt."""
    if clips not in CLIP_SETS:
        raise ValueError(f"clips={clips!r}: choose one of {tuple(CLIP_SETS)}")
    world = data_dir / "world"
    manifest = json.loads((world / "world.json").read_text())["vocab"]
    vocab = {"colour": manifest["colors"], "object": manifest["shapes"]}
    session = ChatSession(check_config(workdir, data_dir, first_person), log=lambda *a: None)
    frames_of = clip_frames_fn(session.trained.model.config)
    rows = []
    for video, start, end, truth in CLIP_SETS[clips](world, num_clips):
        frames = frames_of(Clip(video, start, end))
        answer = session.ask(frames, QUESTION, stream=lambda piece: None)
        row = {
            "video": str(video.relative_to(world)),
            "start": start,
            "end": end,
            "truth": truth,
            "answer": answer,
            "correct": normalise(answer) == normalise(truth),
            "parts": word_agreement(answer, truth, vocab),
        }
        verb = _verb_phrase(truth)
        if verb:  # the words between "c" and the first "the": "picks up", "puts", "pours"
            row["parts"]["verb"] = _verb_phrase(answer) == verb
        if blank:
            black = np.zeros_like(frames)
            row["blank_answer"] = session.ask(black, QUESTION, stream=lambda piece: None)
        rows.append(row)
    parts: dict[str, list[bool]] = {}
    for r in rows:
        for k, v in r["parts"].items():
            parts.setdefault(k, []).append(v)
    return {
        "question": QUESTION,
        "clips": clips,
        "first_person": first_person,
        "correct": sum(r["correct"] for r in rows),
        "total": len(rows),
        "parts": {k: f"{sum(v)}/{len(v)}" for k, v in parts.items()},
        "blank_correct": (
            sum(normalise(r["blank_answer"]) == normalise(r["truth"]) for r in rows)
            if blank
            else None
        ),
        "rows": rows,
    }


def check_config(workdir: Path, data_dir: Path, first_person: bool = False):
    """The demo's chat config for the check: the training prompt (the chat's default) unless
    ``first_person`` (EgoBench's cue, ``config.chat.first_person``)."""
    config = demo_configs.eval_config(workdir, data_dir)
    config.chat.first_person = first_person
    return config


#: Which clips the check asks about (``--clips``).
CLIP_SETS = {"heldout": heldout_clips, "train": training_clips}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.demo.chat_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", default="workdirs/demo", help="demo workdir with stage0..3")
    p.add_argument("--data_dir", default="demo_data", help="demo data dir (world + prepared)")
    p.add_argument("--num_clips", type=int, default=20)
    p.add_argument(
        "--clips",
        choices=tuple(CLIP_SETS),
        default="heldout",
        help="held-out EgoMCQ clips (the check) or stage-3 training clips (how well it fits)",
    )
    p.add_argument(
        "--first_person",
        action="store_true",
        help='ask with EgoBench\'s first-person cue ("You are the camera wearer.")',
    )
    p.add_argument("--blank", action="store_true", help="also ask about black frames")
    p.add_argument("--out", default="", help="write the result as JSON here")
    a = p.parse_args(argv)
    result = check(Path(a.workdir), Path(a.data_dir), a.num_clips, a.blank, a.clips, a.first_person)
    for r in result["rows"]:
        mark = "OK " if r["correct"] else "   "
        print(f"{mark} truth: {normalise(r['truth'])!r:48} answer: {normalise(r['answer'])!r}")
    print(
        f"{result['correct']}/{result['total']} {a.clips} clips answered exactly; "
        f"parts right: {result['parts']}"
        + (f"; black frames: {result['blank_correct']}/{result['total']}" if a.blank else "")
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
