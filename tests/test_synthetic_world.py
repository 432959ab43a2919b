"""Tests of the synthetic demo world: determinism, views, video fidelity, annotation files."""

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from input_pipeline import synthetic as sw
from input_pipeline.video import load_clip, probe, sample_frame_indices

TINY = dict(num_takes=5, heldout_takes=2, size=64, fps=6, workers=1, progress=False)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """Two tiny worlds with seed 0 and one with seed 1 (64 px, 6 fps, 6 takes each)."""
    root = tmp_path_factory.mktemp("worlds")
    a = sw.generate_world(root / "a", seed=0, **TINY)
    b = sw.generate_world(root / "b", seed=0, **TINY)
    c = sw.generate_world(root / "c", seed=1, **TINY)
    return a, b, c


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_world(worlds):
    a, b, _ = worlds
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert len([k for k in fa if k.endswith(".mp4")]) == 8  # 1 pair x 3 cams + ego + 2 exo + 2
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs between two generations with seed 0"
    # and therefore identical frames
    rel = json.loads(fa["world.json"])["video_files"][0]
    np.testing.assert_array_equal(_decode(a / rel), _decode(b / rel))


def test_different_seed_gives_different_world(worlds):
    a, _, c = worlds
    for rel in ("takes.json", "egoclip/egoclip.csv", "egoit/egoit_instructions.json"):
        assert (a / rel).read_bytes() != (c / rel).read_bytes()
    ego_a = _decode(a / _load(a, "world.json")["video_files"][0])
    ego_c = _decode(c / _load(c, "world.json")["video_files"][0])
    n = min(len(ego_a), len(ego_c))
    assert np.abs(ego_a[:n].astype(int) - ego_c[:n]).mean() > 5


def test_take_specs_are_reproducible_and_well_formed():
    for seed in range(25):
        spec = sw.sample_take_spec(seed, "heldout")
        again = sw.sample_take_spec(seed, "heldout")
        assert [sw.narration(spec, s) for s in spec.steps] == [
            sw.narration(again, s) for s in again.steps
        ]
        assert 4 <= len(spec.object_steps()) <= 8
        assert any(s.is_nav for s in spec.steps)  # held-out takes always have head motion
        names = [o.name for o in spec.objects]
        assert len(names) == len(set(names))  # "the red cup" is unambiguous
        times = [(s.t0, s.t1) for s in spec.steps]
        assert all(t0 < t1 <= spec.duration for t0, t1 in times)
        assert all(times[i][1] <= times[i + 1][0] for i in range(len(times) - 1))


# ----------------------------------------------------------------------------- views


def test_render_take_api_and_ego_exo_differ():
    spec = sw.sample_take_spec(3, "pairs", size=64, fps=6)
    tl = sw.simulate(spec)
    ego = sw.render_take(spec, "ego", timeline=tl)
    exo = sw.render_take(spec, "cam01", timeline=tl)
    assert ego.shape == exo.shape == (spec.num_frames, 64, 64, 3) and ego.dtype == np.uint8
    np.testing.assert_array_equal(ego, sw.render_take(spec, "aria01"))
    # same instant, different cameras: large pixel differences and little correlation
    mad = np.abs(ego.astype(float) - exo).mean(axis=(1, 2, 3))
    assert mad.min() > 25, mad.min()
    g1 = ego.mean(-1).reshape(len(ego), -1)
    g2 = exo.mean(-1).reshape(len(exo), -1)
    corr = [np.corrcoef(x, y)[0, 1] for x, y in zip(g1, g2, strict=True)]
    assert max(corr) < 0.8, max(corr)
    with pytest.raises(KeyError, match="no camera"):
        sw.render_take(spec, "cam03")


def test_acted_on_object_moves_with_the_hand():
    spec = sw.sample_take_spec(5, "pairs")
    tl = sw.simulate(spec)
    for k, s in enumerate(spec.steps):
        if s.verb == "pick up":
            put = next(
                x
                for x in spec.steps[k + 1 :]
                if x.obj == s.obj and x.verb in ("put down", "put in")
            )
            held = (tl.times > s.t0 + 0.6 * (s.t1 - s.t0)) & (tl.times < put.t0)
            gap = tl.hands[held] - tl.objects[held][:, s.obj][:, None]  # [T, 2 hands, 3]
            dist = np.linalg.norm(gap, axis=-1).min(1)  # nearest hand
            assert dist.std() < 1e-3 and dist.max() < 0.2  # rigidly attached to a hand
            assert tl.objects[held][:, s.obj, 2].max() > 0.1  # lifted off the table
        if s.verb == "push":
            i0 = int(np.searchsorted(tl.times, s.t0))
            i1 = int(np.searchsorted(tl.times, s.t1)) - 1
            move = tl.objects[i1, s.obj] - tl.objects[i0, s.obj]
            axis, sign = {"left": (0, -1), "right": (0, 1), "forward": (1, 1)}[s.direction]
            assert sign * move[axis] > 0.15
            others = [j for j in range(len(spec.objects)) if j != s.obj]
            np.testing.assert_allclose(tl.objects[i1, others], tl.objects[i0, others], atol=1e-6)


def test_decoded_frames_match_rendered(tmp_path):
    """Default resolution and codec settings: PSNR of decoded vs rendered frames >= 30 dB."""
    spec = sw.sample_take_spec(7, "pairs")
    tl = sw.simulate(spec)
    for cam in ("aria01", "cam01"):
        frames = sw.render_take(spec, cam, timeline=tl)
        path = tmp_path / f"{cam}.mp4"
        sw.write_mp4(path, frames, spec.fps)
        decoded = _decode(path)
        assert decoded.shape == frames.shape
        per_frame = [_psnr(decoded[i], frames[i]) for i in range(len(frames))]
        assert min(per_frame) >= 30.0, (cam, min(per_frame))
        assert _psnr(decoded, frames) >= 35.0
        # through the pipeline's loader: the sampled frames are the rendered ones
        clip = load_clip(path, 2.0, 4.0, num_frames=8, size=spec.size)
        idx = sample_frame_indices(spec.num_frames, spec.fps, 8, 2.0, 4.0)
        assert _psnr(clip, frames[idx]) >= 30.0


# ----------------------------------------------------------------------------- annotations


def _video_duration(root: Path, rel: str, cache: dict) -> float:
    assert not rel.startswith("/") and ".." not in rel, rel
    assert (root / rel).is_file(), f"missing video {rel}"
    if rel not in cache:
        cache[rel] = probe(root / rel)["duration"]
    return cache[rel]


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def test_annotation_files_cross_reference(worlds):
    root = worlds[0]
    world = _load(root, "world.json")
    counts, splits = world["counts"], world["splits"]
    dur: dict[str, float] = {}
    heldout = set(splits["heldout"])
    train_uids = set(splits["pairs"]) | set(splits["ego"]) | set(splits["exo"])
    all_uids = [u for v in splits.values() for u in v]
    assert len(all_uids) == len(set(all_uids)) == counts["takes"]  # disjoint splits
    assert {k: len(v) for k, v in splits.items()} == world["sizes"]
    for f in world["annotation_files"]:
        assert (root / f).is_file(), f
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*.mp4"))
    assert on_disk == world["video_files"] and len(on_disk) == counts["videos"]

    # Ego-Exo4D: takes.json + atomic descriptions
    takes = _load(root, "takes.json")
    assert {t["take_uid"] for t in takes} == set(splits["pairs"])
    by_uid = {}
    for t in takes:
        fav = t["frame_aligned_videos"]
        assert set(fav) == {"aria01", "cam01", "cam02"}
        rels = [f"{t['root_dir']}/{s['relative_path']}" for c in fav.values() for s in c.values()]
        durations = {_video_duration(root, r, dur) for r in rels}
        assert max(durations) - min(durations) < 1e-6  # time-synchronised cameras
        assert t["duration_sec"] == pytest.approx(durations.pop(), abs=1e-3)
        by_uid[t["take_uid"]] = t
    ann = _load(root, "annotations/atomic_descriptions_train.json")["annotations"]
    assert set(ann) == set(by_uid)
    n_desc = 0
    for uid, passes in ann.items():
        for p in passes:
            for d in p["descriptions"]:
                assert d["text"].startswith("C ") and d["subject"] == "C"
                assert 0 <= d["timestamp"] <= by_uid[uid]["duration_sec"]
                assert d["best_exo"]["cam_id"] in ("cam01", "cam02")
                n_desc += 1
    assert n_desc == counts["atomic_descriptions"]

    # EgoClip (ego corpus)
    rows = _read_csv(root / "egoclip/egoclip.csv", "\t")
    assert list(rows[0])[1:] == [
        "video_uid",
        "video_dur",
        "narration_source",
        "narration_ind",
        "narration_time",
        "clip_start",
        "clip_end",
        "clip_text",
        "tag_verb",
        "tag_noun",
    ]
    assert len(rows) == counts["egoclip_rows"]
    for r in rows:
        assert r["video_uid"] in splits["ego"]
        d = _video_duration(root, f"egoclip/videos/{r['video_uid']}.mp4", dur)
        assert float(r["video_dur"]) == pytest.approx(d, abs=1e-3)
        assert (
            0 <= float(r["clip_start"]) <= float(r["narration_time"]) <= float(r["clip_end"]) <= d
        )
        assert r["clip_text"].startswith("#C C ")
        assert json.loads(r["tag_verb"]) and isinstance(json.loads(r["tag_noun"]), list)

    # exo corpus and EgoIT (VideoLLaMA2 JSON with start / end)
    pair_ego = {
        f"{t['root_dir']}/{t['frame_aligned_videos']['aria01']['rgb']['relative_path']}"
        for t in takes
    }
    exo_videos = {f"exo_web/videos/{u}.mp4" for u in splits["exo"]}
    ego_videos = {f"egoclip/videos/{u}.mp4" for u in splits["ego"]} | pair_ego
    for rel, allowed, key in (
        ("exo_web/exo_captions.json", exo_videos, "exo_captions"),
        ("egoit/egoit_instructions.json", ego_videos, "egoit"),
    ):
        recs = _load(root, rel)
        assert len(recs) == counts[key]
        assert {r["video"] for r in recs} == allowed
        for r in recs:
            d = _video_duration(root, r["video"], dur)
            assert 0 <= r["start"] < r["end"] <= d
            conv = r["conversations"]
            assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<video>\n")
            assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
    egoit = _load(root, "egoit/egoit_instructions.json")
    assert len({r["kind"] for r in egoit}) >= 5
    assert all(len(t) >= 5 for t in sw.EGOIT_TEMPLATES.values())

    # held-out takes never appear in training files; EgoBench uses held-out takes only
    training = "".join(
        (root / f).read_text()
        for f in (
            "takes.json",
            "annotations/atomic_descriptions_train.json",
            "egoclip/egoclip.csv",
            "exo_web/exo_captions.json",
            "egoit/egoit_instructions.json",
        )
    )
    assert not any(u in training for u in heldout)
    bench = "".join(
        p.read_text() for p in (root / "egobench").rglob("*") if p.suffix in (".json", ".csv")
    )
    assert not any(u in bench for u in train_uids)
    _check_egobench(root, world, heldout, dur)


def _check_egobench(root: Path, world: dict, heldout: set, dur: dict) -> None:
    c = world["counts"]["egobench"]
    vid = lambda u: f"egobench/videos/{u}.mp4"  # noqa: E731

    qs = _load(root, "egobench/egoschema/questions.json")
    ans = _load(root, "egobench/egoschema/subset_answers.json")
    assert len(qs) == c["egoschema"] > 0 and set(ans) == {q["q_uid"] for q in qs}
    for q in qs:
        _video_duration(root, q["video"], dur)
        assert 0 <= ans[q["q_uid"]] < 5 and len({q[f"option {i}"] for i in range(5)}) == 5

    close = _load(root, "egobench/qaego4d/qaego4d_test_close.json")
    open_ = _load(root, "egobench/qaego4d/qaego4d_test_open.json")
    assert len(close) == len(open_) == c["qaego4d"] > 0
    for r, o in zip(close, open_, strict=True):
        d = _video_duration(root, r["video"], dur)
        assert r["options"][r["answer_idx"]] == r["answer"] == o["answer"]
        assert "options" not in o and r["video_id"] in heldout
        if "moment_start_sec" in r:
            assert 0 <= r["moment_start_sec"] < r["moment_end_sec"] <= d

    tqa = _load(root, "egobench/egotaskqa/egotaskqa_test.json")
    assert len(tqa) == c["egotaskqa"] > 0
    assert {r["type"] for r in tqa} == {"direct", "indirect"}
    for r in tqa:
        _video_duration(root, r["video"], dur)
        assert r["options"][r["answer_idx"]] == r["answer"] and len(set(r["options"])) == 4

    classes = (root / "egobench/charades_ego/Charades_v1_classes.txt").read_text().splitlines()
    assert len(classes) == len(sw.ACTION_CLASSES) == c["charades_ego_classes"]
    rows = _read_csv(root / "egobench/charades_ego/CharadesEgo_v1_test_only1st.csv", ",")
    assert len(rows) == c["charades_ego_videos"] == len(heldout)
    for r in rows:
        d = _video_duration(root, r["video"], dur)
        assert r["id"] in heldout and float(r["length"]) == pytest.approx(d, abs=0.01)
        for act in r["actions"].split(";"):
            cls, t0, t1 = act.split()
            assert int(cls[1:]) < len(classes) and 0 <= float(t0) < float(t1) <= d + 0.01

    mir = _read_csv(root / "egobench/epic_mir/EPIC_100_retrieval_test.csv", ",")
    sent = _read_csv(root / "egobench/epic_mir/EPIC_100_retrieval_test_sentence.csv", ",")
    rel = np.load(
        root / "egobench/epic_mir/caption_relevancy_EPIC_100_retrieval_test.npy", allow_pickle=False
    )
    assert rel.shape == (len(mir), len(sent)) == (c["epic_mir_clips"], c["epic_mir_sentences"])
    col = {s["sentence"]: j for j, s in enumerate(sent)}
    for i, r in enumerate(mir):
        d = _video_duration(root, vid(r["video_id"]), dur)
        assert int(r["start_frame"]) < int(r["stop_frame"]) <= round(d * world["fps"])
        assert rel[i, col[r["narration"]]] == 1.0  # a clip is fully relevant to its caption
    assert rel.min() >= 0 and rel.max() <= 1

    plan = _load(root, "egobench/egoplan/EgoPlan_validation.json")
    assert len(plan) == c["egoplan"] > 0
    for r in plan:
        d = _video_duration(root, r["video"], dur)
        assert r[f"choice_{r['golden_choice_idx'].lower()}"] == r["answer"]
        assert 0 <= r["start"] < r["end"] <= d and r["task_progress_metadata"]

    vln = _load(root, "egobench/vlnqa/vlnqa.json")
    assert len(vln) == c["vlnqa"] >= len(heldout)  # >= 1 head motion per held-out take
    for r in vln:
        d = _video_duration(root, r["video"], dur)
        assert r["answer"] in r["candidates"] and len(r["candidates"]) == 4
        assert 0 <= r["start"] < r["end"] <= d

    mcq = _load(root, "egobench/egomcq/egomcq.json")
    assert len(mcq) == c["egomcq"] and c["egomcq_inter"] > 0 and c["egomcq_intra"] > 0
    for item in mcq.values():
        ch = item["choices"]
        assert len(ch) == 5 and ch[str(item["answer"])] == item["query"]
        for choice in ch.values():
            d = _video_duration(root, vid(choice["video_uid"]), dur)
            assert 0 <= choice["clip_start"] < choice["clip_end"] <= d
        uids = {x["video_uid"] for x in ch.values()}
        if item["types"] == 2:  # intra-video: all candidates from the query's take
            assert uids == {item["query"]["video_uid"]}
        else:
            assert item["types"] == 1 and len(uids) > 1


# ----------------------------------------------------------------------------- safety


def test_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    out = tmp_path / "world"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite"):
        sw.generate_world(out, seed=0, num_takes=4, size=32, fps=4, workers=1, progress=False)
    assert sw.main(["--out", str(out), "--takes", "4", "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"

    # an interruption while rendering leaves neither a world nor a temporary directory
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("input_pipeline.synthetic.world._render_all", boom)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        sw.generate_world(fresh, seed=0, num_takes=4, size=32, fps=4, workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
    monkeypatch.undo()

    # --overwrite replaces the old content atomically
    sw.generate_world(
        out, seed=0, num_takes=4, size=32, fps=4, workers=1, progress=False, overwrite=True
    )
    assert not (out / "keep.txt").exists() and (out / "world.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
