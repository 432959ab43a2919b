"""Dataset builders: record counts and fields against the annotation files, TF-free reading,
path safety, clear annotation errors, atomic builds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from input_pipeline.datasets import AnnotationError, build, open_dataset
from input_pipeline.datasets.ego_it import EgoIt

BENCH_COUNT_KEYS = {
    "egoschema": "egoschema",
    "qaego4d": "qaego4d",
    "egotaskqa": "egotaskqa",
    "charades_ego": "charades_ego_videos",
    "epic_mir": "epic_mir_clips",
    "egoplan": "egoplan",
    "vlnqa": "vlnqa",
    "egomcq": "egomcq",
}


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _records(data_dir, name, split="train") -> list[dict]:
    source, _ = open_dataset(name, data_dir, split)
    return [source[i] for i in range(len(source))]


def test_record_counts_match_annotation_files(world, prepared):
    counts = json.loads((world / "world.json").read_text())["counts"]
    ann = json.loads((world / "annotations/atomic_descriptions_train.json").read_text())
    n_desc = sum(len(p["descriptions"]) for ps in ann["annotations"].values() for p in ps)
    egoclip_rows = (world / "egoclip/egoclip.csv").read_text().strip().count("\n")
    egoit = json.loads((world / "egoit/egoit_instructions.json").read_text())
    exo = json.loads((world / "exo_web/exo_captions.json").read_text())

    assert len(_records(prepared, "ego_exo_clip")) == n_desc == counts["atomic_descriptions"]
    assert len(_records(prepared, "ego_clip")) == egoclip_rows == counts["egoclip_rows"]
    assert len(_records(prepared, "ego_it")) == len(egoit) == counts["egoit"]
    assert len(_records(prepared, "exo_clip_text")) == len(exo) == counts["exo_captions"]
    for task, key in BENCH_COUNT_KEYS.items():
        items = _records(prepared, "ego_bench", task)
        assert len(items) == counts["egobench"][key], task
        assert {_s(r["task"]) for r in items} == {task}


def test_ego_exo_clip_fields(world, prepared):
    takes = {t["take_uid"]: t for t in json.loads((world / "takes.json").read_text())}
    ann = json.loads((world / "annotations/atomic_descriptions_train.json").read_text())
    by_id = {_s(r["id"]): r for r in _records(prepared, "ego_exo_clip")}
    checked = 0
    for take_uid, passes in ann["annotations"].items():
        take = takes[take_uid]
        for p in passes:
            for k, d in enumerate(p["descriptions"]):
                r = by_id[f"{p['annotation_uid']}_{k}"]
                t = d["timestamp"]
                assert _s(r["text"]) == d["text"]
                assert float(r["timestamp"]) == t  # float64, exact
                assert float(r["start"]) == max(0.0, t - 0.5)
                assert float(r["end"]) == min(take["duration_sec"], t + 0.5)
                ego = take["frame_aligned_videos"]["aria01"]["rgb"]["relative_path"]
                assert _s(r["ego_video"]) == f"{take['root_dir']}/{ego}"
                cams = [_s(c) for c in r["exo_cams"]]
                assert cams == ["cam01", "cam02"]
                assert cams[int(r["best_exo"])] == d["best_exo"]["cam_id"]
                for v in [r["ego_video"], *r["exo_videos"]]:
                    assert (world / _s(v)).is_file()
                checked += 1
    assert checked == len(by_id)


def test_caption_and_instruction_fields(world, prepared):
    row = (world / "egoclip/egoclip.csv").read_text().splitlines()[1].split("\t")
    clip = {_s(r["id"]): r for r in _records(prepared, "ego_clip")}[row[0]]
    assert _s(clip["video"]) == f"egoclip/videos/{row[1]}.mp4"
    assert (float(clip["start"]), float(clip["end"])) == (float(row[6]), float(row[7]))
    assert _s(clip["clip_text"]) == row[8]
    assert _s(clip["text"]) == row[8].replace("#C ", "") + "."
    assert list(clip["tag_verb"]) == json.loads(row[9])

    egoit = json.loads((world / "egoit/egoit_instructions.json").read_text())
    recs = {_s(r["id"]): r for r in _records(prepared, "ego_it")}
    for src in egoit[:10]:
        r = recs[src["id"]]
        convs = [
            {"from": _s(f), "value": _s(v)}
            for f, v in zip(r["conversations"]["from"], r["conversations"]["value"], strict=True)
        ]
        assert convs == src["conversations"]
        assert (_s(r["video"]), float(r["start"]), float(r["end"]), _s(r["kind"])) == (
            src["video"],
            src["start"],
            src["end"],
            src["kind"],
        )

    exo = json.loads((world / "exo_web/exo_captions.json").read_text())
    recs = {_s(r["id"]): r for r in _records(prepared, "exo_clip_text")}
    for src in exo[:5]:
        assert _s(recs[src["id"]]["text"]) == src["conversations"][1]["value"]


def test_ego_bench_fields(world, prepared):
    bench = world / "egobench"
    answers = json.loads((bench / "egoschema/subset_answers.json").read_text())
    for r in _records(prepared, "ego_bench", "egoschema"):
        assert list(r["answer_indices"]) == [answers[_s(r["item_id"])]]
        assert len(r["options"]) == 5 and math.isnan(r["starts"][0])

    rows = (bench / "charades_ego/CharadesEgo_v1_test_only1st.csv").read_text().splitlines()[1:]
    item = _records(prepared, "ego_bench", "charades_ego")[0]
    row = next(x for x in rows if x.startswith(_s(item["item_id"])))
    labels = sorted({int(a.split()[0][1:]) for a in row.split(",")[9].split(";")})
    assert list(item["answer_indices"]) == labels and len(item["options"]) == 38

    relevancy = np.load(bench / "epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy")
    epic = _records(prepared, "ego_bench", "epic_mir")
    ids = [
        x.split(",")[1]
        for x in (bench / "epic_mir/EPIC_100_retrieval_test.csv").read_text().splitlines()[1:]
    ]
    for r in epic:
        np.testing.assert_array_equal(r["relevancy"], relevancy[ids.index(_s(r["item_id"]))])

    mcq = json.loads((bench / "egomcq/egomcq.json").read_text())
    for r in _records(prepared, "ego_bench", "egomcq"):
        src = mcq[_s(r["item_id"])]
        assert len(r["videos"]) == 5 and list(r["answer_indices"]) == [src["answer"]]
        assert float(r["starts"][src["answer"]]) == src["query"]["clip_start"]
        assert _s(r["subtype"]) == {1: "inter", 2: "intra"}[src["types"]]


def test_readable_without_tensorflow(prepared):
    code = (
        "import sys, tensorflow_datasets as tfds\n"
        f"d = {str(prepared)!r}\n"
        "n = [len(tfds.data_source(x, data_dir=d, split='train')) for x in\n"
        "     ('ego_exo_clip/w1000ms', 'ego_clip', 'ego_it', 'exo_clip_text')]\n"
        "n.append(len(tfds.data_source('ego_bench', data_dir=d, split='egomcq')))\n"
        "print(n, 'tensorflow' in sys.modules, 'input_pipeline' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lens = [
        len(_records(prepared, n)) for n in ("ego_exo_clip", "ego_clip", "ego_it", "exo_clip_text")
    ]
    lens.append(len(_records(prepared, "ego_bench", "egomcq")))
    assert out.stdout.strip() == f"{lens} False False"


def test_window_is_configurable(world, tmp_path):
    build("ego_exo_clip", world, tmp_path, window_s=0.68)
    recs = _records(tmp_path, "ego_exo_clip/w680ms")
    assert recs
    for r in recs:
        t = float(r["timestamp"])
        assert float(r["start"]) == pytest.approx(max(0.0, t - 0.34), abs=1e-12)
        assert float(r["end"]) == pytest.approx(t + 0.34, abs=1e-12)


# ----------------------------------------------------------------------------- bad annotations


def _mini_world(root: Path, record: dict) -> Path:
    """A data root holding only an EgoIT file with one record (and GOOD's video file)."""
    (root / "egoit").mkdir(parents=True)
    (root / "egoit/egoit_instructions.json").write_text(json.dumps([record]))
    (root / "videos").mkdir()
    (root / "videos/a.mp4").touch()
    return root


GOOD = {
    "id": "x0",
    "video": "videos/a.mp4",
    "conversations": [{"from": "human", "value": "<video>\nQ?"}, {"from": "gpt", "value": "A."}],
}


@pytest.mark.parametrize("bad", ["../outside.mp4", "videos/../../outside.mp4", "/etc/x.mp4"])
def test_path_escaping_the_root_is_rejected(tmp_path, bad):
    root = _mini_world(tmp_path / "root", dict(GOOD, video=bad))
    with pytest.raises(AnnotationError) as e:
        build("ego_it", root, tmp_path / "out")
    msg = str(e.value)
    assert "egoit/egoit_instructions.json" in msg and "video" in msg and bad in msg
    assert ("escapes the data root" in msg) or ("absolute path" in msg)
    assert not (tmp_path / "out/ego_it").exists()


def test_missing_fields_are_named(tmp_path):
    root = _mini_world(tmp_path / "a", {k: v for k, v in GOOD.items() if k != "conversations"})
    with pytest.raises(
        AnnotationError, match=r"egoit_instructions\.json: record 0 .*'conversations'"
    ):
        build("ego_it", root, tmp_path / "out")

    # A malformed take is skipped with its descriptions; here that is all of them.
    root = tmp_path / "b"
    (root / "annotations").mkdir(parents=True)
    (root / "takes.json").write_text(json.dumps([{"take_uid": "t0", "take_name": "t"}]))
    one = {"descriptions": [{"text": "C waves.", "timestamp": 1.0}]}
    (root / "annotations/atomic_descriptions_train.json").write_text(
        json.dumps({"annotations": {"t0": [one]}})
    )
    with pytest.raises(AnnotationError, match=r"takes\.json: take 't0' has no field 'root_dir'"):
        build("ego_exo_clip", root, tmp_path / "out")


def test_build_is_atomic(tmp_path, monkeypatch):
    root = _mini_world(tmp_path / "root", GOOD)
    out = tmp_path / "out"
    first = build("ego_it", root, out)
    assert len(_records(out, "ego_it")) == 1

    # A second build that dies half-way through writing keeps the first dataset intact and
    # leaves no temporary directory behind.
    records = [
        (f"k{i}", dict(GOOD, id=f"k{i}", start=np.nan, end=np.nan, kind="")) for i in range(5)
    ]

    def dying(self, _records):
        yield from records[:3]
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(EgoIt, "_generate_examples", dying)
    with pytest.raises(KeyboardInterrupt):
        build("ego_it", root, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ego_it"]
    assert len(_records(out, "ego_it")) == 1 and first.is_dir()

    # Same without a previous dataset: nothing that looks like a dataset appears.
    with pytest.raises(KeyboardInterrupt):
        build("ego_it", root, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []
    assert not tfds.builder("ego_it", data_dir=tmp_path / "fresh").is_prepared()
    with pytest.raises(FileNotFoundError, match="not prepared"):
        open_dataset("ego_it", tmp_path / "fresh")

    with pytest.raises(FileExistsError, match="overwrite"):
        build("ego_it", root, out)
