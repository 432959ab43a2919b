"""Web chat latency: time to first token and tokens/s of the web app's handler
(``exo2ego_jax.web.WebChat``) against the command-line chat (``ChatSession``) on the same
clip and question, and the app's start-up time with and without the persistent XLA
compilation cache.

* answers: one model load serves both paths. The web path is what the page runs: the upload
  decoded once (``load_upload``), then ``ask`` (the decode loop on the app's device thread,
  pieces handed over a queue). The command-line path is ``ChatSession.ask`` on the video file
  (decoded at every question, as ``main.py --config=configs/eval.py:chat`` does). After a
  warm-up, ``--rounds`` rounds alternate the two; medians. First piece = from the call to
  the first piece of text; decode tokens/s = single-token steps per second after the first
  token; end to end = answer tokens / whole call. Both must give the same greedy answer.
* start-up: a fresh process (``--startup_child``) imports the app, loads the model, compiles
  the decode programs (``WebChat.warm_up``) and brings the page up, without a persistent
  cache, with an empty one (cold: it fills it) and with the filled one (warm).

    python bench/web_latency.py [--workdir workdirs/demo --data_dir demo_data]
    python bench/web_latency.py --tiny [--rounds 5] [--no-write]

``--tiny`` builds a tiny random stage-3 model in a temporary directory (the tests' fixture,
``tests/eval_helpers.tiny_stage3``); otherwise the demo model of ``--workdir`` is used (after
``make demo``). The table is printed and written to bench/RESULTS.md (its ``web_latency``
section, replaced on a rerun).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout, and the tiny-model fixture

import jax  # noqa: E402
from results import write_section  # noqa: E402  (bench/results.py)

from configs import demo as demo_configs  # noqa: E402
from exo2ego_jax import chat, web  # noqa: E402

QUESTION = "What is C doing?"
CACHE_EVENTS = ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses")


def model_config(args):
    """The eval config of the model to serve (``--tiny``: under ``args.tiny_root``)."""
    if args.tiny_root:
        from eval_helpers import tiny_eval_config  # noqa: PLC0415  (tests/ only on --tiny)

        config = tiny_eval_config(Path(args.tiny_root))
        config.chat.max_new_tokens = 32
        return config
    if not (Path(args.workdir) / "stage3").is_dir():
        sys.exit(f"{args.workdir}/stage3: no demo model; run `make demo` first, or pass --tiny")
    return demo_configs.eval_config(args.workdir, args.data_dir, chat=True)


def clip_of(config) -> Path:
    """The first held-out EgoBench video of the world (what the browser test uploads)."""
    videos = sorted((Path(config.eval.data_root) / "egobench" / "videos").glob("*.mp4"))
    if not videos:
        sys.exit(f"{config.eval.data_root}/egobench/videos: no video to ask about")
    return videos[0]


# ----------------------------------------------------------------------------- answers


def web_round(app: web.WebChat, video: Path) -> dict:
    folder = app.upload_dir / secrets.token_hex(8)
    folder.mkdir()
    shutil.copy(video, folder / video.name)
    clip, message = app.load_upload(str(folder / video.name))
    assert clip is not None, message
    start = time.perf_counter()
    first = None
    for reply in app.ask(QUESTION, clip):
        first = first or (time.perf_counter() - start if reply.text else None)
    total = time.perf_counter() - start
    t = reply.stats
    return dict(
        text=reply.text, decode=clip.decode_s, first=first, total=total,
        tps=t.tokens_per_s, e2e=t.tokens / total, tokens=t.tokens,
    )  # fmt: skip


def cli_round(session: chat.ChatSession, video: Path) -> dict:
    t = chat.Timings()
    start = time.perf_counter()
    first = []

    def stream(piece: str) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    pieces = session.answer_pieces(video, QUESTION, timings=t)  # what ChatSession.ask runs
    text = chat.stream_pieces(pieces, stream)
    total = time.perf_counter() - start
    return dict(
        text=text, decode=t.video_s, first=first[0] if first else None, total=total,
        tps=t.tokens_per_s, e2e=t.tokens / total, tokens=t.tokens,
    )  # fmt: skip


def answers(config, rounds: int, tmp: Path) -> dict[str, list[dict]]:
    session = chat.ChatSession(config, log=lambda m: None)
    app = web.WebChat(session, upload_dir=tmp / "uploads")
    app.upload_dir.mkdir(parents=True, exist_ok=True)
    app.warm_up()
    video = clip_of(config)
    web_round(app, video)  # both paths warm
    cli_round(session, video)
    runs: dict[str, list[dict]] = {"web": [], "cli": []}
    for _ in range(rounds):
        runs["web"].append(web_round(app, video))
        runs["cli"].append(cli_round(session, video))
    texts = {r["text"] for rs in runs.values() for r in rs}
    if len(texts) != 1:
        raise AssertionError(f"the two paths answered differently: {texts}")
    return runs


# ----------------------------------------------------------------------------- start-up


def startup_child(args) -> None:
    """One start-up, timed in phases (wall-clock stamps); prints one JSON line."""
    gr = web.import_gradio()
    counts = dict.fromkeys(CACHE_EVENTS, 0)

    def count(event: str, **kwargs) -> None:
        if event in counts:
            counts[event] += 1

    jax.monitoring.register_event_listener(count)
    web.use_compilation_cache(args.cache)
    t1 = time.time()  # the parent subtracts its own stamp taken before starting this process
    config = model_config(args)
    uploads = Path(tempfile.mkdtemp(prefix="web_latency_uploads_"))
    app = web.WebChat.from_config(config, upload_dir=uploads, log=lambda m: None)
    t2 = time.time()
    app.warm_up()
    t3 = time.time()
    page = web.build_app(app)
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    web.launch(page, app, host="127.0.0.1", port=_free_port(), share=False, block=False)
    t4 = time.time()
    page.close()
    shutil.rmtree(uploads, ignore_errors=True)
    print(
        json.dumps(
            dict(
                imported=t1,
                load=t2 - t1,
                warm=t3 - t2,
                page=t4 - t3,
                ready=t4,
                hits=counts[CACHE_EVENTS[0]],
                misses=counts[CACHE_EVENTS[1]],
                gradio=gr.__version__,
            )  # fmt: skip
        ),
        flush=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(args, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--startup_child", f"--cache={cache}"]
    cmd += [f"--tiny_root={args.tiny_root}"] if args.tiny_root else []
    cmd += [f"--workdir={args.workdir}", f"--data_dir={args.data_dir}"]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"start-up child failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["imports"] = result["imported"] - start  # interpreter, jax, the app, gradio
    result["wall"] = result["ready"] - start  # command to serving
    return result


# ----------------------------------------------------------------------------- report


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(args, config, runs, starts, loads, conditions) -> str:
    m = config.model
    model = (
        f"tiny random stage-3 model (tests' fixture; {m.num_frames} frames of {m.image_size} px)"
        if args.tiny_root
        else f"demo stage-3 model `{args.workdir}`"
    )
    lines = [
        "## Web chat: the app's handler vs the command-line chat, and start-up",
        "",
        f"`python bench/web_latency.py{' --tiny' if args.tiny_root else ''}` — "
        f'{time.strftime("%Y-%m-%d")}, {model}; question "{QUESTION}" about the first '
        f"held-out EgoBench video, greedy, up to {config.chat.max_new_tokens} new tokens "
        f"({runs['web'][0]['tokens']} generated). {conditions}; load average "
        f"{loads[0]:.1f} -> {loads[1]:.1f}. Medians of {args.rounds} alternating rounds after "
        "warm-up. Same greedy answer on both paths in every round.",
        "",
        "| path | video decode (s) | first piece after the call (s) | decode tokens/s | "
        "end-to-end tokens/s | whole answer (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {
        "web": "web app handler (`WebChat.ask`; video decoded once on upload)",
        "cli": "command-line chat (`ChatSession.ask`; decodes the video per question)",
    }
    for key, rows in runs.items():
        lines.append(
            f"| {names[key]} | {_med(rows, 'decode'):.3f} | {_med(rows, 'first'):.3f} | "
            f"{_med(rows, 'tps'):.0f} | {_med(rows, 'e2e'):.0f} | {_med(rows, 'total'):.3f} |"
        )
    lines += [
        "",
        "Start-up of `python -m exo2ego_jax.web` (a fresh process each: import, model load, "
        "compiling the decode programs of the first `web.warmup_buckets` prompt buckets, page up):",
        "",
        "| compilation cache | interpreter + imports (s) | model load (s) | warm-up compile (s) | "
        "page up (s) | command to serving (s) | programs from the cache / compiled |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in starts.items():
        lines.append(
            f"| {name} | {r['imports']:.1f} | {r['load']:.1f} | {r['warm']:.1f} | "
            f"{r['page']:.1f} | {r['wall']:.1f} | {r['hits']} / {r['misses']} |"
        )
    lines += [
        "",
        "Model load includes compiling the sharded initialisation before the checkpoints are "
        "restored; with a warm cache every program comes from disk. After start-up a new "
        "question of the same 64-token prompt bucket compiles nothing (tests/test_web.py "
        "counts the programs lowered).",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="workdirs/demo", help="the demo's workdir")
    parser.add_argument("--data_dir", default="demo_data", help="the demo's data directory")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per path")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--startup_child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tiny_root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.startup_child:
        return startup_child(args)

    tmp = Path(tempfile.mkdtemp(prefix="web_latency_"))
    try:
        if args.tiny:
            from eval_helpers import tiny_stage3  # noqa: PLC0415  (tests/ only on --tiny)

            args.tiny_root = str(tmp / "tiny")
            tiny_stage3(Path(args.tiny_root))
        config = model_config(args)
        load0 = os.getloadavg()[0]
        starts = {
            "none": startup(args, ""),
            "empty (cold: filled by this start)": startup(args, str(tmp / "jax_cache")),
            "filled (warm)": startup(args, str(tmp / "jax_cache")),
        }
        runs = answers(config, args.rounds, tmp)
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    conditions = (
        f"jax {jax.__version__}, gradio {starts['none']['gradio']}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), {len(os.sched_getaffinity(0))} CPUs (shared with "
        f"other jobs), XLA_FLAGS={os.environ.get('XLA_FLAGS', '') or 'unset'}"
    )
    table = report(args, config, runs, starts, (load0, load1), conditions)
    print(table)
    if not args.no_write:
        write_section("web_latency", table)


if __name__ == "__main__":
    sys.exit(main())
