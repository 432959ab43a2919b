"""EgoBench evaluation and chat end to end: tiny world, stage checkpoints, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import recompute_metrics, tiny_stage3

from configs import eval as eval_config
from exo2ego_jax import chat, config_lib, runtime
from exo2ego_jax.eval import evaluate, report, scoring
from input_pipeline import egobench as tasks

MAX_ITEMS = 2  # per task: enough for every metric, small enough for CPU
MIR_CLIPS = 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny world + its tokenizer, and stage 0..3 checkpoints of the demo-size model."""
    config, world = tiny_stage3(tmp_path_factory.mktemp("evaluate"))
    config.eval.max_items = MAX_ITEMS
    config.eval.retrieval_max_clips = MIR_CLIPS
    return config, world


@pytest.fixture
def light_config(tmp_path):
    """A config whose paths exist but hold nothing: for checks that run before any compute."""
    config = eval_config.get_config("demo")
    config.init.llm = config.init.clip = ""
    config.init.stages = tuple(str(tmp_path / f"stage{i}") for i in range(4))
    for wd in config.init.stages:
        Path(wd).mkdir()
    config.eval.data_root = str(tmp_path)
    config.eval.out_dir = str(tmp_path / "eval")
    return config


def _quiet(message: str) -> None:
    pass


def _lines(path) -> int:
    return len(path.read_text().splitlines())


def _check_table(rows, recomputed) -> None:
    """Each row of the table is its task's recomputed metric; the average row is the mean
    of one score per task (method.md's decision), computed here from the task rows."""
    by = {(r.task, r.metric): r.ours for r in rows}
    want = {
        ("EgoSchema", "accuracy"): recomputed["egoschema"]["accuracy"],
        ("QAEgo4D", "close-ended accuracy"): recomputed["qaego4d_close"]["accuracy"],
        ("QAEgo4D", "open-ended normalised match"): recomputed["qaego4d_open"]["normalized"],
        ("QAEgo4D", "open-ended ROUGE-L"): recomputed["qaego4d_open"]["rougeL"],
        ("EgoTaskQA", "direct accuracy"): recomputed["egotaskqa"]["direct"],
        ("EgoTaskQA", "indirect accuracy"): recomputed["egotaskqa"]["indirect"],
        ("Charades-Ego", "mAP"): recomputed["charades_ego"]["mAP"],
        ("EPIC-KITCHENS-100 MIR", "mAP"): recomputed["epic_mir"]["mAP"],
        ("EPIC-KITCHENS-100 MIR", "nDCG"): recomputed["epic_mir"]["nDCG"],
        ("EgoPlan-Bench (val)", "accuracy"): recomputed["egoplan"]["accuracy"],
        ("VLN-QA", "accuracy"): recomputed["vlnqa"]["accuracy"],
        ("EgoMCQ", "inter-video accuracy"): recomputed["egomcq"]["inter"],
        ("EgoMCQ", "intra-video accuracy"): recomputed["egomcq"]["intra"],
    }
    for key, value in want.items():
        assert by[key] == pytest.approx(value, abs=1e-9), key
    per_task = [
        by[("EgoSchema", "accuracy")],
        by[("QAEgo4D", "close-ended accuracy")],
        (by[("EgoTaskQA", "direct accuracy")] + by[("EgoTaskQA", "indirect accuracy")]) / 2,
        by[("Charades-Ego", "mAP")],
        (by[("EPIC-KITCHENS-100 MIR", "mAP")] + by[("EPIC-KITCHENS-100 MIR", "nDCG")]) / 2,
        by[("EgoPlan-Bench (val)", "accuracy")],
        by[("VLN-QA", "accuracy")],
        (by[("EgoMCQ", "inter-video accuracy")] + by[("EgoMCQ", "intra-video accuracy")]) / 2,
    ]
    assert by[("Average", "mean of 8 tasks")] == pytest.approx(sum(per_task) / 8, abs=1e-9)


@pytest.mark.slow
def test_evaluate_writes_table_and_resumes(setup, monkeypatch):
    config, _ = setup
    logs: list[str] = []
    rows, metrics = evaluate.evaluate(config, log=logs.append, progress=False)

    assert set(metrics) == set(tasks.TASKS)  # the eight tasks (QAEgo4D as close + open)
    by_metric = {(r.task, r.metric): r for r in rows}
    assert {r.task for r in rows} == {
        "EgoSchema",
        "QAEgo4D",
        "EgoTaskQA",
        "Charades-Ego",
        "EPIC-KITCHENS-100 MIR",
        "EgoPlan-Bench (val)",
        "VLN-QA",
        "EgoMCQ",
        "Average",
    }
    # Chance column: 1 / options for MCQ; no paper column on the synthetic world.
    assert by_metric[("EgoSchema", "accuracy")].chance == pytest.approx(20.0)
    assert by_metric[("QAEgo4D", "close-ended accuracy")].chance == pytest.approx(25.0)
    assert by_metric[("EgoPlan-Bench (val)", "accuracy")].chance == pytest.approx(25.0)
    assert by_metric[("VLN-QA", "accuracy")].chance == pytest.approx(25.0)
    for key in (("EgoSchema", "accuracy"), ("VLN-QA", "accuracy")):
        assert by_metric[key].ours in (0.0, 50.0, 100.0)  # two items each
    # Every number of the table, recomputed from the written predictions.
    recomputed = recompute_metrics(config)
    for task, values in recomputed.items():
        for k, v in values.items():
            assert metrics[task][k] == pytest.approx(v, abs=1e-9), (task, k)
    _check_table(rows, recomputed)
    out = config.eval.out_dir
    md = (Path(out) / "results.md").read_text()
    assert md.startswith("| Task | Metric | Ours | Chance |")
    assert "| EgoSchema | accuracy |" in md and "Paper" not in md
    csv_lines = (Path(out) / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "task,metric,ours,chance"
    for line, r in zip(csv_lines[1:], rows, strict=True):  # the CSV holds the rows' numbers
        ours = line.rsplit(",", 2)[1]
        assert (ours == "" and r.ours is None) or float(ours) == pytest.approx(r.ours, abs=0.005)

    # One prediction line per item.
    for task in tasks.TASKS:
        path = report.predictions_path(out, task)
        want = MIR_CLIPS if task == "epic_mir" else MAX_ITEMS
        assert _lines(path) == want, task
    mir = report.read_predictions(report.predictions_path(out, "epic_mir"))
    n_sentences = len(evaluate.load_benchmark(config, "epic_mir").sentences)
    assert all(len(p["scores"]) == n_sentences for p in mir)
    egomcq = report.read_predictions(report.predictions_path(out, "egomcq"))
    assert all(len(p["scores"]) == 5 and p["mode"] == "loglik" for p in egomcq)

    # Rerun: nothing left to score, so the model is never even built; same table.
    before = {t: report.predictions_path(out, t).read_text() for t in tasks.TASKS}

    def no_model(*a, **k):
        raise AssertionError("a finished evaluation must not rebuild the model")

    monkeypatch.setattr(runtime, "load_trained", no_model)
    logs.clear()
    rows2, metrics2 = evaluate.evaluate(config, log=logs.append, progress=False)
    assert metrics2 == metrics and rows2 == rows
    assert {t: report.predictions_path(out, t).read_text() for t in tasks.TASKS} == before
    assert f"egomcq: 0 scored, {MAX_ITEMS} from earlier runs" in logs

    # Another setting into the same out_dir is refused (predictions would mix).
    other = config.copy_and_resolve_references()
    other.eval.mode = "letters"
    with pytest.raises(config_lib.ConfigError, match=r"holds predictions .*\(mode differ"):
        evaluate.evaluate(other, log=logs.append, progress=False)


@pytest.mark.slow
def test_letter_mode_generates_letters_and_keeps_loglik_for_clip_options(setup, tmp_path):
    config, _ = setup
    c = config.copy_and_resolve_references()
    c.eval.mode, c.eval.tasks, c.eval.out_dir = "letters", ("vlnqa", "egomcq"), str(tmp_path)
    _, metrics = evaluate.evaluate(c, log=_quiet, progress=False)
    assert set(metrics) == {"vlnqa", "egomcq"}
    vln = report.read_predictions(report.predictions_path(tmp_path, "vlnqa"))
    assert [p["mode"] for p in vln] == ["letter", "letter"]
    items = {it.item_id: it for it in evaluate.load_benchmark(c, "vlnqa")}
    for p in vln:  # the chosen option is the one the generated text names
        it = items[p["item_id"]]
        assert p["pred_index"] == scoring.extract_letter(p["output"], len(it.options)), p
        assert p["correct"] == (p["pred_index"] == it.answer_index)
    acc = 100.0 * np.mean([p["pred_index"] == items[p["item_id"]].answer_index for p in vln])
    assert metrics["vlnqa"]["accuracy"] == pytest.approx(acc)
    mcq = report.read_predictions(report.predictions_path(tmp_path, "egomcq"))
    assert [p["mode"] for p in mcq] == ["loglik", "loglik"]  # EgoMCQ's options are clips


@pytest.mark.slow
def test_chat_streams_pieces(setup):
    config, world = setup
    video = next((world / "egobench" / "videos").glob("*.mp4"))
    pieces: list[str] = []
    text = chat.answer(config, str(video), "What am I holding?", stream=pieces.append, log=_quiet)
    assert pieces and text == "".join(pieces)
    assert all(p for p in pieces)
    # Greedy decoding is deterministic: the same answer again from a session.
    session = chat.ChatSession(config, log=_quiet)
    assert session.ask(video, "What am I holding?", stream=_quiet) == text
    # Sampling (temperature + top-p) on the same loaded model: reproducible per seed.
    sampled = config.copy_and_resolve_references()
    sampled.chat.temperature, sampled.chat.top_p = 1.5, 0.9
    sampler = chat.ChatSession(sampled, trained=session.trained)
    first = sampler.ask(video, "What am I holding?", stream=_quiet)
    assert sampler.ask(video, "What am I holding?", stream=_quiet) == first
    sampled.chat.seed = 1
    assert sampler.ask(video, "What am I holding?", stream=_quiet) != first


def test_stream_text_joins_pieces_and_holds_partial_characters():
    class Tok:
        """Decodes ids to fixed strings; id 2 completes a two-token character."""

        table = {0: " the", 1: "\ufffd", 2: "é", 3: " ", 4: "cup"}

        def decode(self, ids, skip_special_tokens=True):
            text = "".join(self.table[i] for i in ids)
            return text.replace("\ufffdé", "é")

    pieces: list[str] = []
    text = chat.stream_text(Tok(), iter([0, 1, 2, 3, 4, 3]), pieces.append)
    assert pieces == ["the", "é", " cup"]  # no half character, no trailing space
    assert text == "theé cup" == "".join(pieces)


def test_missing_stage_workdir_is_a_clear_error(light_config, tmp_path):
    bad = light_config
    bad.init.stages = (*bad.init.stages[:3], str(tmp_path / "nowhere"))
    with pytest.raises(config_lib.ConfigError, match=r"config.init.stages\[3\].*no such workdir"):
        evaluate.evaluate(bad, progress=False)
    with pytest.raises(config_lib.ConfigError, match=r"config.init.stages\[3\]"):
        chat.answer(bad, "any.mp4", "Where am I?")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eval.tasks", ("egoschema", "imagenet"), "config.eval.tasks"),
        ("eval.mode", "vibes", "config.eval.mode='vibes'"),
        ("eval.data_root", "/no/such/dir", "config.eval.data_root='/no/such/dir'"),
        ("eval.batch_size", 4, "batch_size=4 must be a positive multiple of the 8 devices"),
        ("eval.row_batch", 12, "row_batch=12 must be a positive multiple"),
        ("mesh.shape", (3, 1, 1), "does not match the 8 available devices"),
    ],
)
def test_bad_eval_fields_fail_before_compute(light_config, field, value, message):
    section, leaf = field.split(".")
    original = light_config[section][leaf]
    light_config[section][leaf] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        evaluate.check_eval_config(light_config)
    light_config[section][leaf] = original
    evaluate.check_eval_config(light_config)  # the fixture's good value passes


def test_config_presets():
    demo = eval_config.get_config()
    assert demo.run == "evaluate" and demo.eval.data_root == "demo_data/world"
    assert demo.init.stages == tuple(f"workdirs/demo/stage{i}" for i in range(4))
    assert demo.model.lora.enabled and demo.data.template == "mistral"
    assert tuple(demo.eval.tasks) == tasks.TASKS
    assert not demo.eval.paper_column and demo.eval.chance_column
    paper = eval_config.get_config("paper")
    assert paper.eval.paper_column and paper.model.size == "paper" and paper.eval.data_root == ""
    chat_cfg = eval_config.get_config("chat")
    assert chat_cfg.run == "chat" and chat_cfg.eval.data_root == "demo_data/world"
    assert chat_cfg.chat.temperature == 0.0
    assert eval_config.get_config("paper,chat").model.size == "paper"
    with pytest.raises(ValueError, match="unknown config preset"):
        eval_config.get_config("huge")
    json.dumps(demo.to_dict())  # every field is plain data
