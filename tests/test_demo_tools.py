"""The demo's stand-in pretrained CLIP (``tools.pretrain_clip``) and the held-out chat check
(``tools.chat_check``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exo2ego_jax.checkpoints import hf
from exo2ego_jax.models import clip as clip_lib
from exo2ego_jax.tools import chat_check, pretrain_clip


def test_pretrain_clip_learns_and_writes_a_loadable_hf_tower(prepared, tmp_path):
    cfg = clip_lib.tiny(image_size=32, patch_size=8)
    out = tmp_path / "clip"
    s = pretrain_clip.pretrain(
        prepared, out, config=cfg, steps=60, batch_size=8, lr=3e-3, progress=False
    )
    # The bag-of-words loss starts at ~V·log 2 (every word 50/50) and must fall far below.
    assert s["first_loss"] > 500 and s["last_loss"] < 0.1 * s["first_loss"]
    assert s["clips"] > 0 and 0.0 <= s["f1"] <= 1.0
    assert not list(tmp_path.glob(".clip.tmp-*"))  # written aside, then renamed
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
