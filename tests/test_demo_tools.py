"""The demo's stand-in pretrained CLIP (``demo.pretrain_clip``) and the held-out chat check
(``demo.chat_check``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs.eval import get_config as get_eval_config
from exo2ego_jax import chat
from exo2ego_jax.demo import chat_check, pretrain_clip, pretrain_lm
from exo2ego_jax.models import clip as clip_lib
from exo2ego_jax.weights import hf
from input_pipeline import synthetic, templates
from input_pipeline.pipeline import PipelineOptions
from input_pipeline.synthetic import clip_corpus


def test_corpus_labels_name_what_the_narration_says():
    take = synthetic.sample_take_spec(7, "pairs", 0, size=64)
    for step in take.steps:
        words = dict(zip(clip_corpus.LABELS, clip_corpus.clip_labels(take, step), strict=True))
        named = {k: clip_corpus.LABELS[k][i] for k, i in words.items()}
        text = synthetic.narration(take, step)
        assert named["verb"] == step.verb
        if step.is_nav:
            assert named["color"] == named["shape"] == named["target"] == "none"
            assert named["direction"] == step.direction and step.direction in text
        else:
            obj = take.objects[step.obj]
            assert f"the {named['color']} {named['shape']}" == f"the {obj.name}"
            assert f"the {obj.name}" in text
        if step.target is not None:
            assert f"the {named['target']} bowl" in text
        else:
            assert named["target"] == "none"


def test_render_take_renders_chosen_frames_exactly_as_the_full_video():
    take = synthetic.sample_take_spec(11, "pairs", 0, size=32)
    for camera in ("ego", "cam01"):
        full = synthetic.render_take(take, camera, ss=1)
        some = synthetic.render_take(take, camera, ss=1, indices=[3, 0, 17, 17])
        np.testing.assert_array_equal(some, full[[3, 0, 17, 17]])


def test_render_corpus_is_deterministic_and_never_a_world_take():
    a = clip_corpus.render_corpus(2, seed=3, image_size=32, size=64, workers=1, progress=False)
    b = clip_corpus.render_corpus(2, seed=3, image_size=32, size=64, workers=1, progress=False)
    n = len(a)
    assert a.frames.shape == (n, 8, 32, 32, 3) and a.frames.dtype == np.uint8
    assert a.labels.shape == (n, len(clip_corpus.LABELS)) and a.takes.tolist()[-1] == 1
    assert a.views.count("ego") == a.views.count("exo") == n // 2
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_array_equal(a.labels, b.labels)
    # Take 0's clips are its steps seen by ego, then the same steps by exo: one label each.
    k = int((a.takes == 0).sum()) // 2
    assert a.views[:k] == ["ego"] * k and a.views[k : 2 * k] == ["exo"] * k
    np.testing.assert_array_equal(a.labels[:k], a.labels[k : 2 * k])
    assert not np.array_equal(a.frames[0], a.frames[k])  # the same step, seen differently
    world_uids = {t.uid for t in synthetic.build_specs(3, dict(pairs=9, ego=9, exo=9))}
    seeds = [
        int(np.random.SeedSequence([3, clip_corpus._SPLIT_KEY, i]).generate_state(1)[0])
        for i in range(2)
    ]
    assert not {synthetic.sample_take_spec(s).uid for s in seeds} & world_uids
    with pytest.raises(ValueError, match="views"):
        clip_corpus.render_corpus(1, views=("top",), progress=False)
    # Geometry for dense supervision: the acted-on object carries the clip's colour / shape.
    assert a.object_xy.shape[:2] == (n, 8) and a.object_xy.shape[3] == 2
    assert a.object_labels.shape == (n, a.object_xy.shape[2], 2)
    seen = a.object_xy[~np.isnan(a.object_xy)]
    assert seen.size and seen.min() >= 0.0 and seen.max() < 1.0
    acting = np.flatnonzero(a.acted >= 0)
    assert acting.size
    color, shape = list(clip_corpus.LABELS).index("color"), list(clip_corpus.LABELS).index("shape")
    np.testing.assert_array_equal(
        a.object_labels[acting, a.acted[acting]], a.labels[acting][:, [color, shape]]
    )
    np.testing.assert_array_equal(a.labels[a.acted < 0][:, color], 0)


def test_object_screen_positions_land_on_the_objects():
    take = synthetic.sample_take_spec(
        123, "pairs", 0, size=128, exo_cameras=(sorted(synthetic.EXO_RIGS)[0],)
    )
    palette = {k: np.asarray(v) / np.linalg.norm(v) for k, v in synthetic.COLORS.items()}
    for camera in ("ego", sorted(synthetic.EXO_RIGS)[0]):
        frame = synthetic.render_take(take, camera, ss=1, indices=[0])[0]
        xy = synthetic.object_screen_positions(take, camera, indices=[0])[0]
        checked = 0
        for o, (x, y) in zip(take.objects, xy, strict=True):
            if o.shape == "knife" or np.isnan(x):  # a knife's centre is its grey blade
                continue
            rgb = frame[int(y * 128), int(x * 128)].astype(float)
            nearest = max(palette, key=lambda c: float(palette[c] @ rgb))
            assert nearest == o.color, (camera, o.name, rgb)
            checked += 1
        assert checked >= 3
    ego = synthetic.object_screen_positions(take, "ego")
    assert ego.shape == (take.num_frames, len(take.objects), 2)
    assert np.isnan(ego).any()  # the head turns: objects leave the ego view
    with pytest.raises(KeyError, match="no camera"):
        synthetic.object_screen_positions(take, "cam99")


def test_dense_targets_put_each_object_in_its_patch():
    nan = np.nan
    # Two clips of two frames, two objects each, on a 2×2 patch grid.
    xy = np.array(
        [
            [[[0.1, 0.2], [0.9, 0.6]], [[0.6, 0.1], [nan, nan]]],
            [[[0.4, 0.9], [nan, nan]], [[0.99, 0.99], [nan, nan]]],
        ],
        np.float32,
    )
    labels = np.array([[[3, 1], [5, 2]], [[2, 4], [0, 0]]], np.int32)
    color, shape, where = pretrain_clip.dense_targets(xy, labels, np.array([1, -1]), grid=2)
    np.testing.assert_array_equal(
        color, [[[3, 0, 0, 5], [0, 3, 0, 0]], [[0, 0, 2, 0], [0, 0, 0, 2]]]
    )
    np.testing.assert_array_equal(
        shape, [[[1, 0, 0, 2], [0, 1, 0, 0]], [[0, 0, 4, 0], [0, 0, 0, 4]]]
    )
    # Clip 0 acts on object 1: patch 3, then off the image (4); clip 1 acts on nothing.
    np.testing.assert_array_equal(where, [[3, 4], [4, 4]])


def test_held_out_accuracy_is_computed_on_evenly_spaced_frames_of_the_held_out_clips():
    """pretrain_clip's accuracy (_right, _accuracy) against numbers computed by hand: a
    stand-in classifier reads each clip's id and frame indices from its pixels and predicts
    from a table, so which clips, which frames and which fields count are all visible."""
    import jax
    import jax.numpy as jnp

    sizes = [len(v) for v in clip_corpus.LABELS.values()]
    n, t = 10, 8
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, k, n) for k in sizes], 1)
    frames = np.zeros((n, t, 4, 4, 3), np.uint8)
    frames[:, :, 0, 0, 0] = np.arange(n)[:, None]  # clip id
    frames[:, :, 0, 1, 0] = np.arange(t)[None, :]  # frame index
    table = labels.copy()  # what the classifier answers for each clip
    table[2, 0] = (labels[2, 0] + 1) % sizes[0]  # clip 2: verb wrong
    table[5, 1:3] = (labels[5, 1:3] + 1) % np.asarray(sizes[1:3])  # clip 5: colour, shape
    table[7, 4] = (labels[7, 4] + 1) % sizes[4]  # clip 7: direction wrong (not held out)

    def forward(params, x):
        assert x.shape[1] == 4
        ids = x[:, 0, 0, 0, 0].astype(jnp.int32)
        evenly = jnp.all(x[:, :, 0, 1, 0] == jnp.asarray([0, 2, 5, 7], x.dtype), axis=1)
        pred = jnp.where(evenly[:, None], jnp.asarray(table)[ids], 0)  # other frames: wrong
        return jnp.concatenate(
            [jax.nn.one_hot(pred[:, k], size) for k, size in enumerate(sizes)], -1
        )

    held_out = np.array([1, 2, 3, 5, 9])
    right = pretrain_clip._right(forward, None, frames, labels, held_out, 4, sizes)
    acc = pretrain_clip._accuracy(right)
    want = {name: 1.0 for name in clip_corpus.LABELS}
    want.update(verb=4 / 5, color=4 / 5, shape=4 / 5, all=3 / 5)  # clips 2 and 5 miss
    assert acc == pytest.approx(want)


def test_pretrain_clip_learns_and_writes_a_loadable_hf_tower(tmp_path):
    cfg = clip_lib.tiny(image_size=32, patch_size=8)
    corpus = clip_corpus.render_corpus(4, image_size=32, size=64, workers=1, progress=False)
    out = tmp_path / "clip"
    s = pretrain_clip.pretrain(
        out,
        config=cfg,
        num_takes=4,
        steps=80,
        batch_size=8,
        lr=3e-3,
        corpus=corpus,
        val_fraction=0.25,
        progress=False,
    )
    # Five softmax classifiers start near sum(log |vocab|) = 9.3 nats, the dense probes near
    # log 7 + log 6 + log 17 = 6.6 (colours, shapes, 4×4 patches + absent); both must learn.
    dense = len(clip_corpus.LABELS["color"]) * len(clip_corpus.LABELS["shape"]) * (4 * 4 + 1)
    start = sum(np.log(len(v)) for v in clip_corpus.LABELS.values()) + np.log(dense)
    assert 0.8 * start < s["first_loss"] < 1.25 * start and s["last_loss"] < 0.6 * s["first_loss"]
    assert s["clips"] + s["val_clips"] == len(corpus) and s["val_clips"] > 0
    assert 0 <= s["corpus_seconds"] < 0.05 < s["seconds"]  # given a corpus: none rendered
    assert set(s["accuracy"]) == {*clip_corpus.LABELS, "all"}
    # Held-out accuracies count the held-out clips (take 3 of 4): whole multiples of 1/val.
    n_val = int((corpus.takes == 3).sum())
    assert s["val_clips"] == n_val
    for v in s["accuracy"].values():
        assert abs(v * n_val - round(v * n_val)) < 1e-9, v
    assert s["accuracy"]["all"] <= min(v for k, v in s["accuracy"].items() if k != "all")
    # Per-view accuracies are over a partition of the held-out clips: weighted, they add up.
    by_view, views = s["accuracy_by_view"], np.asarray(corpus.views)[corpus.takes == 3]
    assert set(by_view) == {"ego", "exo"}
    for field, acc in s["accuracy"].items():
        mixed = sum(by_view[v][field] * np.mean(views == v) for v in by_view)
        assert mixed == pytest.approx(acc)
    assert not list(tmp_path.glob(".clip.tmp-*"))  # written aside, then renamed
    with pytest.raises(ValueError, match="holds out all 4 corpus takes"):
        pretrain_clip.pretrain(tmp_path / "x", config=cfg, corpus=corpus, val_fraction=0.9)
    tower, params = hf.load_clip_vision(out)
    loaded_cfg = tower.config
    assert (loaded_cfg.image_size, loaded_cfg.patch_size) == (32, 8)
    assert params["embeddings"]["patch_embedding"]["kernel"].shape == (8, 8, 3, cfg.hidden_size)

    import torch  # noqa: PLC0415
    from transformers import CLIPVisionModel  # noqa: PLC0415

    ref = CLIPVisionModel.from_pretrained(out).eval()
    x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state
    got = tower.apply({"params": params}, x).last_hidden_state
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)


def test_chat_check_text_rules():
    assert chat_check.normalise("#C C picks up  the red cup.") == "c picks up the red cup"
    assert chat_check._verb_phrase("#C C puts the red cup in the bowl") == "puts"
    assert chat_check._verb_phrase("C picks up the red cup.") == "picks up"
    assert chat_check._verb_phrase("#C C steps back") == ""
    vocab = {"colour": ["red", "blue"], "object": ["cup", "bowl"]}
    assert chat_check.word_agreement(
        "C picks up the red cup.", "#C C picks up the blue cup", vocab
    ) == {
        "colour": False,
        "object": True,
    }
    # Two objects in the truth: both must be named.
    assert chat_check.word_agreement(
        "C puts the cup in the red bowl", "#C C puts the cup", vocab
    ) == {"object": True}
    assert not chat_check.word_agreement("C puts the cup", "#C C puts the cup in the bowl", vocab)[
        "object"
    ]


def test_heldout_clips_are_distinct_object_clips_of_heldout_takes(world):
    clips = chat_check.heldout_clips(world, 50)
    assert clips and len({(v, s) for v, s, _, _ in clips}) == len(clips)
    heldout = set(json.loads((world / "world.json").read_text())["splits"]["heldout"])
    assert heldout  # the EgoBench videos are the held-out takes' ego videos
    for video, start, end, text in clips:
        assert video.is_file() and end > start
        assert chat_check._verb_phrase(text), text  # hand-object actions only
    with pytest.raises(FileNotFoundError, match="egomcq.json"):
        chat_check.heldout_clips(world / "nowhere", 5)


def test_training_clips_are_the_stage3_doing_questions(world):
    items = json.loads((world / "egoit" / "egoit_instructions.json").read_text())
    asked = {
        (it["video"], it["start"]): it["conversations"][1]["value"]
        for it in items
        if it["conversations"][0]["value"].endswith(chat_check.QUESTION)
    }
    clips = chat_check.training_clips(world, 5)
    assert len(clips) == min(5, len(asked)) and len({(v, s) for v, s, _, _ in clips}) == len(clips)
    heldout = set(json.loads((world / "world.json").read_text())["splits"]["heldout"])
    for video, start, end, answer in clips:
        rel = str(video.relative_to(world))
        assert video.is_file() and end > start and asked[(rel, start)] == answer
        assert not any(take in rel for take in heldout)  # never a held-out take
    assert chat_check.training_clips(world, 0) == []
    with pytest.raises(ValueError, match="clips='test'"):
        chat_check.check(world, world, clips="test")


def test_pretrain_lm_packs_documents_exactly():
    rows = pretrain_lm.pack([[5, 6], [7], [8, 9, 10]], seq_len=4, bos=1, eos=2)
    # <s> 5 6 </s> <s> 7 </s> <s> 8 9 10 </s>: 13 tokens -> 3 rows of 4, the tail dropped.
    np.testing.assert_array_equal(rows, [[1, 5, 6, 2], [1, 7, 2, 1], [8, 9, 10, 2]])
    with pytest.raises(ValueError, match="need at least seq_len=64"):
        pretrain_lm.pack([[5]], seq_len=64, bos=1, eos=2)


def test_demo_lm_has_the_configured_shape_and_loads_into_the_stages(prepared, tmp_path):
    """``config.model.llm`` sizes the demo LM: pretrain_lm writes that shape and the stage
    model (its connector and F emit tokens of that width) loads it."""
    import dataclasses

    import jax

    from configs import stage0
    from exo2ego_jax import config_lib, runtime
    from exo2ego_jax.demo import runner
    from exo2ego_jax.models.exo2ego import Exo2Ego

    c = stage0.get_config("demo")
    c.data.tokenizer = str(prepared / "tokenizer")
    c.model.llm.update(hidden_size=48, intermediate_size=96, num_layers=3, num_heads=6)
    cfg = config_lib.build_model_config(c.model)
    assert (cfg.llm.hidden_size, cfg.llm.head_dim, cfg.llm.num_layers) == (48, 8, 3)
    assert cfg.llm.num_kv_heads == 2 and cfg.connector.out_size == 48  # kv heads: the preset's
    s = pretrain_lm.pretrain(
        prepared,
        tmp_path / "llm",
        config=dataclasses.replace(cfg.llm, lora=None),
        vocab_size=c.model.vocab_size,
        steps=30,
        progress=False,
    )
    # Uniform over the 1024-row table is log(1024) = 6.9 nats; 30 steps must cut it well down.
    assert s["first_loss"] > 6.0 and s["last_loss"] < 0.7 * s["first_loss"]
    hf_cfg = json.loads((tmp_path / "llm" / "config.json").read_text())
    assert (hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"], hf_cfg["num_attention_heads"]) == (
        48,
        3,
        6,
    )
    assert (tmp_path / "llm" / "tokenizer.json").is_file()

    def _zeros(shapes):
        return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)

    c.init.llm, c.init.clip = str(tmp_path / "llm"), ""
    model = Exo2Ego(cfg)
    params = _zeros(model.abstract_params())
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), params)
    placed = runtime.place_pretrained(params, shardings, runtime.read_pretrained(c.init))
    _, loaded = hf.load_mistral(tmp_path / "llm")
    np.testing.assert_array_equal(
        placed["llm"]["embed_tokens"]["embedding"], loaded["embed_tokens"]["embedding"]
    )
    runner.check_demo_lm(tmp_path / "llm", cfg.llm)  # the shape it was made at: accepted
    # A checkpoint of another shape is refused by name, not silently broadcast.
    c.model.llm.num_layers = 2
    with pytest.raises(ValueError, match=r"'num_layers': 3.*'num_layers': 2.*delete"):
        runner.check_demo_lm(tmp_path / "llm", config_lib.build_model_config(c.model).llm)
    small = Exo2Ego(config_lib.build_model_config(c.model))
    params = _zeros(small.abstract_params())
    with pytest.raises(ValueError, match="make config.model match the checkpoint"):
        runtime.place_pretrained(params, shardings, runtime.read_pretrained(c.init))


def test_chat_check_asks_in_the_prompt_stage3_trained_on(tmp_path):
    # Stage 3 formats every instruction with the pipeline's system prompt; EgoBench's
    # first-person cue is an evaluation-only addition that the check asks for explicitly.
    # The interactive chat (and the web chat, which uses its session) asks the same way.
    trained = PipelineOptions.system_prompt
    for first_person, cue in ((False, False), (True, True)):
        config = chat_check.check_config(tmp_path, tmp_path, first_person=first_person)
        asked = chat.chat_system_prompt(config)
        assert (asked == trained) is not cue
        assert (templates.FIRST_PERSON_CUE in asked) is cue
    assert chat.chat_system_prompt(get_eval_config("demo,chat")) == trained
    assert chat.chat_system_prompt(get_eval_config("paper,chat")) == trained
