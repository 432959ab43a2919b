"""Fixed fingerprints of the synthetic world, its rendered frames and the CLIP corpus.

The values were computed with the renderer as it was before it was optimised (commit
0e8f3a0): any speed-up of ``input_pipeline.synthetic`` must leave every byte of a world and
every array of a corpus unchanged. The world's files include H.264 streams, so their
fingerprints also depend on the libx264 inside PyAV (18.1.0 when they were computed); the
frame and corpus fingerprints depend on numpy only.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from input_pipeline import synthetic as sw

# generate_world(..., seed=0, **kwargs): sha256 over every (relative path, bytes), sorted.
WORLDS = {
    "tiny": (
        dict(num_takes=5, heldout_takes=2, size=64, fps=6),
        "a1053284eca23ff3579bd405034c89c90960d9fe114ee8ad47947eeb8554acc2",
    ),
    "default_size": (
        dict(num_takes=4),
        "487951a0d5f63f88d4abdb59e97f164e86a2b8b47b93598f17d3a6b14ad464ff",
    ),
}

# render_take / object_screen_positions of sample_take_spec(7, "pairs") at the default size.
FRAMES = {
    ("aria01", "ss2"): "c77c0d2f0b0dbdb6115f6f2dc56cef6010cc36eb0be56910ca26c2c777f92411",
    ("aria01", "ss1"): "1355e44f20dcfac01868b6677f515e26e26e4c198ae5ef469b4b6f577cc0a5c6",
    ("aria01", "xy"): "efa9202500e740f640b2b2e7b268c073db43e33a75c06cec87a0943269615ed1",
    ("cam01", "ss2"): "70f19c7fe99f411018262d7eb38a0d3695d9500a1d53e963127cc82b8ec52f7e",
    ("cam01", "ss1"): "4a84b17b04b09a664e2419da3665dce022dc4d1639cb9b8d63f2734172693a05",
    ("cam01", "xy"): "7c354819ec1229ebba46cedc7d3733d3425333537ef213f35aba3f8bcfd1d276",
    ("cam02", "ss2"): "f4a5658a3a6fd8529a78cbf06637c1d082b4ef4abecca57bd4cf1330f7402afc",
    ("cam02", "ss1"): "82fd08c01dadc8db59366f2124232358b0dbb423536c62dd7859cc9d9634021a",
    ("cam02", "xy"): "6065cf2dc6c1cc8355188088496f6b8ece9b23a7c36a9b1892410253d0a69147",
}
_SS1_INDICES = [0, 3, 4, 5, 20, 21]

# render_corpus(num_takes, seed, **kwargs): sha256 of every array (dtype, shape, bytes), views.
CORPORA = {
    "default": (
        dict(num_takes=3, seed=0),
        "fcc320d25e466e157e00f182205ff6f918fbcdaf8122fd176a8e08d395b2f6fb",
    ),
    "small_exo": (
        dict(num_takes=2, seed=3, image_size=32, size=64, views=("exo",), frames_per_clip=4),
        "cc656ac0116d77b0df22f82e73e767b2c53903518c696985e46828afac3d883d",
    ),
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def world_fingerprint(root: Path) -> str:
    """sha256 over every file of a world directory: relative path then bytes, sorted."""
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def corpus_fingerprint(c: sw.Corpus) -> str:
    """sha256 over a corpus's arrays (dtype, shape and bytes of each) and its views."""
    h = hashlib.sha256()
    for a in (c.frames, c.labels, c.takes, c.object_xy, c.object_labels, c.acted):
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("|".join(c.views).encode())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_world_files_match_the_fingerprint(name, tmp_path):
    kwargs, expected = WORLDS[name]
    root = sw.generate_world(tmp_path / name, seed=0, workers=1, progress=False, **kwargs)
    assert world_fingerprint(root) == expected


def test_rendered_frames_match_the_fingerprint():
    spec = sw.sample_take_spec(7, "pairs")
    tl = sw.simulate(spec)
    got = {}
    for cam in ("aria01", "cam01", "cam02"):
        got[cam, "ss2"] = _sha(sw.render_take(spec, cam, timeline=tl))
        frames = sw.render_take(spec, cam, ss=1, timeline=tl, indices=_SS1_INDICES)
        got[cam, "ss1"] = _sha(frames)
        got[cam, "xy"] = _sha(sw.object_screen_positions(spec, cam, timeline=tl))
    assert got == FRAMES


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_matches_the_fingerprint(name):
    kwargs, expected = CORPORA[name]
    corpus = sw.render_corpus(workers=1, progress=False, **kwargs)
    assert corpus_fingerprint(corpus) == expected
