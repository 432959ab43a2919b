"""The EgoBench reader: hand-written fixtures in the official formats and a tiny demo world."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from input_pipeline import egobench as T
from input_pipeline import synthetic as sw
from input_pipeline.annotations import video_path
from input_pipeline.video import load_clip

FIX = Path(__file__).parent / "fixtures" / "egobench"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny demo world with two held-out takes (so EgoMCQ has inter-video items)."""
    root = tmp_path_factory.mktemp("eval_world") / "w"
    kw = dict(num_takes=6, heldout_takes=2, size=64, fps=6, workers=1, progress=False)
    return sw.generate_world(root, seed=0, **kw)


@pytest.fixture
def fix_copy(tmp_path):
    """A writable copy of the fixtures (for tests that corrupt a file)."""
    dst = tmp_path / "egobench"
    shutil.copytree(FIX, dst)
    return dst


# ----------------------------------------------------------------------------- official formats


def test_egoschema_official():
    items = T.load_egoschema(
        FIX, "egoschema/questions.json", "egoschema/subset_answers.json", video_dir="videos"
    )
    assert [it.item_id for it in items] == [
        "001934bb-81bd-4cd8-a574-0472ef3f6678",
        "00f93e1e-cf4e-4835-88b4-4ad68216e86f",
    ]  # only answered questions (the public subset)
    assert [it.answer_index for it in items] == [3, 1]
    assert items[0].options[3] == "C is cleaning dishes."
    assert items[0].video == FIX / "videos" / "001934bb-81bd-4cd8-a574-0472ef3f6678.mp4"
    assert items[0].start is None and items[0].end is None
    every = T.load_egoschema(
        FIX, "egoschema/questions.json", "egoschema/subset_answers.json", answered_only=False
    )
    assert len(every) == 3 and every[1].answer_index is None


def test_qaego4d_open_and_close_official():
    open_ = T.load_qaego4d(FIX, "qaego4d/annotations.QaEgo4D_test.json", mode="open")
    assert len(open_) == 2 and open_[0].task == "qaego4d_open"
    assert open_[0].answer_text == "on the chopping board" and open_[0].options == ()
    assert open_[0].meta["moment"] == (51.0, 54.0)  # frames / 30 fps
    assert open_[0].video.name == "0a8a5c3c-b7bb-4a9f-9b8d-1a3c9a4e6f10.mp4"
    close = T.load_qaego4d(FIX, "qaego4d/annotations.QaEgo4D_test_close.json", mode="close")
    for it in close:
        assert len(it.options) == 4 and it.options[it.answer_index] == it.answer_text
    assert set(close[1].options) == {"green", "blue", "white", "black"}
    again = T.load_qaego4d(FIX, "qaego4d/annotations.QaEgo4D_test_close.json", mode="close")
    assert [it.options for it in again] == [it.options for it in close]  # stable shuffle
    window = T.load_qaego4d(
        FIX, "qaego4d/annotations.QaEgo4D_test.json", mode="open", use_moment=True
    )
    assert (window[1].start, window[1].end) == (10.0, 13.5)


def test_egotaskqa_mcq():
    items = T.load_egotaskqa(FIX, "egotaskqa/egotaskqa_test.json")
    assert [(it.group, it.answer_index) for it in items] == [("direct", 1), ("indirect", 2)]
    assert (items[0].start, items[0].end) == (2.0, 14.5)
    assert items[1].start is None and items[1].answer_text == "in the cabinet"
    assert items[0].video == FIX / "videos" / "egotaskqa" / "1_1.mp4"


def test_charades_ego_official():
    items = T.load_charades_ego(
        FIX,
        "charades_ego/CharadesEgo_v1_test_only1st.csv",
        "charades_ego/Charades_v1_classes.txt",
        video_dir="CharadesEgo_v1_480",
    )
    assert [it.item_id for it in items] == ["005BUEGO", "00MFEEGO", "01K8XEGO"]
    assert [it.labels for it in items] == [(0, 3), (4,), ()]
    assert items[0].options[3] == "Throwing clothes somewhere" and len(items[0].options) == 5
    assert items[0].meta["actions"] == [(0, 0.0, 7.1), (3, 5.4, 12.0)]
    assert items[2].video == FIX / "CharadesEgo_v1_480" / "01K8XEGO.mp4"


def test_epic_mir_official():
    bench = T.load_epic_mir(
        FIX,
        "epic_mir/EPIC_100_retrieval_test.csv",
        "epic_mir/EPIC_100_retrieval_test_sentence.csv",
        "epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy",
        video_dir="EPIC-KITCHENS",
        video_pattern="{participant_id}/videos/{video_id}.MP4",
    )
    assert len(bench.clips) == 5 and bench.relevancy.shape == (5, 4)
    assert bench.sentences == ("take plate", "put down plate", "take pizza", "put pizza onto plate")
    assert bench.sentence_ids[3] == "P01_11_3"
    c = bench.clips[2]
    assert (c.item_id, c.question, c.start, c.end) == ("P01_11_2", "take pizza", 2.97, 13.79)
    assert c.video == FIX / "EPIC-KITCHENS" / "P01" / "videos" / "P01_11.MP4"
    sub = bench.subset(2)  # first two clips and their narrations only
    assert sub.sentences == ("take plate", "put down plate")
    np.testing.assert_array_equal(sub.relevancy, [[1.0, 0.5], [0.5, 1.0]])


def test_egoplan_official_frames_to_seconds():
    items = T.load_egoplan(FIX, "egoplan/EgoPlan_validation.json")
    a, b = items
    assert (a.item_id, a.answer_index, a.options[0]) == ("115", 0, "put cereal box into cupboard")
    assert (a.start, a.end) == (36 / 60, 760 / 60)  # EPIC frames at 60 fps, first step start
    assert (b.answer_index, b.start, b.end) == (3, 10.0, 30.0)  # Ego4D at 30 fps
    assert b.video.name == "000786a7-3f9d-4fe6-bfb3-045b368f7d44.mp4"
    assert T.load_egoplan(FIX, "egoplan/EgoPlan_validation.json", fps=10.0)[1].end == 90.0


def test_vlnqa_mvbench_format():
    items = T.load_vlnqa(FIX, "vlnqa/egocentric_navigation.json", video_dir="vlnqa")
    assert [it.item_id for it in items] == ["00000", "00001"]
    assert [it.answer_index for it in items] == [2, 0]
    assert items[0].video == FIX / "vlnqa" / "vln_0001.mp4"
    assert (items[1].start, items[1].end) == (1.5, 9.0) and items[0].start is None


def test_egomcq_official_inter_intra():
    items = T.load_egomcq(FIX, "egomcq/egomcq.json", video_dir="ego4d_chunks", chunked=True)
    inter, intra = items
    assert (inter.group, inter.answer_index, inter.meta["types"]) == ("inter", 1, 1)
    assert (intra.group, intra.answer_index, intra.meta["types"]) == ("intra", 3, 2)
    assert inter.question == "C picks a knife from the table"  # '#C' marker removed
    assert inter.options[3] == "The man X walks to the door"
    assert inter.video is None and len(inter.option_clips) == 5
    clip = inter.option_clips[2]  # 639.8 s lies in the second 600 s chunk
    assert clip.path == FIX / "ego4d_chunks" / "13a8c3c1-2e7d-4a4e-9d0a-5bd2c5c5a0d1" / "1.mp4"
    assert clip.start == pytest.approx(39.8) and clip.end == pytest.approx(41.5)
    edge = intra.option_clips[2]  # 598.2-601.0 s: clamped to the end of chunk 0
    assert (edge.start, edge.end) == pytest.approx((598.2, 600.0))
    flat = T.load_egomcq(FIX, "egomcq/egomcq.json", video_dir="v")
    assert flat[0].option_clips[2].path.name == "13a8c3c1-2e7d-4a4e-9d0a-5bd2c5c5a0d1.mp4"


def test_item_json_round_trip():
    item = T.load_egomcq(FIX, "egomcq/egomcq.json")[0]
    data = json.loads(json.dumps(item.to_json()))
    assert data["item_id"] == "0" and data["option_clips"][1]["start"] == 60.4


# ----------------------------------------------------------------------------- clear errors


def test_escaping_video_path_is_refused(fix_copy):
    path = fix_copy / "egotaskqa" / "egotaskqa_test.json"
    data = json.loads(path.read_text())
    data[1]["video"] = "../../outside.mp4"
    path.write_text(json.dumps(data))
    with pytest.raises(T.AnnotationError, match=r"egotaskqa_test\.json: id 'q0002': field 'video'"):
        T.load_egotaskqa(fix_copy, "egotaskqa/egotaskqa_test.json")
    with pytest.raises(T.AnnotationError, match="outside the data root"):
        video_path(fix_copy, "/etc/passwd", file="f.json", where="record 0", field="video")
    assert (
        video_path(fix_copy, "a/../b.mp4", file="f", where="r", field="video") == fix_copy / "b.mp4"
    )


def test_missing_and_unknown_fields_are_named(fix_copy):
    q = fix_copy / "egoschema" / "questions.json"
    data = json.loads(q.read_text())
    del data[0]["option 2"]
    q.write_text(json.dumps(data))
    with pytest.raises(T.AnnotationError, match=r"questions\.json: q_uid '001934bb.*'option 2' is"):
        T.load_egoschema(fix_copy, "egoschema/questions.json", "egoschema/subset_answers.json")

    plan = fix_copy / "egoplan" / "EgoPlan_validation.json"
    data = json.loads(plan.read_text())
    data[0]["golden_choice_idx"] = "E"
    plan.write_text(json.dumps(data))
    with pytest.raises(T.AnnotationError, match="sample_id '115': field 'golden_choice_idx'"):
        T.load_egoplan(fix_copy, "egoplan/EgoPlan_validation.json")

    csv_path = fix_copy / "charades_ego" / "CharadesEgo_v1_test_only1st.csv"
    csv_path.write_text(csv_path.read_text().replace("c004 1.20", "c099 1.20"))
    with pytest.raises(T.AnnotationError, match=r"line 3 \(id '00MFEEGO'\).*unknown class c099"):
        T.load_charades_ego(
            fix_copy,
            "charades_ego/CharadesEgo_v1_test_only1st.csv",
            "charades_ego/Charades_v1_classes.txt",
        )

    tqa = fix_copy / "egotaskqa" / "egotaskqa_test.json"
    data = json.loads(tqa.read_text())
    data[0]["type"] = "causal"
    tqa.write_text(json.dumps(data))
    with pytest.raises(T.AnnotationError, match="field 'type' must be 'direct' or 'indirect'"):
        T.load_egotaskqa(fix_copy, "egotaskqa/egotaskqa_test.json")

    with pytest.raises(FileNotFoundError, match="pass the loader's 'file' argument"):
        T.load_vlnqa(fix_copy, "vlnqa/missing.json")


def test_relevancy_pickle_refused_and_shape_checked(fix_copy):
    pkl = fix_copy / "epic_mir" / "caption_relevancy_EPIC_100_retrieval_test.pkl"
    pkl.write_bytes(b"not read")
    with pytest.raises(T.AnnotationError, match="(?s)never loaded.*np.save"):
        T.load_relevancy(pkl)
    np.save(fix_copy / "epic_mir" / "bad.npy", np.zeros((5, 3), np.float32))
    with pytest.raises(T.AnnotationError, match=r"shape \(5, 3\) does not match 5 clips"):
        T.load_epic_mir(
            fix_copy,
            "epic_mir/EPIC_100_retrieval_test.csv",
            "epic_mir/EPIC_100_retrieval_test_sentence.csv",
            "epic_mir/bad.npy",
        )
    np.savez(fix_copy / "epic_mir" / "rel.npz", relevancy=np.eye(5, 4, dtype=np.float32))
    assert T.load_relevancy(fix_copy / "epic_mir" / "rel.npz").shape == (5, 4)


# ----------------------------------------------------------------------------- demo world


def test_world_task_files_load(world):
    counts = json.loads((world / "world.json").read_text())["counts"]["egobench"]
    loaded = {name: T.load_task(name, world) for name in T.TASKS}
    assert len(loaded["egoschema"]) == counts["egoschema"]
    assert len(loaded["qaego4d_close"]) == len(loaded["qaego4d_open"]) == counts["qaego4d"]
    tqa = loaded["egotaskqa"]
    assert sum(it.group == "direct" for it in tqa) == counts["egotaskqa_direct"]
    assert sum(it.group == "indirect" for it in tqa) == counts["egotaskqa_indirect"]
    assert len(loaded["charades_ego"]) == counts["charades_ego_videos"]
    assert len(loaded["charades_ego"][0].options) == counts["charades_ego_classes"]
    bench = loaded["epic_mir"]
    assert bench.relevancy.shape == (counts["epic_mir_clips"], counts["epic_mir_sentences"])
    assert len(loaded["egoplan"]) == counts["egoplan"]
    assert len(loaded["vlnqa"]) == counts["vlnqa"]
    mcq = loaded["egomcq"]
    assert sum(it.group == "inter" for it in mcq) == counts["egomcq_inter"] > 0
    assert sum(it.group == "intra" for it in mcq) == counts["egomcq_intra"]
    assert all(it.meta["types"] == (1 if it.group == "inter" else 2) for it in mcq)

    for name, value in loaded.items():
        items = value.clips if isinstance(value, T.RetrievalBenchmark) else value
        for it in items:
            videos = [c.path for c in it.option_clips] or [it.video]
            assert all(v.is_file() and world in v.parents for v in videos), name
            if it.answer_index is not None:
                assert 0 <= it.answer_index < len(it.options)
    # every MCQ answer matches the file's answer text where the file gives one
    for it in loaded["qaego4d_close"] + loaded["egotaskqa"] + loaded["egoplan"]:
        assert it.options[it.answer_index] == it.answer_text


def test_world_clip_decodes(world):
    """A task's clip decodes to the frames the world rendered at the sampled instants."""
    from input_pipeline.video import sample_frame_indices

    item = T.load_task("vlnqa", world)[0]
    frames = load_clip(item.video, item.start, item.end, num_frames=4, size=32)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    # Rebuild the held-out take that owns the video from the world's manifest.
    m = json.loads((world / "world.json").read_text())
    rel = item.video.relative_to(world).as_posix()
    specs = sw.build_specs(m["seed"], m["sizes"], fps=m["fps"], size=m["resolution"][0])
    take, camera = next((t, c) for t in specs for c, v in t.videos.items() if v == rel)
    idx = sample_frame_indices(take.num_frames, take.fps, 4, item.start, item.end)
    rendered = sw.render_take(take, camera, indices=idx).astype(np.float64)
    native = load_clip(item.video, item.start, item.end, num_frames=4, size=take.size)

    def psnr(a, b):
        return 10 * np.log10(255.0**2 / np.mean((np.float64(a) - b) ** 2))

    assert psnr(native, rendered) >= 30.0, psnr(native, rendered)
    # Another instant of the same take is far off: the window is the one asked for.
    other = sw.render_take(take, camera, indices=(idx + take.num_frames // 2) % take.num_frames)
    assert psnr(native, other) < psnr(native, rendered) - 5
