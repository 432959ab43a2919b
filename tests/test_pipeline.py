"""Grain pipelines: batch formats, label masks against the templates, determinism, exact
resume (in-process and with a worker process), per-host slicing, bad videos, evaluation."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from input_pipeline import clip_cache, templates
from input_pipeline.datasets import open_dataset
from input_pipeline.pipeline import (
    NoReadableDataError,
    PipelineOptions,
    bench_items,
    make_pipeline,
    record_dataset,
)
from input_pipeline.tokenizer import load_tokenizer
from input_pipeline.video import VideoDecodeError, load_clip, normalize_frames

T, S, L, B = 4, 32, 96, 2
OPTS = PipelineOptions(
    batch_size=B, num_frames=T, image_size=S, max_text_len=L, shard_index=0, shard_count=1
)


@pytest.fixture(scope="session")
def tok(prepared):
    return load_tokenizer(prepared / "tokenizer")


def _take(kind, prepared, tok, n=None, **kw):
    """The first ``n`` batches (all when None) and the iterator's skip count."""
    it = iter(make_pipeline(kind, prepared, tok, OPTS, **kw))
    try:
        out = []
        for b in it:
            out.append(b)
            if n is not None and len(out) == n:
                break
        return out, it.num_skipped
    finally:
        it.close()


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "kind,dataset,frame_keys",
    [
        ("pair", None, ("ego_frames", "exo_frames")),
        ("ego_caption", None, ("frames",)),
        ("exo_caption", None, ("frames",)),
        ("exo_caption", "ego_exo_clip", ("frames",)),  # stage 1: exo side of Ego-ExoClip
        ("instruct", None, ("frames",)),
    ],
)
def test_training_batch_format(prepared, tok, kind, dataset, frame_keys):
    (batch,), _ = _take(kind, prepared, tok, 1, dataset=dataset)
    assert set(batch) == {*frame_keys, "input_ids", "labels", "attention_mask"}
    for k in frame_keys:
        assert batch[k].shape == (B, T, S, S, 3) and batch[k].dtype == np.float32
        assert -2.0 < batch[k].min() < 0.0 < batch[k].max() < 2.5  # CLIP-normalised
    for k in ("input_ids", "labels", "attention_mask"):
        assert batch[k].shape == (B, L) and batch[k].dtype == np.int32
    # BOS first and one <video> sentinel per row (captions: right after BOS)
    assert (batch["input_ids"][:, 0] == tok.bos_token_id).all()
    assert ((batch["input_ids"] == templates.VIDEO_TOKEN_INDEX).sum(1) == 1).all()
    if kind != "instruct":
        assert (batch["input_ids"][:, 1] == templates.VIDEO_TOKEN_INDEX).all()
    if kind == "pair":
        assert not np.array_equal(batch["ego_frames"], batch["exo_frames"])


def test_caption_example_token_by_token(prepared, tok):
    (batch,), _ = _take("pair", prepared, tok, 1, shuffle=False, num_epochs=1)
    source, meta = open_dataset("ego_exo_clip", prepared)
    rec = source[0]  # no shuffle, one host: row 0 is record 0
    text = _s(rec["text"])
    ref = templates.pad_batch([templates.encode_caption(tok, text, max_len=L)], L, tok.pad_token_id)
    for k in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[k][0], ref[k][0], err_msg=k)
    ids, labels, n = (
        batch["input_ids"][0],
        batch["labels"][0],
        int(batch["attention_mask"][0].sum()),
    )
    assert labels[0] == labels[1] == templates.IGNORE_INDEX  # BOS, <video>
    np.testing.assert_array_equal(labels[2:n], ids[2:n])  # caption + "\n" supervised
    assert (labels[n:] == templates.IGNORE_INDEX).all() and (ids[n:] == tok.pad_token_id).all()
    assert tok.decode(labels[2:n]) == text + "\n"
    # frames: the record's window of its ego and best exo videos
    root = Path(meta["source_root"])
    for key, rel in (
        ("ego_frames", rec["ego_video"]),
        ("exo_frames", rec["exo_videos"][int(rec["best_exo"])]),
    ):
        clip = load_clip(root / _s(rel), float(rec["start"]), float(rec["end"]), T, S)
        np.testing.assert_array_equal(batch[key][0], normalize_frames(clip))


def test_instruction_example_token_by_token(prepared, tok):
    (batch,), _ = _take("instruct", prepared, tok, 1, shuffle=False, num_epochs=1)
    source, _ = open_dataset("ego_it", prepared)
    c = source[0]["conversations"]
    convs = [{"from": _s(f), "value": _s(v)} for f, v in zip(c["from"], c["value"], strict=True)]
    enc = templates.encode_conversation(tok, convs, template="mistral", max_len=L)
    ref = templates.pad_batch([enc], L, tok.pad_token_id)
    for k in ("input_ids", "labels", "attention_mask"):
        np.testing.assert_array_equal(batch[k][0], ref[k][0], err_msg=k)
    sup = batch["labels"][0][batch["labels"][0] != templates.IGNORE_INDEX]
    answers = [m["value"] for m in convs if m["from"] == "gpt"]
    assert tok.decode(sup) == " ".join(f"{a} </s>" for a in answers)


# ----------------------------------------------------------------------------- order


def test_determinism_and_seed(prepared, tok):
    a, _ = _take("pair", prepared, tok, 3, seed=7)
    b, _ = _take("pair", prepared, tok, 3, seed=7)
    c, _ = _take("pair", prepared, tok, 3, seed=8)
    _assert_same(a, b)
    ids = lambda bs: np.concatenate([x["input_ids"] for x in bs])  # noqa: E731
    assert not np.array_equal(ids(a), ids(c))


def _record_ids(ds) -> list[str]:
    return [_s(ds[i]["id"]) for i in range(len(ds))]


def test_epochs_are_reshuffled_and_complete(prepared):
    ds, _, _ = record_dataset(
        "pair", prepared, PipelineOptions(num_epochs=2, seed=3, shard_count=1, shard_index=0)
    )
    ids = _record_ids(ds)
    half = len(ids) // 2
    assert sorted(ids[:half]) == sorted(ids[half:]) and len(set(ids[:half])) == half
    assert ids[:half] != ids[half:]


def test_host_slices_are_disjoint_and_cover(prepared, tok):
    def ids(index: int, count: int) -> list[str]:
        opts = PipelineOptions(num_epochs=1, shard_index=index, shard_count=count)
        return _record_ids(record_dataset("instruct", prepared, opts)[0])

    full, (a, b) = ids(0, 1), (ids(0, 2), ids(1, 2))
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == sorted(full) and len(set(full)) == len(full)

    # The same through the whole pipeline: the captions of both hosts are all captions.
    def captions(**kw) -> list[str]:
        bs, _ = _take("ego_caption", prepared, tok, num_epochs=1, drop_remainder=False, **kw)
        return [tok.decode(r[r != templates.IGNORE_INDEX]) for x in bs for r in x["labels"]]

    halves = [captions(shard_index=i, shard_count=2) for i in range(2)]
    assert halves[0] and halves[1]
    assert sorted(halves[0] + halves[1]) == sorted(captions())


# ----------------------------------------------------------------------------- resume


def _resume_check(prepared, tok, tmp_path, workers: int, k: int = 2, m: int = 3):
    import grain
    from etils import epath

    ds = make_pipeline("pair", prepared, tok, OPTS, workers=workers, seed=5)
    it = iter(ds)
    try:
        for _ in range(k):
            next(it)
        state = it.get_state()
        handler = grain.checkpoint.CheckpointHandler()  # what Orbax calls for Grain iterators
        handler.save(epath.Path(tmp_path), it)
        expected = [next(it) for _ in range(m)]
    finally:
        it.close()
    assert json.loads(json.dumps(state)) == state

    fresh = iter(make_pipeline("pair", prepared, tok, OPTS, workers=workers, seed=5))
    try:
        handler.restore(epath.Path(tmp_path), fresh)
        resumed = [next(fresh) for _ in range(m)]
    finally:
        fresh.close()
    _assert_same(expected, resumed)


def test_resume_is_exact_in_process(prepared, tok, tmp_path):
    _resume_check(prepared, tok, tmp_path, workers=0)


def test_resume_is_exact_with_a_worker_process(prepared, tok, tmp_path):
    _resume_check(prepared, tok, tmp_path, workers=1)


# ----------------------------------------------------------------------------- bad videos


def _corrupt(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    else:  # truncated: the first half of the file
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("how", ["truncated", "missing", "empty"])
def test_bad_videos_skip_or_raise(world, prepared, tok, tmp_path, how):
    # A private copy of the exo videos, used through video_root; one of them is damaged.
    root = tmp_path / "root"
    shutil.copytree(world / "exo_web", root / "exo_web")
    source, _ = open_dataset("exo_clip_text", prepared)
    videos = [_s(source[i]["video"]) for i in range(len(source))]
    bad = videos[0]
    _corrupt(root / bad, how)
    n_bad = videos.count(bad)

    kw = dict(video_root=str(root), num_epochs=1, drop_remainder=False, shuffle=False)
    batches, skipped = _take("exo_caption", prepared, tok, **kw)
    assert skipped == n_bad
    assert sum(len(b["input_ids"]) for b in batches) == len(videos) - n_bad

    with pytest.raises(VideoDecodeError, match=Path(bad).name):
        _take("exo_caption", prepared, tok, on_bad_video="raise", **kw)


def test_bad_video_raises_across_the_worker_boundary(world, prepared, tok, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(world / "exo_web", root / "exo_web")
    source, _ = open_dataset("exo_clip_text", prepared)
    bad = _s(source[0]["video"])
    (root / bad).write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=Path(bad).name):
        _take(
            "exo_caption",
            prepared,
            tok,
            video_root=str(root),
            on_bad_video="raise",
            num_epochs=1,
            workers=1,
        )


def test_an_endless_stream_of_unreadable_videos_fails_fast(prepared, tok, tmp_path):
    """With every video unreadable, an endless (training) stream used to loop forever
    before yielding a batch; it now stops after ``max_consecutive_bad`` of them in a row,
    naming the dataset and the first bad files, and counts what it read."""
    it = iter(
        make_pipeline(
            "exo_caption", prepared, tok,
            PipelineOptions(batch_size=2, num_epochs=None, video_root=str(tmp_path),
                            max_consecutive_bad=40),
        )
    )  # fmt: skip
    t = time.time()
    with pytest.raises(NoReadableDataError) as err:
        next(it)
    assert time.time() - t < 60
    message = str(err.value)
    assert message.startswith("dataset 'exo_clip_text': 40 examples in a row could not be read")
    assert ".mp4" in message and "Check the video paths" in message
    # A stream with some readable examples counts what it read and skipped, per batch.
    it = iter(make_pipeline("exo_caption", prepared, tok, PipelineOptions(batch_size=2)))
    next(it)
    assert (it.num_read, it.num_skipped) == (2, 0)


# ----------------------------------------------------------------------------- evaluation


def test_eval_batches_cover_every_clip(prepared, tok):
    items = bench_items(prepared, "egomcq")
    batches, skipped = _take("eval", prepared, tok, split="egomcq")
    units = [
        (int(i), int(c))
        for b in batches
        for i, c, v in zip(b["item_index"], b["clip_index"], b["valid"], strict=True)
        if v
    ]
    assert sorted(units) == [(i, c) for i in range(len(items)) for c in range(5)]
    assert skipped == 0 and len(batches) == -(-len(units) // B)
    last = batches[-1]
    assert last["frames"].shape == (B, T, S, S, 3) and last["input_ids"].shape == (B, L)
    assert list(last["valid"]) == [True] * (len(units) % B or B) + [False] * (-len(units) % B)
    assert set(batches[0]["task"]) == {"egomcq"}
    assert batches[0]["item_id"][0] == items[0]["item_id"]
    prompt = templates.build_prompt(tok, items[0]["question"], max_len=L)
    n = len(prompt)
    np.testing.assert_array_equal(batches[0]["input_ids"][0, :n], prompt.input_ids)
    assert batches[0]["attention_mask"][0].sum() == n


def test_eval_mcq_prompt_lists_options(prepared, tok):
    (batch,), _ = _take(
        "eval", prepared, tok, 1, split="egoschema", eval_prompt="mcq", max_text_len=256
    )
    item = bench_items(prepared, "egoschema")[0]
    ids = batch["input_ids"][0]
    text = tok.decode(ids[(batch["attention_mask"][0] == 1) & (ids >= 0)])
    assert item["question"] in text and "(E) " + item["options"][4] in text
    assert len(item["answer_indices"]) == 1 and 0 <= item["answer_indices"][0] < 5


def test_tokenizer_directory_is_accepted(prepared, tok):
    a, _ = _take("instruct", prepared, tok, 1)
    b, _ = _take("instruct", prepared, str(prepared / "tokenizer"), 1)
    _assert_same(a, b)


# ----------------------------------------------------------------------------- clip cache


def test_clip_cache_gives_the_same_batches_and_decodes_each_clip_once(prepared, tok, monkeypatch):
    monkeypatch.setattr(clip_cache, "_PROCESS_CACHE", None)  # none from earlier tests
    kw = dict(num_epochs=2, drop_remainder=False)
    uncached, _ = _take("pair", prepared, tok, **kw)
    cached, _ = _take("pair", prepared, tok, clip_cache_mb=64, **kw)
    _assert_same(uncached, cached)  # frames bit for bit, both epochs

    source, _ = open_dataset("ego_exo_clip", prepared)
    records = [source[i] for i in range(len(source))]
    window = lambda r, video: (_s(video), float(r["start"]), float(r["end"]))  # noqa: E731
    ego = {window(r, r["ego_video"]) for r in records}
    exo = {window(r, r["exo_videos"][int(r["best_exo"])]) for r in records}
    # The world reuses videos across windows: a key without the window would be caught above.
    assert len({w[0] for w in ego}) < len(ego)
    # Counted by the cache (stray read threads of earlier tests' iterators do not use it):
    # every distinct clip decoded once, every other look-up of the 2 epochs served from memory.
    stats = clip_cache.current_cache().stats()
    assert stats["misses"] == len(ego | exo)
    assert stats["hits"] + stats["misses"] == 2 * 2 * len(records)  # ego + exo, every epoch


def test_clip_cache_evicts_least_recently_used_within_its_budget(tmp_path):
    clip = lambda v: np.full((2, 4, 4, 3), v, np.uint8)  # noqa: E731  96 bytes
    cache = clip_cache.ClipCache(max_bytes=3 * 96)
    for v in range(3):
        cache.get(v, lambda v=v: clip(v))
    cache.get(0, lambda: pytest.fail("clip 0 is cached"))  # 0 becomes the most recent
    cache.get(3, lambda: clip(3))  # evicts 1, the least recently used
    assert cache.stats() == dict(hits=1, misses=4, evictions=1, clips=3, bytes=3 * 96)
    reloaded = cache.get(1, lambda: clip(7))
    assert reloaded[0, 0, 0, 0] == 7 and not reloaded.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        reloaded[0] = 0
    # A file rewritten in place is a new key (size / mtime), a missing one has none.
    f = tmp_path / "v.mp4"
    f.write_bytes(b"abc")
    before = clip_cache.file_key(f)
    f.write_bytes(b"abcd")
    assert clip_cache.file_key(f) != before and clip_cache.file_key(tmp_path / "no.mp4") is None
    with pytest.raises(ValueError, match="clip_cache_mb must be >= 0"):
        PipelineOptions(clip_cache_mb=-1)


def test_clip_cache_decodes_a_clip_asked_for_by_several_threads_once():
    cache, loads = clip_cache.ClipCache(max_bytes=1024), []

    def slow_load():
        loads.append(1)
        time.sleep(0.2)  # the other threads arrive while this one decodes
        return np.ones((2, 4, 4, 3), np.uint8)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: cache.get("clip", slow_load), range(4)))
    assert len(loads) == 1 and all(g is got[0] for g in got)
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 3
    # A failed decode is not cached and does not block the next caller.
    with pytest.raises(OSError):
        cache.get("bad", lambda: (_ for _ in ()).throw(OSError("corrupt")))
    assert cache.get("bad", lambda: np.zeros((1,), np.uint8)).shape == (1,)


# ----------------------------------------------------------------------------- mixtures


def _rows(batches: list[dict]) -> list[dict]:
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def test_a_mixture_reads_every_record_of_each_part_by_its_own_rules(prepared, tok):
    """``ego_clip+ego_exo_clip``: unshuffled, the stream is the ego_clip captions followed by
    the ego halves of the pairs with their narrations, row for row as each part's own stream
    gives them; shuffled, one epoch visits every record of both once, interleaved."""
    kw = dict(shuffle=False, num_epochs=1, batch_size=1)
    ego, _ = _take("ego_caption", prepared, tok, dataset="ego_clip", **kw)
    pairs, _ = _take("ego_caption", prepared, tok, dataset="ego_exo_clip", **kw)
    mixed, _ = _take("ego_caption", prepared, tok, dataset="ego_clip+ego_exo_clip", **kw)
    assert len(ego) > 0 and len(pairs) > 0
    _assert_same(mixed, ego + pairs)
    # the pair records give their ego clip, not the exo one
    (pair,), _ = _take("pair", prepared, tok, 1, **kw)
    np.testing.assert_array_equal(pairs[0]["frames"][0], pair["ego_frames"][0])

    opts = PipelineOptions(num_epochs=1, seed=5, shard_count=1, shard_index=0)
    ds, name, roots = record_dataset("ego_caption", prepared, opts, dataset="ego_clip+ego_exo_clip")
    assert name == "ego_clip+ego_exo_clip" and len(roots) == 2
    order = [(part, _s(rec["id"])) for part, rec in (ds[i] for i in range(len(ds)))]
    want = [(0, _s(r["id"])) for r in open_dataset("ego_clip", prepared)[0]]
    want += [(1, _s(r["id"])) for r in open_dataset("ego_exo_clip", prepared)[0]]
    assert sorted(order) == sorted(want) and order != want  # complete, shuffled
    parts_seen = [p for p, _ in order]
    assert parts_seen != sorted(parts_seen)  # interleaved, not one part after the other


@pytest.mark.parametrize(
    "kind,dataset,message",
    [
        ("ego_caption", "ego_clip+ego_it", "reads"),
        ("ego_caption", "ego_clip+", "empty name"),
        ("ego_caption", "ego_clip+ego_clip", "twice"),
        ("eval", "ego_bench+ego_bench", "twice"),
    ],
)
def test_a_bad_mixture_is_refused_by_name(prepared, kind, dataset, message):
    with pytest.raises(ValueError, match=message):
        record_dataset(kind, prepared, OPTS, dataset=dataset, split="egoschema")
