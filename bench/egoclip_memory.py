"""Peak memory of reading EgoClip: the ``ego_clip`` reader streams ``egoclip.csv`` row by row.

Writes (once) a data root holding an ``egoclip/egoclip.csv`` of ``--rows`` rows in EgoVLP's
format (3,000 videos, EgoClip-like rows) and an empty placeholder per video, then, in a
fresh process, streams every row through the builder's reader (``EgoClip._records``, with
the repeated-id check the build adds) and prints the rows, the time and the peak memory
(maximum resident set size; with ``--trace`` also the peak traced by ``tracemalloc``).

    python bench/egoclip_memory.py --root /tmp/egoclip_4m --rows 4000000 [--trace]

The whole build of that root: ``/usr/bin/time -v python -m input_pipeline.prepare --world
/tmp/egoclip_4m --out /tmp/egoclip_4m_out --datasets ego_clip --no-tokenizer --quiet``.
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

HEADER = (
    "clip_idx\tvideo_uid\tvideo_dur\tnarration_source\tnarration_ind\tnarration_time\t"
    "clip_start\tclip_end\tclip_text\ttag_verb\ttag_noun\n"
)
VERBS = ["picks", "puts", "cuts", "opens", "closes", "stirs", "holds", "moves", "washes"]
NOUNS = ["the knife", "a bag of clothes from the floor", "the onion on the board", "the door",
         "the pot with the spoon", "the cup", "a piece of dough", "the bicycle wheel"]  # fmt: skip


def write_root(root: Path, rows: int, videos: int = 3000) -> None:
    """An EgoClip data root of ``rows`` rows over ``videos`` videos (seeded)."""
    rng = random.Random(0)
    uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(videos)]
    (root / "egoclip/videos").mkdir(parents=True, exist_ok=True)
    for u in uids:
        (root / f"egoclip/videos/{u}.mp4").touch()
    with open(root / "egoclip/egoclip.csv", "w") as f:
        f.write(HEADER)
        for i in range(rows):
            t = (i % 1300) * 1.7 + rng.random()
            f.write(
                f"{i}\t{uids[i * videos // rows]}\t2400.5\tnarration_pass_1\t{i % 1300}\t"
                f"{t:.4f}\t{t - 0.38:.6f}\t{t + 0.38:.6f}\t"
                f"#C C {rng.choice(VERBS)} {rng.choice(NOUNS)}\t[{rng.randrange(118)}]\t"
                f"[{rng.randrange(582)}, {rng.randrange(582)}]\n"
            )


def read_all(root: Path, trace: bool) -> None:
    """Stream every row through the reader; print rows, seconds and peak memory."""
    from input_pipeline.datasets import BuildOptions  # noqa: PLC0415 (in the fresh process)
    from input_pipeline.datasets.common import _KeySet  # noqa: PLC0415
    from input_pipeline.datasets.ego_clip import EgoClip  # noqa: PLC0415
    from input_pipeline.datasets.report import BuildReport  # noqa: PLC0415

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    builder = EgoClip(data_dir=root / "unused", options=BuildOptions())
    report = BuildReport("ego_clip", "train", "egoclip/egoclip.csv")
    keys = _KeySet()
    if trace:
        tracemalloc.start()
    t0 = time.time()
    kept = sum(keys.add(key) for key, _ in builder._records(root, report))
    seconds = time.time() - t0
    traced = (
        f", tracemalloc peak {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MB" if trace else ""
    )
    size = (root / "egoclip/egoclip.csv").stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{report.read} rows ({size:.0f} MB file), {kept} kept, {report.skipped} skipped, "
        f"{seconds:.0f} s; max RSS {peak:.0f} MB ({imported:.0f} MB after the imports){traced}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--trace", action="store_true", help="also trace Python allocations (slow)")
    p.add_argument("--read", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args()
    if a.read:
        read_all(a.root, a.trace)
        return
    if not (a.root / "egoclip/egoclip.csv").is_file():
        write_root(a.root, a.rows)
    cmd = [sys.executable, __file__, "--root", str(a.root), "--read"] + ["--trace"] * a.trace
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
