"""EgoBench question answering on held-out takes: EgoSchema, QaEgo4D, EgoTaskQA, EgoPlan,
VLN-QA and EgoMCQ records, each in its benchmark's own fields.

Every builder takes the held-out takes and its own random stream (``rng``), and draws options
and distractors from it in a fixed order; :mod:`input_pipeline.synthetic.egobench` writes the
records to files.
"""

from __future__ import annotations

from input_pipeline.synthetic.corpora import egoclip_row
from input_pipeline.synthetic.file_formats import annotation_time, clip_window
from input_pipeline.synthetic.language import (
    NUMBER_WORDS,
    final_location,
    imperative,
    indirect_reference,
    nav_answer,
    phrase,
)
from input_pipeline.synthetic.sampling import sample_take_spec
from input_pipeline.synthetic.takes import EGO_CAMERA, Step, Subtask, TakeSpec, random_uuid
from input_pipeline.synthetic.vocabulary import (
    COLORS,
    NAV_MOTIONS,
    NAV_VERBS,
    POURABLE,
    PUSH_DIRECTIONS,
    SHAPES,
    VERBS,
    verb_form,
)

__all__ = ["egoschema", "qaego4d", "egotaskqa", "egoplan", "vlnqa", "egomcq"]

# Where an object can end up, as answer options ("in the red bowl", "on the left side ...").
_LOCATIONS = (
    [f"in the {c} bowl" for c in COLORS]
    + [f"on the {r} side of the table" for r in ("left", "right")]
    + ["in the middle of the table"]
)


def _distinct(rng, correct: str, pool: list[str], k: int) -> list[str]:
    """``k`` distractors from ``pool`` that differ from ``correct`` and from each other."""
    seen = {correct}
    out = []
    for p in rng.permutation(pool).tolist():
        if p not in seen:
            seen.add(p)
            out.append(p)
        if len(out) == k:
            break
    return out


def _fake_phrases(take: TakeSpec, rng, form: str = "3rd", articles: bool = True) -> list[str]:
    """Plausible action phrases about this take's objects (mostly not what happened)."""
    out = []
    names = [o.name for o in take.objects]
    for verb in VERBS:
        for o in range(len(take.objects)):
            sh = take.objects[o].shape
            if verb in NAV_VERBS:
                continue
            if verb == "pour" and sh not in POURABLE:
                continue
            bowls = [b for b, ob in enumerate(take.objects) if ob.shape == "bowl" and b != o]
            if verb in ("put in", "pour") and not bowls:
                continue
            s = Step(
                verb,
                o,
                bowls[0] if verb in ("put in", "pour") else None,
                str(rng.choice(list(PUSH_DIRECTIONS))) if verb == "push" else None,
            )
            out.append(phrase(take, s, form, articles))
    for c in COLORS:  # objects that are not on the table
        for sh in SHAPES:
            if f"{c} {sh}" not in names:
                the = "the " if articles else ""
                out.append(f"{verb_form('pick up', form)} {the}{c} {sh}")
    return out


# ----------------------------------------------------------------------------- EgoSchema


def egoschema(takes, rng) -> tuple[list, dict]:
    """Two five-way questions about each whole take: (question records, q_uid -> answer)."""
    questions, answers = [], {}
    for tk in takes:
        steps = tk.object_steps()
        kinds = ["order", "goal", "first", "last", "most"]
        counts = {}
        for s in steps:
            counts[s.obj] = counts.get(s.obj, 0) + 1
        best = sorted(counts.values(), reverse=True)
        if len(best) > 1 and best[0] == best[1]:
            kinds.remove("most")
        for kind in rng.choice(kinds, size=2, replace=False).tolist():
            q, correct, pool = _egoschema_question(tk, kind, steps, counts, rng)
            opts = [correct] + _distinct(rng, correct, pool, 4)
            if len(opts) < 5:
                continue
            order = rng.permutation(5).tolist()
            opts = [opts[i] for i in order]
            quid = random_uuid(rng)
            rec = {"q_uid": quid, "google_drive_id": None, "question": q}
            rec.update({f"option {i}": o for i, o in enumerate(opts)})
            rec["video"] = tk.videos[EGO_CAMERA]
            questions.append(rec)
            answers[quid] = opts.index(correct)
    return questions, answers


def _egoschema_question(
    tk: TakeSpec, kind: str, steps: list[Step], counts: dict[int, int], rng
) -> tuple[str, str, list[str]]:
    """(question, correct answer, pool of wrong answers) of one ``kind``."""
    if kind == "order":
        seq = [phrase(tk, s) for s in steps[:4]]
        correct = "C " + ", then ".join(seq) + "."
        pool = []
        for _ in range(30):
            perm = rng.permutation(len(seq)).tolist()
            pool.append("C " + ", then ".join(seq[i] for i in perm) + ".")
        fakes = _fake_phrases(tk, rng)
        for _ in range(10):
            alt = list(seq)
            alt[int(rng.integers(len(alt)))] = str(rng.choice(fakes))
            pool.append("C " + ", then ".join(alt) + ".")
        q = "Which option best describes the order in which C performed the actions?"
    elif kind == "goal":
        correct = _goal_sentence(tk.subtasks)
        pool = []
        for _ in range(30):
            other = sample_take_spec(int(rng.integers(2**31)), "heldout")
            pool.append(_goal_sentence(other.subtasks[: len(tk.subtasks)]))
        q = "What was the overall goal of C's activity in this video?"
    elif kind in ("first", "last"):
        s = steps[0] if kind == "first" else steps[-1]
        correct = f"C {phrase(tk, s)}."
        pool = [f"C {phrase(tk, o)}." for o in steps] + [f"C {p}." for p in _fake_phrases(tk, rng)]
        q = f"What did C do {kind} in this video?"
    else:
        o = max(counts, key=counts.get)
        correct = f"The {tk.objects[o].name}."
        pool = [f"The {c} {sh}." for c in COLORS for sh in SHAPES]
        q = "Which object did C interact with the most throughout the video?"
    return q, correct, pool


def _goal_sentence(subtasks: list[Subtask]) -> str:
    return "C wanted to " + " and ".join(sub.goal for sub in subtasks) + "."


# ----------------------------------------------------------------------------- QaEgo4D


def qaego4d(takes, rng) -> list[dict]:
    """Up to three four-way questions about where / what / which colour per take."""
    out = []
    for tk in takes:
        cands = _qaego4d_candidates(tk)
        for j in rng.permutation(len(cands))[:3].tolist():
            q, ans, pool, s = cands[j]
            opts = [ans] + _distinct(rng, ans, pool, 3)
            if len(opts) < 4:
                continue
            opts = [opts[i] for i in rng.permutation(4).tolist()]
            rec = {
                "sample_id": random_uuid(rng),
                "video_id": tk.uid,
                "video": tk.videos[EGO_CAMERA],
                "question": q,
                "answer": ans,
                "options": opts,
                "answer_idx": opts.index(ans),
            }
            if s is not None:
                rec["moment_start_sec"], rec["moment_end_sec"] = clip_window(tk, s)
            out.append(rec)
    return out


def _qaego4d_candidates(tk: TakeSpec) -> list[tuple[str, str, list[str], Step | None]]:
    """Every question a take supports: (question, answer, option pool, moment step)."""
    colors = list(COLORS)
    steps = tk.object_steps()
    cands = []
    for s in steps:
        ob = tk.objects[s.obj]
        last_on_obj = [x for x in steps if x.obj == s.obj][-1]
        if s.verb in ("put down", "put in") and s is last_on_obj:
            q = f"Where did I put the {ob.name}?"
            cands.append((q, final_location(tk, s.obj), _LOCATIONS, s))
        if s.verb == "put in":
            pool = [f"the {c} {sh}" for c in colors for sh in SHAPES if sh != "bowl"]
            q = f"What did I put in the {tk.objects[s.target].name}?"
            cands.append((q, f"the {ob.name}", pool, s))
        if sum(1 for o in tk.objects if o.shape == ob.shape) == 1:
            q = f"What colour was the {ob.shape} that I {verb_form(s.verb, 'past')}?"
            cands.append((q, ob.color, colors, s))
    picks = [s for s in steps if s.verb == "pick up"]
    if picks:
        pool = [f"the {c} {sh}" for c in colors for sh in SHAPES]
        cands.append(
            ("What did I pick up first?", f"the {tk.objects[picks[0].obj].name}", pool, picks[0])
        )
        q = "How many times did I pick something up?"
        cands.append((q, NUMBER_WORDS[len(picks)], NUMBER_WORDS[1:7], None))
    return cands


# ----------------------------------------------------------------------------- EgoTaskQA


def egotaskqa(takes, rng) -> list[dict]:
    """Up to four four-way questions per take about what happened to an object and where it
    is at the end, naming it directly or only by what happened to it."""
    out = []
    for tk in takes:
        steps = tk.object_steps()
        by_obj: dict[int, list[Step]] = {}
        for s in steps:
            by_obj.setdefault(s.obj, []).append(s)
        items = _direct_items(tk, by_obj, rng) + _indirect_items(tk, steps, by_obj)
        for j in rng.permutation(len(items))[:4].tolist():
            typ, cat, q, ans, pool, ss = items[j]
            opts = [ans] + _distinct(rng, ans, pool, 3)
            if len(opts) < 4:
                continue
            opts = [opts[i] for i in rng.permutation(4).tolist()]
            out.append(
                {
                    "id": random_uuid(rng),
                    "video": tk.videos[EGO_CAMERA],
                    "start": 0.0,
                    "end": annotation_time(tk.duration),
                    "question": q,
                    "options": opts,
                    "answer_idx": opts.index(ans),
                    "answer": ans,
                    "type": typ,
                    "category": cat,
                }
            )
    return out


def _direct_items(tk: TakeSpec, by_obj: dict[int, list[Step]], rng) -> list[tuple]:
    """Questions naming each object: (type, category, question, answer, pool, steps)."""
    fakes = _fake_phrases(tk, rng, "past")
    items = []
    for o, ss in by_obj.items():
        name = tk.objects[o].name
        did = "C " + " and then ".join(phrase(tk, s, "past") for s in ss) + "."
        pool = [
            "C " + " and then ".join(str(x) for x in rng.choice(fakes, size=len(ss))) + "."
            for _ in range(20)
        ]
        items.append(("direct", "descriptive", f"What did C do with the {name}?", did, pool, ss))
        q = f"Where is the {name} at the end of the video?"
        items.append(("direct", "state", q, final_location(tk, o), _LOCATIONS, ss))
    return items


def _indirect_items(tk: TakeSpec, steps: list[Step], by_obj: dict[int, list[Step]]) -> list:
    """Questions that refer to an object by what happened to it, not by its name (only
    where the reference is unambiguous)."""
    refs = {}
    for s in steps:
        refs.setdefault(indirect_reference(tk, s), []).append(s.obj)
    items = []
    for ref, objs_ in refs.items():
        if len(set(objs_)) != 1:
            continue  # ambiguous reference
        o = objs_[0]
        q = f"What colour is {ref}?"
        items.append(("indirect", "descriptive", q, tk.objects[o].color, list(COLORS), by_obj[o]))
        q = f"Where is {ref} at the end of the video?"
        items.append(("indirect", "state", q, final_location(tk, o), _LOCATIONS, by_obj[o]))
    return items


# ----------------------------------------------------------------------------- EgoPlan

_EGOPLAN_QUESTION = (
    "Considering the progress shown in the video and my current observation in the last "
    "frame, what action should I take next in order to {goal}?"
)


def egoplan(takes, rng) -> list[dict]:
    """Four-way next-step questions after every prefix of each multi-step subtask."""
    out = []
    for tk in takes:
        fakes = _fake_phrases(tk, rng, "base", articles=False)
        for sub in tk.subtasks:
            if len(sub.steps) < 2:
                continue
            for k in range(1, len(sub.steps)):
                rec = _egoplan_record(tk, sub, k, fakes, rng, sample_id=len(out))
                if rec is not None:
                    out.append(rec)
    return out


def _egoplan_record(
    tk: TakeSpec, sub: Subtask, k: int, fakes: list[str], rng, sample_id: int
) -> dict | None:
    """The question after the first ``k`` steps of ``sub`` (None: too few options)."""
    done = [tk.steps[i] for i in sub.steps[:k]]
    nxt = tk.steps[sub.steps[k]]
    ans = imperative(tk, nxt)
    near = [imperative(tk, tk.steps[i]) for i in sub.steps if i != sub.steps[k]]
    opts = [ans] + _distinct(rng, ans, near, 1)
    opts += _distinct(rng, ans, [f for f in fakes if f not in opts], 4 - len(opts))
    if len(opts) < 4:
        return None
    opts = [opts[i] for i in rng.permutation(4).tolist()]
    start, end = done[0].t0, done[-1].t1
    rec = {
        "sample_id": sample_id,
        "video_source": "synthetic",
        "video_id": tk.uid,
        "video": tk.videos[EGO_CAMERA],
        "task_goal": sub.goal,
        "question": _EGOPLAN_QUESTION.format(goal=sub.goal),
    }
    rec.update({f"choice_{c}": o for c, o in zip("abcd", opts, strict=True)})
    rec.update(
        {
            "golden_choice_idx": "ABCD"[opts.index(ans)],
            "answer": ans,
            "task_start_frame": int(round(start * tk.fps)),
            "current_observation_frame": min(int(round(end * tk.fps)), tk.num_frames - 1),
            "task_progress_metadata": [
                {
                    "narration_text": imperative(tk, s),
                    "start_frame": int(round(s.t0 * tk.fps)),
                    "stop_frame": int(round(s.t1 * tk.fps)),
                }
                for s in done
            ],
            "start": annotation_time(start),
            "end": annotation_time(min(end, tk.duration)),
        }
    )
    return rec


# ----------------------------------------------------------------------------- VLN-QA, EgoMCQ


def vlnqa(takes, rng) -> list[dict]:
    """One question per head motion: which way the camera wearer moved."""
    out = []
    for tk in takes:
        for s in tk.steps:
            if not s.is_nav:
                continue
            cands = [NAV_MOTIONS[i] for i in rng.permutation(4).tolist()]
            out.append(
                {
                    "video": tk.videos[EGO_CAMERA],
                    "question": "Which way did the camera wearer move in this video?",
                    "candidates": cands,
                    "answer": nav_answer(s),
                    "start": annotation_time(s.t0),
                    "end": annotation_time(s.t0 + 0.6 * (s.t1 - s.t0)),
                }
            )
    return out


def egomcq(takes, rng) -> dict:
    """Five-way clip-to-narration items per step: inter-video (types 1) and intra-video
    (types 2), keyed "0", "1", ..."""
    rows = {tk.uid: [egoclip_row(tk, k, s) for k, s in enumerate(tk.steps)] for tk in takes}
    out = {}
    for tk in takes:
        mine = rows[tk.uid]
        others = [u for u in rows if u != tk.uid]
        for k, row in enumerate(mine):
            # inter-video: distractor clips from (as far as possible) different takes
            if len(others) >= 1:
                pick = rng.choice(others, size=4, replace=len(others) < 4).tolist()
                dis = [rows[u][int(rng.integers(len(rows[u])))] for u in pick]
                out[str(len(out))] = _mcq_item(row, dis, 1, rng)
            # intra-video: distractors from the same take with different narrations
            same = [r for j, r in enumerate(mine) if j != k and r["clip_text"] != row["clip_text"]]
            if len(same) >= 4:
                dis = [same[i] for i in rng.choice(len(same), size=4, replace=False).tolist()]
                out[str(len(out))] = _mcq_item(row, dis, 2, rng)
    return out


def _mcq_item(query: dict, distractors: list[dict], types: int, rng) -> dict:
    choices = [query] + distractors
    order = rng.permutation(5).tolist()
    return {
        "query": query,
        "choices": {str(i): choices[j] for i, j in enumerate(order)},
        "answer": order.index(0),
        "types": types,
    }
