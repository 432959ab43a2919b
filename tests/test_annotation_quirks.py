"""Real annotation files and their quirks: per-record problems skipped and counted, the skip
ceiling, Ego-Exo4D view rules and description filters, EgoClip layouts and streaming, empty
files.

The data root ``tests/fixtures/downloads/`` is written by hand in the official layouts
(Ego-Exo4D ``takes.json`` and ``atomic_descriptions_*.json`` as documented on
docs.ego-exo4d-data.org; EgoVLP's tab-separated ``egoclip.csv``; VideoLLaMA2 JSON), with
zero-byte placeholder videos. Its quirks, one record or take each:

* Ego-Exo4D: an Aria take with collage entries, a hand-held ``moblie`` camera and a missing
  exo file (cam03, present only downscaled); a take whose ego camera is a GoPro (``cam04``,
  stream ``"0"``, ``is_ego`` as text); an ego-only take (Aria + hand-held camera); a take
  whose ego file is missing; a take unknown to takes.json; a rejected pass; descriptions of
  another person, not ego-visible, unsure, outside the take, without text; an empty val file.
* EgoClip: rows with too many / too few fields, a malformed number and tag list, an empty
  narration, a missing video, invalid UTF-8, a blank line, a repeated ``clip_idx``, a path
  escaping the root, a negative ``clip_start``, clips in and across EgoVLP's 600 s chunks.
* EgoIT: a repeated id, a malformed conversation, a missing video.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
from tensorflow_datasets.core import shuffle

from input_pipeline.datasets import AnnotationError, BuildOptions, build, open_dataset, tfds_spill
from input_pipeline.datasets.common import _KeySet
from input_pipeline.datasets.ego_clip import EgoClip
from input_pipeline.datasets.report import BuildReport
from input_pipeline.prepare import main

ROOT = Path(__file__).parent / "fixtures" / "downloads"
LENIENT = BuildOptions(max_bad_fraction=0.7)  # the fixture is mostly quirks

T1 = "fe6b4107-ecdb-4e90-93c5-3df74385bda2"  # pass 0 of cmu_bike01_2 (Aria)
T2 = "0f1e2d3c-4b5a-4697-8877-665544332211"  # iiith_cooking_23_4 (GoPro ego)
BIKE = "takes/cmu_bike01_2/frame_aligned_videos"
COOK = "takes/iiith_cooking_23_4/frame_aligned_videos"
A = "001e3e4e-2743-47fc-8564-d5efd11f9e90"
B = "5f3d0c2a-6b1e-4f7a-9c8d-2e1f0a9b8c7d"


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _records(data_dir, name, split="train") -> dict[str, dict]:
    source, _ = open_dataset(name, data_dir, split)
    return {_s(r["id"]): r for r in (source[i] for i in range(len(source)))}


def _report(path: Path, split: str = "train") -> dict:
    return json.loads((path / "metadata.json").read_text())["build_report"][split]


def _counts(report: dict) -> tuple[int, int, dict, dict, dict]:
    assert report["read"] == report["kept"] + sum(report["skipped"].values()) + sum(
        report["filtered"].values()
    )
    return report["read"], report["kept"], report["skipped"], report["filtered"], report["note"]


# ----------------------------------------------------------------------------- Ego-Exo4D

EGO_EXO_SKIPPED = {
    "take without a usable exo view": 2,
    "timestamp outside the take": 1,
    "malformed description": 1,
    "ego video file missing": 1,
    "take not in takes.json": 1,
}


def test_ego_exo4d_views_and_skips(tmp_path):
    path = build("ego_exo_clip", ROOT, tmp_path, options=LENIENT)
    recs = _records(tmp_path, "ego_exo_clip")
    assert sorted(recs) == sorted(
        [f"{T1}_0", f"{T1}_1", f"{T1}_3", f"{T1}_6", f"{T2}_0", f"{T2}_1"]
    )
    # Aria take: the hand-held 'moblie' camera and the collage are no exo views, cam03's
    # file is missing; best_exo points into what is left (cam03 -> the first view).
    bike = recs[f"{T1}_1"]
    assert _s(bike["ego_video"]) == f"{BIKE}/aria01_214-1.mp4"
    assert [_s(c) for c in bike["exo_cams"]] == ["cam01", "cam02"]
    assert [_s(v) for v in bike["exo_videos"]] == [f"{BIKE}/cam01.mp4", f"{BIKE}/cam02.mp4"]
    assert int(bike["best_exo"]) == 1 and int(recs[f"{T1}_6"]["best_exo"]) == 0
    # GoPro ego take: is_ego "true" on cam04, stream "0"; never an exo view.
    cook = recs[f"{T2}_1"]
    assert _s(cook["ego_video"]) == f"{COOK}/cam04.mp4"
    assert [_s(c) for c in cook["exo_cams"]] == ["cam01", "cam02"]
    assert (float(cook["start"]), float(cook["end"])) == (29.3, 30.0)  # clamped to the take
    assert _s(cook["text"]) == "C stirs the eggs with a fork."

    read, kept, skipped, filtered, notes = _counts(_report(path))
    assert (read, kept) == (15, 6)
    assert skipped == EGO_EXO_SKIPPED
    assert filtered == {
        "annotation pass rejected (rejected: true)": 2,
        "narration_subject not C (option subjects)": 1,
    }
    assert notes == {
        "camera not used as an exo view (not a static exo camera id)": 2,
        "exo view dropped: video file missing": 1,
    }
    # The val file annotates nothing: no val split, not an error.
    meta = json.loads((path / "dataset_info.json").read_text())
    assert [s["name"] for s in meta["splits"]] == ["train"]


def test_ego_exo4d_description_filters(tmp_path):
    options = BuildOptions(
        max_bad_fraction=0.7, subjects=(), require_ego_visible=True, drop_unsure=True
    )
    path = build("ego_exo_clip", ROOT, tmp_path, options=options)
    recs = _records(tmp_path, "ego_exo_clip")
    # _0 is not ego-visible ("0"), _3 unsure ("1"); _2 (subject O) is kept with subjects=().
    assert sorted(recs) == sorted([f"{T1}_1", f"{T1}_2", f"{T1}_6", f"{T2}_0", f"{T2}_1"])
    assert _s(recs[f"{T1}_2"]["text"]) == "The Man X walks towards C."
    read, kept, skipped, filtered, _ = _counts(_report(path))
    assert (read, kept, skipped) == (15, 5, EGO_EXO_SKIPPED)
    assert filtered == {
        "annotation pass rejected (rejected: true)": 2,
        "not visible from the ego view (option require_ego_visible)": 1,
        "annotator unsure of the objects (option drop_unsure)": 1,
    }


def test_ego_exo4d_downscaled_videos(tmp_path):
    path = build(
        "ego_exo_clip",
        ROOT,
        tmp_path,
        options=BuildOptions(max_bad_fraction=1.0, ego_exo_downscaled=448),
    )
    recs = _records(tmp_path, "ego_exo_clip")
    bike = recs[f"{T1}_6"]
    assert _s(bike["ego_video"]) == f"{BIKE}/downscaled/448/aria01_214-1.mp4"
    assert [_s(c) for c in bike["exo_cams"]] == ["cam01", "cam02", "cam03"]  # cam03 is here
    assert int(bike["best_exo"]) == 2
    assert _s(recs[f"{T2}_0"]["ego_video"]) == f"{COOK}/downscaled/448/cam04.mp4"
    _, kept, skipped, _, notes = _counts(_report(path))
    assert kept == 6
    # The dance take has no downscaled ego video: now that is what makes it unusable.
    assert skipped["ego video file missing"] == 3
    assert "exo view dropped: video file missing" not in notes


def test_ego_exo4d_missing_videos_kept_on_request(tmp_path):
    options = BuildOptions(max_bad_fraction=0.7, missing_videos="keep")
    path = build("ego_exo_clip", ROOT, tmp_path, options=options)
    recs = _records(tmp_path, "ego_exo_clip")
    assert "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e_0" in recs  # the take without its ego file
    assert [_s(c) for c in recs[f"{T1}_0"]["exo_cams"]] == ["cam01", "cam02", "cam03"]
    assert "ego video file missing" not in _report(path)["skipped"]


def test_collage_streams_are_never_views(tmp_path):
    """A stream flagged ``is_collage`` (the preview mosaics) is not a view, whatever camera
    lists it; nor is a stream whose ``relative_path`` is null."""
    fav = {
        cam: {stream: {"relative_path": f"frame_aligned_videos/{cam}.mp4", "is_collage": False}}
        for cam, stream in [("aria01", "rgb"), ("cam01", "0"), ("cam02", "0"), ("cam03", "0")]
    }
    fav["cam01"]["0"]["is_collage"] = True
    fav["cam03"]["0"]["relative_path"] = None
    take = {
        "take_uid": "t0",
        "take_name": "t",
        "root_dir": "takes/t",
        "frame_aligned_videos": fav,
        "capture": {"cameras": [{"cam_id": c, "is_ego": c == "aria01"} for c in fav]},
    }
    ann = {"annotations": {"t0": [{"descriptions": [{"text": "C waves.", "timestamp": 1.0}]}]}}
    root = _root_with(
        tmp_path,
        {
            "takes.json": json.dumps([take]),
            "annotations/atomic_descriptions_train.json": json.dumps(ann),
            **{f"takes/t/frame_aligned_videos/{c}.mp4": "" for c in fav},
        },
    )
    build("ego_exo_clip", root, tmp_path / "out")
    (rec,) = _records(tmp_path / "out", "ego_exo_clip").values()
    assert [_s(c) for c in rec["exo_cams"]] == ["cam02"]


def test_default_ceiling_aborts_naming_offenders(tmp_path):
    with pytest.raises(AnnotationError) as e:
        build("ego_exo_clip", ROOT, tmp_path)
    msg = str(e.value)
    assert msg.startswith(
        "annotations/atomic_descriptions_train.json: 6 of 15 records were skipped (40.0%), "
        "more than the ceiling max_bad_fraction=0.01; nothing was written."
    )
    assert "take without a usable exo view" in msg and "upenn_dance_5_1" in msg
    assert "take not in takes.json" in msg and "0d0d0d0d-0000-4000-8000-000000000404" in msg
    assert not (tmp_path / "ego_exo_clip").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the temporary build is gone


# ----------------------------------------------------------------------------- EgoClip


EGOCLIP_SKIPPED = {
    "wrong number of fields": 2,
    "malformed row": 2,
    "empty clip_text": 1,
    "video file missing": 1,
    "not valid UTF-8": 1,
    "repeated id": 1,
    "video path outside the data root": 1,
}


@pytest.mark.parametrize(
    "layout, videos, chunked",
    [
        ("egoclip", {"0": f"egoclip/videos/{A}.mp4", "2": f"egoclip/videos/{B}.mp4"}, False),
        ("ego4d", {"0": f"v1/full_scale/{A}.mp4", "2": f"v1/full_scale/{B}.mp4"}, False),
        (
            "egovlp_chunks",
            {"0": f"ego4d_chunked/{A}/0.mp4", "2": f"ego4d_chunked/{B}/1.mp4"},
            True,
        ),
    ],
)
def test_egoclip_rows_and_layouts(tmp_path, layout, videos, chunked):
    options = BuildOptions(max_bad_fraction=0.7, egoclip_videos=layout)
    path = build("ego_clip", ROOT, tmp_path, options=options)
    recs = _records(tmp_path, "ego_clip")
    assert sorted(recs) == ["0", "1", "11", "2", "3"]
    assert {k: _s(recs[k]["video"]) for k in videos} == videos
    assert _s(recs["0"]["clip_text"]) == "#C C picks a bag of clothes from the floor"
    assert _s(recs["11"]["text"]) == "Man X hands C a cup."
    assert list(recs["0"]["tag_noun"]) == [192, 115, 12]
    window = {k: (float(r["start"]), float(r["end"])) for k, r in recs.items()}
    if chunked:  # times relative to the 600 s chunk; negative starts clamped to 0 (EgoVLP)
        assert window["1"] == (0.0, 0.4755)
        assert window["2"] == pytest.approx((10.2, 11.0))
        assert window["3"] == pytest.approx((599.6, 600.0))  # clamped to its chunk's end
        assert float(recs["2"]["narration_time"]) == pytest.approx(10.6)
        assert _s(recs["3"]["video"]) == f"ego4d_chunked/{B}/1.mp4"
    else:
        assert window["1"] == (-0.2755, 0.4755)
        assert window["2"] == (610.2, 611.0) and window["3"] == (1199.6, 1200.4)
    read, kept, skipped, filtered, notes = _counts(_report(path))
    assert (read, kept, skipped, filtered) == (14, 5, EGOCLIP_SKIPPED, {})
    clamp = "clip runs into the next 600 s chunk: end clamped to its chunk's end"
    assert notes == ({clamp: 1} if chunked else {})


def test_egoclip_is_streamed(tmp_path):
    """Reading a 4 MB egoclip.csv row by row holds well under a tenth of it at once."""
    (tmp_path / "egoclip").mkdir()
    row = f"{A}\t128.0\tnarration_pass_1\t0\t3.3\t2.9\t3.7\t#C C picks a bag up\t[93]\t[1]"
    lines = [
        "clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time"
        "\tclip_start\tclip_end\tclip_text\ttag_verb\ttag_noun"
    ]
    lines += [f"{i}\t{row}" for i in range(40_000)]
    csv_file = tmp_path / "egoclip/egoclip.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    size = csv_file.stat().st_size
    assert size > 4_000_000
    builder = EgoClip(data_dir=tmp_path / "out", options=BuildOptions())
    report = BuildReport("ego_clip", "train", "egoclip/egoclip.csv")
    tracemalloc.start()
    n = sum(1 for _ in builder._records(tmp_path, report))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == report.read == 40_000
    assert peak < size / 10, f"peak {peak} B while reading a {size} B file"


def test_big_splits_spill_to_disk_without_tensorflow(tmp_path, monkeypatch):
    """Past tfds_spill.SPILL_ABOVE bytes TFDS's writer moves records to bucket files, which it
    opens with tf.io.gfile: without TensorFlow that failed for any split over 1 GB (EgoClip).
    Forced here for every record: the same records come out, in the same order."""
    build("ego_clip", ROOT, tmp_path / "memory", options=LENIENT)
    monkeypatch.setattr(tfds_spill, "SPILL_ABOVE", 0)
    spilled, add = [], shuffle.Shuffler._add_to_bucket
    monkeypatch.setattr(
        shuffle.Shuffler, "_add_to_bucket", lambda *a: (spilled.append(1), add(*a))[1]
    )
    build("ego_clip", ROOT, tmp_path / "spilled", options=LENIENT)
    assert len(spilled) == 5  # every kept record went through a bucket file
    source = [open_dataset("ego_clip", tmp_path / d)[0] for d in ("memory", "spilled")]
    assert [_s(r["id"]) for r in source[0]] == [_s(r["id"]) for r in source[1]]
    assert [_s(r["video"]) for r in source[0]] == [_s(r["video"]) for r in source[1]]
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1000 << 20  # TFDS's own setting is restored


def test_key_set_tells_repeats():
    keys = _KeySet()
    assert [keys.add(k) for k in ["0", "7", "7", "123456", "01", "1", "x", "x", "0"]] == [
        True,
        True,
        False,
        True,
        True,  # "01" is not the integer key "1": TFDS keys are strings
        True,
        True,
        False,
        False,
    ]


# ----------------------------------------------------------------------------- EgoIT


def test_egoit_quirks(tmp_path):
    path = build("ego_it", ROOT, tmp_path, options=LENIENT)
    recs = _records(tmp_path, "ego_it")
    assert sorted(recs) == ["egtea_000001", "ssv2_000005"]
    assert float(recs["egtea_000001"]["start"]) == 2.9  # the first of the repeated ids
    read, kept, skipped, _, _ = _counts(_report(path))
    assert (read, kept) == (5, 2)
    assert skipped == {"repeated id": 1, "malformed record": 1, "video file missing": 1}


# ----------------------------------------------------------------------------- prepare


def test_prepare_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--world", str(ROOT), "--out", str(out), "--no-tokenizer", "--quiet"]
    assert main([*argv, "--datasets", "ego_clip,ego_exo_clip", "--max-bad-fraction", "0.7"]) == 0
    printed = capsys.readouterr().out.replace(str(ROOT.absolute().parent), "<fixtures>")
    lines = printed.splitlines()
    assert lines[: len(EGOCLIP_SUMMARY)] == EGOCLIP_SUMMARY
    assert lines[len(EGOCLIP_SUMMARY)] == (
        "ego_exo_clip/w1000ms train (annotations/atomic_descriptions_train.json): 15 read, "
        "6 kept, 6 skipped (40.0%), 3 filtered"
    )
    assert "  skipped    2  take without a usable exo view" in lines
    assert "  filtered   1  narration_subject not C (option subjects)" in lines
    assert lines[-2:] == [
        f"ego_clip: {out}/ego_clip/1.0.0",
        f"ego_exo_clip: {out}/ego_exo_clip/w1000ms/1.0.0",
    ]

    # Run again with other options: the kept datasets say so.
    again = ["--datasets", "ego_clip", "--max-bad-fraction", "0.7", "--egoclip-videos", "ego4d"]
    assert main([*argv, *again]) == 0
    assert "warning: built with other options" in capsys.readouterr().out


EGOCLIP_SUMMARY = [
    "ego_clip train (egoclip/egoclip.csv): 14 read, 5 kept, 9 skipped (64.3%), 0 filtered",
    "  skipped    2  wrong number of fields",
    "               - egoclip/egoclip.csv: line 6: 12 fields, the header has 11",
    "               - egoclip/egoclip.csv: line 7: 5 fields, the header has 11",
    "  skipped    2  malformed row",
    "               - egoclip/egoclip.csv: line 8 field 'clip_start' must be a number, got 'n/a'",
    "               - egoclip/egoclip.csv: line 10 field 'tag_verb' must be a list of ints, "
    "got '[1,'",
    "  skipped    1  empty clip_text",
    "               - egoclip/egoclip.csv: line 9 field 'clip_text' has no words but tags",
    "  skipped    1  video file missing",
    "               - egoclip/egoclip.csv: record '9': "
    "egoclip/videos/9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d.mp4 not found under the data root",
    "  skipped    1  not valid UTF-8",
    "               - egoclip/egoclip.csv: line 12: bytes that are not UTF-8",
    "  skipped    1  repeated id",
    "               - egoclip/egoclip.csv: id '0' appears again",
    "  skipped    1  video path outside the data root",
    "               - egoclip/egoclip.csv: line 16: field 'video_uid' = "
    "'egoclip/videos/../../../outside.mp4' resolves to <fixtures>/outside.mp4, which escapes "
    "the data root <fixtures>/downloads; annotation paths must be relative to the root and "
    "stay inside it",
]


# ----------------------------------------------------------------------------- empty files


def _root_with(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "root"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


HEADER = (ROOT / "egoclip/egoclip.csv").read_bytes().decode("utf-8", "replace").splitlines()[0]


@pytest.mark.parametrize(
    "name, files, message",
    [
        (
            "ego_clip",
            {"egoclip/egoclip.csv": HEADER + "\n"},
            "egoclip/egoclip.csv: holds no records (an empty file, an empty list, or a CSV "
            "with only its header); nothing to build for ego_clip train",
        ),
        (
            "ego_clip",
            {"egoclip/egoclip.csv": ""},
            "egoclip/egoclip.csv: the file is empty (0 bytes); nothing to build from it",
        ),
        (
            "ego_exo_clip",
            {
                "takes.json": "[]",
                "annotations/atomic_descriptions_train.json": '{"annotations": {}}',
            },
            "annotations/atomic_descriptions_train.json: holds no records",
        ),
        ("ego_it", {"egoit/egoit_instructions.json": "[]"}, "egoit/egoit_instructions.json: holds"),
    ],
)
def test_empty_files_are_clear_errors(tmp_path, capsys, name, files, message):
    root = _root_with(tmp_path, files)
    out = tmp_path / "out"
    rc = main(["--world", str(root), "--out", str(out), "--datasets", name, "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {message}")
    assert "Traceback" not in err and "AssertionError" not in err


def test_all_records_filtered_is_a_clear_error(tmp_path):
    options = BuildOptions(max_bad_fraction=0.7, subjects=("nobody",))
    with pytest.raises(
        AnnotationError, match="every one of its 15 records was skipped or filtered"
    ):
        build("ego_exo_clip", ROOT, tmp_path, options=options)


def test_empty_egobench_task_file(world, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(world / "egobench", root / "egobench", ignore=shutil.ignore_patterns("*.mp4"))
    (root / "egobench/egoschema/questions.json").write_text("[]")
    with pytest.raises(AnnotationError, match=r"^egobench/egoschema/: holds no records"):
        build("ego_bench", root, tmp_path / "out")
