"""``python -m input_pipeline.synthetic --out DIR --seed S [--takes N]``: write a world.

The study regime: ``--transfer-colors purple --transfer-shapes knife --val-takes 6``
(``docs/data.md``, "Transfer concepts")."""

from __future__ import annotations

import argparse
import sys

from input_pipeline.synthetic.concepts import StudyRegime
from input_pipeline.synthetic.rendering import DEFAULT_CRF
from input_pipeline.synthetic.sampling import DEFAULT_NUM_TAKES
from input_pipeline.synthetic.takes import DEFAULT_FPS, DEFAULT_SIZE
from input_pipeline.synthetic.world import generate_world

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the command line) and generate the world; returns the exit
    status (2, with the reason on stderr, when the output directory or sizes are refused)."""
    a = _parser().parse_args(argv)
    try:
        generate_world(
            a.out,
            a.seed,
            a.takes,
            pair_takes=a.pair_takes,
            ego_takes=a.ego_takes,
            exo_takes=a.exo_takes,
            heldout_takes=a.heldout_takes,
            study=StudyRegime(
                transfer_colors=tuple(a.transfer_colors),
                transfer_shapes=tuple(a.transfer_shapes),
                val_takes=a.val_takes,
                transfer_heldout_fraction=a.transfer_heldout_fraction,
            ),
            fps=a.fps,
            size=a.size,
            crf=a.crf,
            workers=a.workers,
            overwrite=a.overwrite,
            progress=not a.quiet,
        )
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m input_pipeline.synthetic",
        description="Generate the synthetic tabletop demo world (videos + annotations).",
    )
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--takes",
        type=int,
        default=DEFAULT_NUM_TAKES,
        help="total number of takes, split 25/10/50/15%% into pair/ego/exo/held-out",
    )
    p.add_argument("--pair-takes", type=int)
    p.add_argument("--ego-takes", type=int)
    p.add_argument("--exo-takes", type=int)
    p.add_argument("--heldout-takes", type=int)
    _add_study_flags(p)
    p.add_argument("--fps", type=int, default=DEFAULT_FPS)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="frame side in pixels")
    p.add_argument("--crf", type=int, default=DEFAULT_CRF, help="x264 quality (lower = better)")
    p.add_argument("--workers", type=int, help="render processes (default: up to 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world")
    p.add_argument("--quiet", action="store_true")
    return p


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    """The study regime's flags (transfer concepts and validation takes)."""
    p.add_argument(
        "--transfer-colors",
        nargs="+",
        default=[],
        metavar="COLOR",
        help="colours that never occur in pair / ego takes (exo only; held-out 'transfer')",
    )
    p.add_argument(
        "--transfer-shapes",
        nargs="+",
        default=[],
        metavar="SHAPE",
        help="shapes that never occur in pair / ego takes (exo only; held-out 'transfer')",
    )
    p.add_argument(
        "--val-takes",
        type=int,
        default=0,
        help="extra held-out takes for tuning, EgoBench files under egobench_val/",
    )
    p.add_argument(
        "--transfer-heldout-fraction",
        type=float,
        default=0.5,
        help="fraction of held-out (and val) takes that act on a transfer concept",
    )
