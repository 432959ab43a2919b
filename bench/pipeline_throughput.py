"""Input-pipeline throughput: stage-2 paired batches per second by worker processes, and the
storage decision (records of paths + windows vs records of decoded frames).

Demo size: batch 4, 8 frames, 64 x 64 px, text length 128 (``PipelineOptions`` defaults),
on the demo world's 128 px, 8 fps H.264 videos.

* throughput: ``make_pipeline("pair", ...)`` repeating forever, with 0 (in-process), 1 and 2
  ``mp_prefetch`` worker processes (2 read threads each); the first batch (worker start-up)
  is timed apart from the next ``--batches``;
* storage: every ``ego_exo_clip`` record read and decoded to the two float32 clips, once
  from the prepared dataset (paths + windows; ``load_clip`` x 2) and once from an ArrayRecord
  of the same records holding the decoded uint8 frames (TFDS serialisation); disk sizes.

    python bench/pipeline_throughput.py [--world W] [--data D] [--takes 16] [--reps 3] [--no-write]

Without ``--world`` a ``--takes``-take demo world is generated in a temporary directory;
without ``--data`` it is prepared there too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- pipeline_throughput:start -->", "<!-- pipeline_throughput:end -->"
BATCH, FRAMES, SIZE, TEXT = 4, 8, 64, 128


def _dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def throughput(data: Path, tok, workers: int, batches: int, read_threads: int = 2) -> dict:
    from input_pipeline.pipeline import make_pipeline

    ds = make_pipeline(
        "pair",
        data,
        tok,
        batch_size=BATCH,
        num_frames=FRAMES,
        image_size=SIZE,
        max_text_len=TEXT,
        workers=workers,
        read_threads=read_threads,
        shard_index=0,
        shard_count=1,
    )
    it = iter(ds)
    try:
        t0 = time.perf_counter()
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        it.close()
    return {
        "workers": workers,
        "threads": read_threads,
        "first_s": first,
        "batches_per_s": batches / dt,
        "examples_per_s": batches * BATCH / dt,
    }


def _median(runs: list[dict]) -> dict:
    """Per-metric medians of repeated runs of one setting."""
    out = dict(runs[0])
    for key in ("first_s", "batches_per_s", "examples_per_s"):
        out[key] = statistics.median(r[key] for r in runs)
    out["all"] = [round(r["batches_per_s"], 2) for r in runs]
    return out


def storage(data: Path, tmp: Path, reps: int, min_records: int = 64) -> list[dict]:
    """Read + decode rate (median of ``reps`` alternating runs) and size on disk of the
    ``ego_exo_clip`` records: paths + windows vs decoded frames."""
    import numpy as np
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from input_pipeline.datasets import open_dataset
    from input_pipeline.video import load_clip, normalize_frames

    source, meta = open_dataset("ego_exo_clip", data)
    root = Path(meta["source_root"])
    n = len(source)
    passes = -(-min_records // n)

    def clip(rel, r):
        return load_clip(root / rel.decode(), float(r["start"]), float(r["end"]), FRAMES, SIZE)

    # The same records holding decoded frames, as raw bytes (TFDS would otherwise store
    # uint8 tensors as varint int64 lists).
    frame = tfds.features.Tensor(
        shape=(FRAMES, SIZE, SIZE, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
    )
    features = tfds.features.FeaturesDict(
        {"ego_frames": frame, "exo_frames": frame, "text": tfds.features.Text()}
    )
    path = tmp / "frames.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")  # what TFDS uses
    frames_payload = 0
    for i in range(n):
        r = source[i]
        ex = {
            "ego_frames": clip(r["ego_video"], r),
            "exo_frames": clip(r["exo_videos"][int(r["best_exo"])], r),
            "text": r["text"],
        }
        record = features.serialize_example(ex)
        frames_payload += len(record)
        writer.write(record)
    writer.close()
    reader = ArrayRecordReader(str(path))

    def read_paths():
        for i in range(n):
            r = source[i]
            normalize_frames(clip(r["ego_video"], r))
            normalize_frames(clip(r["exo_videos"][int(r["best_exo"])], r))

    def read_frames():
        for i in range(n):
            ex = features.deserialize_example_np(reader.read([i])[0])
            normalize_frames(ex["ego_frames"])
            normalize_frames(ex["exo_frames"])

    rates = {read_paths: [], read_frames: []}
    for _ in range(reps):
        for fn, out in rates.items():
            t0 = time.perf_counter()
            for _ in range(passes):
                fn()
            out.append(passes * n / (time.perf_counter() - t0))
    reader.close()

    videos = {source[i]["ego_video"] for i in range(n)}
    videos |= {v for i in range(n) for v in source[i]["exo_videos"]}
    return [
        {
            "what": "paths + windows (chosen)",
            "rate": statistics.median(rates[read_paths]),
            "disk": _dir_bytes(Path(source.dataset_info.data_dir), "*.array_record*"),
            "n": n,
            "payload": source.dataset_info.splits["train"].num_bytes,
            "extra": sum((root / v.decode()).stat().st_size for v in videos),
        },
        {
            "what": "decoded uint8 frames",
            "rate": statistics.median(rates[read_frames]),
            "disk": path.stat().st_size,
            "n": n,
            "payload": frames_payload,
            "extra": 0,
        },
    ]


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB"


def report(
    rows: list[dict], store: list[dict], n_pairs: int, load: tuple[float, float], reps: int
) -> str:
    paper = 1_100_000 * 2 * 16 * 336 * 336 * 3  # Ego-ExoClip pairs x 2 clips, uint8
    per_rec = store[1]["payload"] / store[1]["n"]
    lines = [
        "## Input pipeline: stage-2 pair batches (Grain)",
        "",
        f"`python bench/pipeline_throughput.py` — batch {BATCH}, {FRAMES} frames, {SIZE}x{SIZE} "
        f"px, text length {TEXT}; demo videos 128 px, 8 fps H.264 (yuv444p); {n_pairs} "
        f"Ego-ExoClip records repeated forever. {os.cpu_count()} CPUs, shared; load average "
        f"{load[0]:.1f} -> {load[1]:.1f}. Each worker process decodes with 2 read threads. "
        f"Medians of {reps} runs per setting (settings alternating); every run times its first "
        "batch (worker start-up) apart from the next batches.",
        "",
        "| worker processes | pair batches/s | examples/s | first batch (s) | runs (batches/s) |",
        "|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        name = f"{r['workers']}" + (" (0 read threads)" if r["threads"] == 0 else "")
        lines.append(
            f"| {name} | {r['batches_per_s']:.2f} | {r['examples_per_s']:.1f} | "
            f"{r['first_s']:.2f} | {', '.join(map(str, r['all']))} |"
        )
    lines += [
        "",
        "### Storage: what an `ego_exo_clip` record holds",
        "",
        "Every record read and decoded to its two float32 clips (8 x 64 x 64) in one thread, "
        f"{store[0]['n']} records, median of {reps} runs:",
        "",
        "| records hold | records/s (read + decode) | ArrayRecord file | serialized record |",
        "|---|---:|---:|---:|",
    ]
    for s in store:
        lines.append(
            f"| {s['what']} | {s['rate']:.1f} | {_mb(s['disk'])} | "
            f"{s['payload'] / s['n'] / 1e3:.2f} kB |"
        )
    lines += [
        "",
        "(TFDS writes ArrayRecord with `group_size:1` and the library's default compression, "
        "which shrinks the flat-coloured demo frames; tiny files are padded to a block.) "
        f"Paths + windows also need the videos they point to ({_mb(store[0]['extra'])} for these "
        f"records' takes, shared by every window and every T / S). Decoded frames fix T and S "
        f"at build time and grow with them: {per_rec / 1e3:.0f} kB per record here; at the paper's "
        f"16 x 336 x 336 frames the 1.1M Ego-ExoClip pairs would need {paper / 1e12:.0f} TB "
        "(uint8, uncompressed).",
    ]
    return "\n".join(lines)


def write_section(table: str) -> None:
    block = f"{START}\n{table}\n{END}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + f"\n\n{block}\n"
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, help="demo world (default: generate one)")
    parser.add_argument("--data", type=Path, help="prepared datasets (default: prepare)")
    parser.add_argument("--takes", type=int, default=16, help="takes of a generated world")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
    parser.add_argument("--reps", type=int, default=3, help="runs per setting (median)")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)

    import tensorflow_datasets as tfds

    from input_pipeline.prepare import prepare
    from input_pipeline.synthetic import generate_world
    from input_pipeline.tokenizer import load_tokenizer

    tfds.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
    try:
        world = args.world
        if world is None:
            world = generate_world(tmp / "world", seed=0, num_takes=args.takes, progress=False)
        data = args.data or tmp / "prepared"
        prepare(world, data, progress=False)
        tok = load_tokenizer(data / "tokenizer")
        load0 = os.getloadavg()[0]
        settings = [(0, 0)] + [(int(w), 2) for w in args.workers.split(",")]
        runs = {s: [] for s in settings}
        for _ in range(args.reps):  # settings alternate, so load changes hit all of them
            for workers, threads in settings:
                runs[workers, threads].append(
                    throughput(data, tok, workers, args.batches, read_threads=threads)
                )
                print(runs[workers, threads][-1], flush=True)
        rows = [_median(r) for r in runs.values()]
        store = storage(data, tmp, args.reps)
        load1 = os.getloadavg()[0]
        from input_pipeline.datasets import open_dataset

        n_pairs = len(open_dataset("ego_exo_clip", data)[0])
        table = report(rows, store, n_pairs, (load0, load1), args.reps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table)
    if not args.no_write:
        write_section(table)


if __name__ == "__main__":
    sys.exit(main())
