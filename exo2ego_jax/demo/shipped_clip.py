r"""The demo's stand-in CLIP tower, shipped with the package so the demo need not pretrain it.

Pretraining the stand-in CLIP is the demo's longest phase (rendering a 1,200-take labelled
corpus, then 8,000 steps: ~30 min on 2 CPU cores) and it gives the same tower every time,
so the package carries the result, made by the project's own command::

    python -m exo2ego_jax.demo.pretrain_clip --out <dir>

``assets/clip/`` holds its ``config.json`` and ``model.safetensors`` and a
``manifest.json``: the command, the files' sha256, the machine it ran on (JAX version, CPU
threads: XLA:CPU's float reductions follow its thread pool, so the bytes are reproducible
on the same JAX with the same number of threads, not across thread counts) and a small-size
run of the same command, which ``tests/test_shipped_clip.py`` repeats: its first and last
loss, which any machine reproduces to 0.01, and its hash with the machine it was made on
(CPU model and vector extensions too: XLA:CPU compiles for the host's, and on one AMD EPYC
five ``--xla_cpu_max_isa`` levels gave four different byte outputs with the same losses).

``python main.py --demo`` copies the shipped tower when the demo asks for exactly what the
command makes (the tower shape, seed 0, the default corpus and steps) and pretrains it
otherwise, or with ``--pretrain_clip``.

A second tower, pretrained on third-person (exo) views only as web CLIP is (``--views exo``),
is shipped in ``assets/clip_exo/`` for the study's regime (docs/study.md); every function
takes the corpus ``views`` of the tower it is about. Rebuild or check one:

    python -m exo2ego_jax.demo.shipped_clip build [--views exo]            # rerun, rewrite
    python -m exo2ego_jax.demo.shipped_clip verify [--small] [--views exo]  # compare bytes
    python -m exo2ego_jax.demo.shipped_clip small-check [--views exo]      # record it here
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax

from exo2ego_jax.demo import pretrain_clip
from exo2ego_jax.models.clip import CLIPVisionConfig
from input_pipeline import atomic

ASSET_DIR = Path(__file__).parent / "assets" / "clip"
FILES = ("config.json", "model.safetensors")
#: The command's arguments besides ``--out`` (its defaults: 1,200 takes, 8,000 steps, seed 0).
FULL_ARGS: tuple[str, ...] = ()
#: The small-size run of the same command that the manifest and the test record.
SMALL_ARGS = ("--takes", "4", "--steps", "20")
COMMAND = "python -m exo2ego_jax.demo.pretrain_clip --out <dir>"
#: The corpus views of the demo's tower (the command's default) and of the exo-only one.
DEFAULT_VIEWS = ("ego", "exo")
EXO_VIEWS = ("exo",)
_ASSET_DIRS = {DEFAULT_VIEWS: ASSET_DIR, EXO_VIEWS: ASSET_DIR.parent / "clip_exo"}


def assets_for(views: tuple[str, ...] = DEFAULT_VIEWS) -> Path:
    """Where the tower pretrained on ``views`` is shipped."""
    key = tuple(sorted(views))
    for known, path in _ASSET_DIRS.items():
        if tuple(sorted(known)) == key:
            return path
    raise ValueError(
        f"no shipped CLIP tower for views {views}; shipped: {[list(v) for v in _ASSET_DIRS]}"
    )


def command_args(views: tuple[str, ...] = DEFAULT_VIEWS, small: bool = False) -> tuple[str, ...]:
    """The pretraining command's arguments besides ``--out`` for the tower of ``views``."""
    extra = () if tuple(sorted(views)) == tuple(sorted(DEFAULT_VIEWS)) else ("--views", *views)
    return (*(SMALL_ARGS if small else FULL_ARGS), *extra)


class ShippedClipError(RuntimeError):
    """The shipped tower is missing or its bytes differ from its manifest."""


def cpu_threads() -> int:
    """The CPUs this process may run on (the size of XLA:CPU's thread pool)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest(asset_dir: Path = ASSET_DIR) -> dict[str, Any]:
    """The shipped tower's ``manifest.json``."""
    path = Path(asset_dir) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ShippedClipError(
            f"{path}: the shipped demo CLIP's manifest is missing or unreadable ({e}); "
            "reinstall the package or run `python -m exo2ego_jax.demo.shipped_clip build`"
        ) from e


def matches(config: CLIPVisionConfig, asset_dir: Path = ASSET_DIR) -> bool:
    """Whether the shipped tower has the shape ``config`` asks for (the runner also checks
    that the seed, corpus size and steps are the command's defaults)."""
    path = Path(asset_dir) / "config.json"
    if not (path.exists() and (Path(asset_dir) / "manifest.json").exists()):
        return False
    shipped = json.loads(path.read_text())
    wanted = config.to_hf_config()
    return {k: v for k, v in shipped.items() if k != "dtype"} == {
        k: v for k, v in wanted.items() if k != "dtype"
    }


def install(out_dir: str | os.PathLike, asset_dir: Path = ASSET_DIR) -> dict[str, Any]:
    """Copies the shipped tower to ``out_dir`` (atomically) after checking every file's
    sha256 against the manifest; returns the manifest."""
    info = manifest(asset_dir)
    for name in FILES:
        got = sha256(Path(asset_dir) / name) if (Path(asset_dir) / name).exists() else None
        if got != info["sha256"][name]:
            raise ShippedClipError(
                f"{Path(asset_dir) / name}: sha256 {got} differs from its manifest's "
                f"{info['sha256'][name]}; reinstall the package, or pass --pretrain_clip to "
                "pretrain the demo CLIP instead"
            )
    with atomic.staged_dir(out_dir) as stage:
        for name in FILES:
            shutil.copyfile(Path(asset_dir) / name, stage / name)
    return info


def cpu_signature() -> str:
    """The CPU model and its vector extensions (XLA:CPU compiles for the host's)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()

    def field(name: str) -> str:
        return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(name)), "")

    isa = sorted(f for f in field("flags").split() if f.startswith(("avx", "amx", "fma")))
    return f"{field('model name') or platform.machine()} [{' '.join(isa)}]"


def this_machine() -> dict[str, Any]:
    """What the bytes of a run depend on besides the command."""
    return {"jax": jax.__version__, "cpu_threads": cpu_threads(), "cpu": cpu_signature()}


def machine_differences(recorded: dict[str, Any]) -> list[str]:
    """How this machine differs from a ``recorded`` :func:`this_machine` (empty: the same
    machine, so the same bytes), one ``"<what> <recorded> here <this>"`` each."""
    return [
        f"{key} {recorded.get(key, 'unrecorded')} here {value}"
        for key, value in this_machine().items()
        if recorded.get(key) != value
    ]


_LOSS_LINE = re.compile(r"demo CLIP: loss (\d+\.\d+) -> (\d+\.\d+)")


def parse_losses(output: str) -> list[float]:
    """``[first, last]`` loss of the pretraining command's summary line in ``output``."""
    m = _LOSS_LINE.search(output)
    if not m:
        raise ShippedClipError("the pretraining command printed no 'demo CLIP: loss' line")
    return [float(m.group(1)), float(m.group(2))]


def run_command(out_dir: Path, args: tuple[str, ...]) -> tuple[dict[str, str], list[float]]:
    """Runs the pretraining command with ``args`` into ``out_dir``; the files' sha256 and
    the first and last loss."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = pretrain_clip.main([*args, "--out", str(out_dir)])
    if status != 0:
        raise ShippedClipError(f"the pretraining command failed: {COMMAND} {' '.join(args)}")
    hashes = {name: sha256(Path(out_dir) / name) for name in FILES}
    return hashes, parse_losses(printed.getvalue())


def small_check(views: tuple[str, ...] = DEFAULT_VIEWS) -> dict[str, Any]:
    """Runs the small-size command for the tower of ``views`` here: the manifest's
    ``small_check`` record."""
    args = command_args(views, small=True)
    with tempfile.TemporaryDirectory() as tmp:
        hashes, losses = run_command(Path(tmp) / "small", args)
    return {
        "command": " ".join([COMMAND, *args]),
        "loss": losses,
        "sha256": hashes,
        "machine": this_machine(),
    }


def refresh_small_check(views: tuple[str, ...] = DEFAULT_VIEWS) -> dict[str, Any]:
    """Reruns the small-size command on this machine and rewrites only the manifest's
    ``small_check`` (the shipped tower and its record stay as built); returns the manifest."""
    asset_dir = assets_for(views)
    info = manifest(asset_dir)
    info["small_check"] = small_check(views)
    atomic.write_text(asset_dir / "manifest.json", json.dumps(info, indent=2) + "\n")
    return info


def build(
    asset_dir: Path | None = None,
    from_dir: Path | None = None,
    views: tuple[str, ...] = DEFAULT_VIEWS,
) -> dict[str, Any]:
    """Runs the command for the tower of ``views`` at full size (or takes its output from
    ``from_dir``, made by the same command on this machine) and at the small size, and
    writes the tower and its manifest to ``asset_dir`` (default: its shipped place);
    returns the manifest."""
    asset_dir = Path(asset_dir) if asset_dir else assets_for(views)
    full_args = command_args(views)
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(from_dir) if from_dir else Path(tmp) / "full"
        full_hashes = (
            {name: sha256(full / name) for name in FILES}
            if from_dir
            else run_command(full, full_args)[0]
        )
        what = "" if tuple(views) == DEFAULT_VIEWS else f", corpus views {list(views)}"
        info = {
            "what": f"the demo's stand-in CLIP tower (exo2ego_jax.demo.shipped_clip{what})",
            "command": " ".join([COMMAND, *full_args]),
            "sha256": full_hashes,
            "small_check": small_check(views),
            "built_with": {**this_machine(), "python": sys.version.split()[0]},
        }
        with atomic.staged_dir(asset_dir) as stage:
            for name in FILES:
                shutil.copyfile(full / name, stage / name)
            (stage / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def verify(small: bool, views: tuple[str, ...] = DEFAULT_VIEWS) -> list[str]:
    """Reruns the command for the tower of ``views`` (full or small size) and compares its
    files' sha256 with the manifest's; returns the differing file names (empty: bit-exact)."""
    info = manifest(assets_for(views))
    want = info["small_check"]["sha256"] if small else info["sha256"]
    with tempfile.TemporaryDirectory() as tmp:
        got, _ = run_command(Path(tmp) / "tower", command_args(views, small))
    return [name for name in FILES if got[name] != want[name]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.demo.shipped_clip", description=__doc__.split("\n\n")[0]
    )
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="rerun the pretraining command and rewrite the assets")
    b.add_argument("--from", dest="from_dir", help="a tower the same command already made")
    v = sub.add_parser("verify", help="rerun the command and compare its bytes")
    v.add_argument("--small", action="store_true", help="the small-size run (~30 s)")
    c = sub.add_parser(
        "small-check", help="rerun the small-size command here and rewrite only its record"
    )
    for sp in (b, v, c):
        sp.add_argument(
            "--views",
            nargs="+",
            default=list(DEFAULT_VIEWS),
            choices=["ego", "exo"],
            help="the corpus views of the tower (exo: the study's third-person-only tower)",
        )
    a = p.parse_args(argv)
    views = tuple(a.views)
    if a.action == "build":
        info = build(from_dir=Path(a.from_dir) if a.from_dir else None, views=views)
        sha = info["sha256"]["model.safetensors"]
        print(f"wrote {assets_for(views)} (model.safetensors sha256 {sha})")
        return 0
    if a.action == "small-check":
        check = refresh_small_check(views)["small_check"]
        print(f"wrote the small check of {assets_for(views)}: loss {check['loss']}")
        return 0
    info = manifest(assets_for(views))
    differ = verify(a.small, views)
    if not differ:
        print("bit-exact: the command reproduces the shipped files")
        return 0
    made_on = info["small_check"]["machine"] if a.small else info["built_with"]
    changed = machine_differences(made_on)
    note = f" (made on another machine: {'; '.join(changed)})" if changed else ""
    print(f"differ: {', '.join(differ)}{note}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
