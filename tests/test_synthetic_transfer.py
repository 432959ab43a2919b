"""The study regime of the synthetic world: transfer concepts, held-out groups, val takes."""

import hashlib
import json
from pathlib import Path

import av
import numpy as np
import pytest

from exo2ego_jax.demo import held_out_views
from input_pipeline import synthetic as sw
from input_pipeline.egobench import TASKS, RetrievalBenchmark, load_task
from input_pipeline.synthetic import cli, concepts
from input_pipeline.synthetic import egobench as bench_files
from input_pipeline.synthetic.concepts import StudyRegime, TransferConcepts, involves, mentions
from input_pipeline.synthetic.corpora import egoclip_file, egoexo_files, egoit_file
from input_pipeline.synthetic.language import narration
from input_pipeline.synthetic.rendering import render_take
from input_pipeline.synthetic.sampling import BENCH_DIRS, SPLITS

PURPLE_KNIFE = TransferConcepts(("purple",), ("knife",))
# A world's sizes big enough for every group to occur (takes are cheap to sample).
SIZES = {"pairs": 12, "ego": 6, "exo": 16, "heldout": 8, "val": 6}
# sha256 of repr(build_specs(...)) computed before the study regime existed: the default
# world's takes must never change.
DEFAULT_SPECS = {
    (0, 64, 6, 64): "146e1291c41b132875b649f331d9464a0c26fd08ff685593d6eb8be07fc3329a",
    (3, None, 8, 128): "6066e713e2aaf21ec8ac3be587515967c51d1d8acff23b8b354e6aca459795d7",
}
TINY_STUDY = dict(
    num_takes=5,
    heldout_takes=2,
    study=StudyRegime(transfer_colors=("purple",), transfer_shapes=("knife",), val_takes=2),
    size=64,
    fps=6,
    workers=1,
    progress=False,
)


def _by_split(specs) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in specs:
        out.setdefault(s.split, []).append(s)
    return out


@pytest.fixture(scope="module")
def study_specs():
    return _by_split(sw.build_specs(0, SIZES, fps=6, size=64, concepts=PURPLE_KNIFE))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny rendered world in the study regime (1 pair, 1 ego, 2 exo, 2 + 2 held-out)."""
    return sw.generate_world(tmp_path_factory.mktemp("study") / "w", seed=0, **TINY_STUDY)


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("key", sorted(DEFAULT_SPECS, key=str))
def test_default_specs_are_unchanged(key):
    seed, num_takes, fps, size = key
    sizes = sw.split_sizes(num_takes) if num_takes else {"pairs": 2, "ego": 1, "exo": 3}
    sizes.setdefault("heldout", 4)
    for extra in ({}, {"concepts": TransferConcepts()}):
        specs = sw.build_specs(seed, sizes, fps=fps, size=size, **extra)
        assert hashlib.sha256(repr(specs).encode()).hexdigest() == DEFAULT_SPECS[key]


def test_ego_labelled_takes_hold_no_transfer_concept(study_specs):
    for split in ("pairs", "ego"):
        assert len(study_specs[split]) == SIZES[split]
        for s in study_specs[split]:
            names = [o.name for o in s.objects]
            assert not mentions(s, PURPLE_KNIFE), (s.name, names)
            assert not any("purple" in n or "knife" in n for n in names)


def test_ego_labelled_text_never_names_a_transfer_concept(study_specs):
    pairs, ego = study_specs["pairs"], study_specs["ego"]
    files = {**egoexo_files(pairs, 0), **egoclip_file(ego), **egoit_file(pairs + ego, 0)}
    assert len(files) == 5  # takes, atomic descriptions, splits, EgoClip, EgoIT
    for rel, data in files.items():
        text = data.decode().lower()
        assert "purple" not in text and "knife" not in text, rel


def test_exo_takes_keep_transfer_concepts_at_their_natural_rate(study_specs):
    default = _by_split(sw.build_specs(0, SIZES, fps=6, size=64))
    assert [s.uid for s in study_specs["exo"]] == [s.uid for s in default["exo"]]
    assert any(involves(s, PURPLE_KNIFE) for s in study_specs["exo"])


@pytest.mark.parametrize("split", ["heldout", "val"])
def test_heldout_and_val_takes_are_grouped(study_specs, split):
    takes = study_specs[split]
    n_transfer = concepts.num_transfer(len(takes), 0.5, PURPLE_KNIFE)
    assert n_transfer == len(takes) // 2
    for s in takes[:n_transfer]:  # transfer: a step acts on a transfer-concept object
        assert involves(s, PURPLE_KNIFE), s.name
    for s in takes[n_transfer:]:  # seen: no transfer-concept object at all
        assert not mentions(s, PURPLE_KNIFE), s.name


def _default_take(k: int, i: int, split: str) -> sw.TakeSpec:
    """Take ``i`` of split number ``k`` as the world without a study regime samples it."""
    child = int(np.random.SeedSequence([0, k, i]).generate_state(1)[0])
    return sw.sample_take_spec(child, split, i, fps=6, size=64)


def test_takes_that_already_fit_keep_their_default_seed(study_specs):
    kept = 0
    for split, takes in study_specs.items():
        for i, s in enumerate(takes):
            d = _default_take(SPLITS.index(split), i, split)
            group = concepts.take_group(split, s.index, len(takes), PURPLE_KNIFE, 0.5)
            if concepts.satisfies(d, group, PURPLE_KNIFE):
                assert s.uid == d.uid, s.name
                kept += 1
            else:
                assert s.uid != d.uid, s.name
    assert 0 < kept < sum(SIZES.values())


def test_val_takes_change_no_other_split():
    without = sw.build_specs(0, {**SIZES, "val": 0}, concepts=PURPLE_KNIFE)
    with_val = sw.build_specs(0, SIZES, concepts=PURPLE_KNIFE)
    assert repr(with_val[: len(without)]) == repr(without)
    val = with_val[len(without) :]
    assert [s.name for s in val] == [f"synth_val_{i:04d}" for i in range(SIZES["val"])]
    assert all(list(s.videos) == ["aria01"] for s in val)
    assert all(v.startswith("egobench_val/videos/") for s in val for v in s.videos.values())


def test_fraction_decides_the_transfer_count():
    specs = _by_split(sw.build_specs(1, SIZES, concepts=PURPLE_KNIFE, transfer_fraction=0.25))
    assert [involves(s, PURPLE_KNIFE) for s in specs["heldout"]] == [True] * 2 + [False] * 6
    assert concepts.num_transfer(5, 0.5, PURPLE_KNIFE) == 3  # rounded half up
    assert concepts.num_transfer(5, 0.5, TransferConcepts()) == 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(colors=("pink",)), "unknown transfer colour 'pink'; expected some of ['red'"),
        (dict(shapes=("knife", "fork")), "unknown transfer shape 'fork'; expected some of"),
        (dict(colors=tuple(sw.COLORS)), "leave no seen colour"),
        (dict(shapes=tuple(sw.SHAPES)), "leave no seen shape"),
    ],
)
def test_invalid_concepts_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        TransferConcepts(**kwargs)


def test_concepts_are_normalised():
    c = TransferConcepts(("purple", "red", "purple"), "knife")
    assert (c.colors, c.shapes) == (("red", "purple"), ("knife",))
    assert not TransferConcepts() and c


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(transfer_colors=("mauve",)), "unknown transfer colour 'mauve'"),
        (dict(transfer_shapes=tuple(sw.SHAPES)), "leave no seen shape"),
        (dict(transfer_heldout_fraction=1.5), r"must be in \[0, 1\]"),
        (dict(val_takes=-1), "val takes must be >= 0"),
    ],
)
def test_bad_study_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudyRegime(**kwargs)


def test_impossible_constraint_names_the_take():
    hard = TransferConcepts(("red", "green", "blue", "yellow"), ("cup", "box", "knife"))
    with pytest.raises(ValueError, match="no seen take 0 of split 'pairs' in 1000 samples"):
        sw.build_specs(0, {"pairs": 1}, concepts=hard)


def test_cli_passes_the_study_flags(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        cli, "generate_world", lambda out, seed, takes, **kw: seen.update(kw["study"].__dict__)
    )
    argv = ["--out", "x", "--transfer-colors", "purple", "red", "--transfer-shapes", "knife"]
    assert cli.main(argv + ["--val-takes", "3", "--transfer-heldout-fraction", "0.25"]) == 0
    assert seen["transfer_colors"] == ("red", "purple")  # vocabulary order
    assert seen["transfer_shapes"] == ("knife",)
    assert (seen["val_takes"], seen["transfer_heldout_fraction"]) == (3, 0.25)
    assert cli.main(["--out", "x"]) == 0
    assert (seen["transfer_colors"], seen["transfer_shapes"], seen["val_takes"]) == ((), (), 0)


def test_cli_reports_a_bad_name(tmp_path, capsys):
    assert cli.main(["--out", str(tmp_path / "w"), "--transfer-colors", "teal"]) == 2
    assert "unknown transfer colour 'teal'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- a rendered world


def test_manifest_records_the_study(world):
    manifest = json.loads((world / "world.json").read_text())
    study = manifest["study"]
    assert (study["transfer_colors"], study["transfer_shapes"]) == (["purple"], ["knife"])
    assert study["val_takes"] == 2 and manifest["sizes"]["val"] == 2
    groups = {
        "synth_heldout_0000": "transfer",
        "synth_heldout_0001": "seen",
        "synth_val_0000": "transfer",
        "synth_val_0001": "seen",
    }
    assert study["groups"] == groups == concepts.heldout_groups(world)
    bench_videos = [v for v in manifest["video_files"] if v.startswith("egobench")]
    assert sorted(study["video_takes"]) == bench_videos
    assert all((world / v).is_file() for v in bench_videos)
    specs = sw.build_specs(0, manifest["sizes"], fps=6, size=64, concepts=PURPLE_KNIFE)
    exo = [involves(s, PURPLE_KNIFE) for s in specs if s.split == "exo"]
    assert study["exo_transfer_takes"] == sum(exo)
    assert study["exo_transfer_rate"] == round(sum(exo) / len(exo), 4)


def test_ego_labelled_files_never_name_a_transfer_concept(world):
    files = ["takes.json", "annotations/atomic_descriptions_train.json", "egoclip/egoclip.csv"]
    for rel in files + ["egoit/egoit_instructions.json"]:
        text = (world / rel).read_text().lower()
        assert "purple" not in text and "knife" not in text, rel


def test_val_egobench_files_mirror_the_test_ones_and_share_no_take(world):
    layout = {}
    for d in ("egobench", "egobench_val"):
        files = [p.relative_to(world / d) for p in (world / d).rglob("*") if p.is_file()]
        layout[d] = sorted(str(p) for p in files if p.parts[0] != "videos")
        assert len(files) - len(layout[d]) == 2  # one video per take
    assert layout["egobench"] == layout["egobench_val"] and len(layout["egobench"]) == 13
    study = concepts.load_manifest(world)["study"]
    uids = {v.split("/")[-1][:-4]: v.split("/")[0] for v in study["video_takes"]}
    for path in (world / "egobench").rglob("*.*"):
        if path.suffix in (".json", ".csv"):
            text = path.read_text()
            assert not [u for u, d in uids.items() if d == "egobench_val" and u in text], path
    for path in (world / "egobench_val").rglob("*.*"):
        if path.suffix in (".json", ".csv"):
            text = path.read_text()
            assert not [u for u, d in uids.items() if d == "egobench" and u in text], path
    # Question ids come from streams of their own: a prediction never answers both.
    for task in ("egoschema", "qaego4d_close", "egotaskqa"):
        ids = [
            {it.item_id for it in load_task(task, world, **bench_files.loader_kwargs(d)[task])}
            for d in ("egobench", "egobench_val")
        ]
        assert ids[0] and ids[1] and not ids[0] & ids[1], task


def _items(bench):
    return bench.clips if isinstance(bench, RetrievalBenchmark) else bench


@pytest.mark.parametrize("prefix, split", [("egobench", "heldout"), ("egobench_val", "val")])
def test_every_item_maps_to_a_take_of_its_split(world, prefix, split):
    manifest = concepts.load_manifest(world)
    groups = concepts.heldout_groups(world)
    kwargs = bench_files.loader_kwargs(prefix)
    for task in TASKS:
        items = _items(load_task(task, world, **kwargs[task]))
        takes = {concepts.item_take(task, it, manifest) for it in items}
        if task == "egomcq":  # no video of its own: the take of the query narration
            uids = {Path(v).stem: t for v, t in manifest["study"]["video_takes"].items()}
            for it in items:
                assert concepts.item_take(task, it, manifest) == uids[it.meta["video_uid"]]
        assert takes == {f"synth_{split}_0000", f"synth_{split}_0001"}, task
        assert {groups[t] for t in takes} == {"transfer", "seen"}


def test_loader_kwargs_of_the_test_dir_are_the_readers_defaults(world):
    kwargs = bench_files.loader_kwargs("egobench")
    for task in TASKS:
        assert _items(load_task(task, world, **kwargs[task])) == _items(load_task(task, world))


def test_item_take_of_a_path_and_its_errors(world):
    manifest = concepts.load_manifest(world)
    video = next(v for v, t in manifest["study"]["video_takes"].items() if t == "synth_val_0001")
    assert concepts.item_take("vlnqa", video, manifest) == "synth_val_0001"
    assert concepts.item_take("vlnqa", world / video, manifest) == "synth_val_0001"
    pair_video = "takes/synth_pairs_0000/frame_aligned_videos/aria01_214-1.mp4"
    with pytest.raises(KeyError, match="not a held-out or validation video"):
        concepts.item_take("vlnqa", pair_video, manifest)
    with pytest.raises(ValueError, match="unknown task"):
        concepts.item_take("nope", video, manifest)
    with pytest.raises(ValueError, match="no 'study' record"):
        concepts.item_take("vlnqa", video, {"seed": 0})


# ----------------------------------------------------------------------------- exo views


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_world_takes_are_the_worlds_own(world):
    manifest = concepts.load_manifest(world)
    for split in ("pairs", "heldout", "val"):
        takes = held_out_views.world_takes(world, split)
        assert [t.uid for t in takes] == manifest["splits"][split]
    with pytest.raises(ValueError, match="no 'nope' split"):
        held_out_views.world_takes(world, "nope")


@pytest.mark.parametrize("split", ["heldout", "val"])
def test_exo_view_world_shows_the_held_out_takes_from_the_exo_rig(world, tmp_path, split):
    exo = held_out_views.exo_view_world(world, tmp_path / "exo", workers=1, split=split)
    assert not (tmp_path / "exo.tmp").exists()
    bench = world / BENCH_DIRS[split]
    for p in bench.rglob("*"):  # the annotation files, byte for byte
        if p.is_file() and p.parent.name != "videos":
            assert (exo / p.relative_to(world)).read_bytes() == p.read_bytes(), p
    for take in held_out_views.world_takes(world, split):
        rel = take.videos["aria01"]
        got = _decode(exo / rel).astype(np.float32)
        want = render_take(held_out_views.with_exo_camera(take), "cam01")
        ego = _decode(world / rel).astype(np.float32)
        assert got.shape == want.shape == ego.shape  # time-aligned with the ego video
        err = np.abs(got - want).mean()  # the codec's loss only
        assert err < 3.0
        assert np.abs(got - ego).mean() > 10 * err


def test_step_clips_label_the_transfer_concepts_on_the_table(world, tmp_path):
    takes = held_out_views.world_takes(world, "heldout")
    videos = {t.uid: tmp_path / f"{t.uid}.mp4" for t in takes}
    clips = held_out_views.step_clips(world, takes, videos)
    assert len(clips) == sum(len(t.object_steps()) for t in takes)
    groups = concepts.heldout_groups(world)
    for take in takes:
        mine = [c for c in clips if c.take == take.name]
        purple = any(o.color == "purple" for o in take.objects)
        knife = any(o.shape == "knife" for o in take.objects)
        assert {(c.labels["purple"], c.labels["knife"]) for c in mine} == {(purple, knife)}
        assert {c.group for c in mine} == {groups[take.name]}
        assert (purple or knife) == (groups[take.name] == "transfer")
        assert [(c.start, c.end) for c in mine] == [(s.t0, s.t1) for s in take.object_steps()]
        # The step labels: what the step's narration names ("C puts the purple knife ...").
        said = [narration(take, s) for s in take.object_steps()]
        assert [c.step_labels["purple"] for c in mine] == [" purple " in t for t in said]
        assert [c.step_labels["knife"] for c in mine] == [" knife" in t for t in said]
        assert {c.exo for c in mine} == {videos[take.uid]}
    assert any(c.step_labels["purple"] for c in clips) and any(
        c.step_labels["knife"] for c in clips
    )
    # Some steps of transfer takes act on other objects: the two labels differ.
    assert any(c.labels["purple"] and not c.step_labels["purple"] for c in clips)
