r"""A web chat about any ego video, served by Gradio (``pip install -e '.[web]'``).

    python -m exo2ego_jax.web --workdir=workdirs/demo [--data_dir=demo_data]   # the demo
    python -m exo2ego_jax.web --config=configs/eval.py:paper \
        --config.init.stages=... --config.data.tokenizer=...                  # any stage-3 model

The page: upload a video (or click a held-out example clip), ask a question, and the answer
streams in token by token; follow-up questions keep the conversation (the earlier turns go
into the prompt, ``config.web.max_turns`` of them). Under the chat: the frames the model saw
(the decoded clip un-normalised), which model is loaded, and each answer's timings.

Everything here is plumbing around :class:`exo2ego_jax.chat.ChatSession`: answers come from
the same decode engine as the command-line chat (``models.decode.decoder``), so for one
video and question the two give the same greedy tokens. The model is compiled at start-up
(:meth:`WebChat.warm_up`: the first ``config.web.warmup_buckets`` prompt buckets, on a blank
clip); prompts are padded to 64-token buckets (``decode.bucket``), so a new question of a
compiled bucket compiles nothing (the timings line counts the programs lowered for each
answer); a longer conversation compiles each further bucket once.

Safety: the server opens only files Gradio itself uploaded (checked to lie in Gradio's
upload directory) and the example clips of a server-side list (chosen by index); uploads are
size- and duration-checked (``config.web.max_upload_mb`` / ``max_seconds``) and deleted
once decoded; one generation runs at a time (Gradio's queue, concurrency 1, shown in the
page); the server binds to 127.0.0.1 unless ``--host`` says otherwise and is shared publicly
only with ``--share``. See docs/web.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import demo as demo_configs
from exo2ego_jax import cli
from exo2ego_jax.chat import ChatSession, History, Timings, load_frames
from exo2ego_jax.config_lib import ConfigError
from exo2ego_jax.demo.chat_check import QUESTION, heldout_clips
from exo2ego_jax.eval.scoring import clip_frames_fn
from exo2ego_jax.models import decode
from input_pipeline.egobench import Clip
from input_pipeline.video import VideoDecodeError, denormalize_frames, probe

DEMO_NOTE = (
    "**This is the built-in demo model.** It is tiny and was trained only on the synthetic "
    "world of `make demo` (coloured cups, bottles and bowls moved about a table, seen by a "
    "head camera). It knows nothing else: on real videos its answers mean nothing. Click an "
    f"example clip and ask, e.g., *{QUESTION}*"
)
INSTALL_HINT = "pip install -e '.[web]'"
#: Where the server listens unless ``--host`` / ``--share`` say otherwise.
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860


def import_gradio() -> Any:
    """The ``gradio`` module, or a one-line :class:`ConfigError` naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: PLC0415  (optional extra: only the web app needs it)
    except ImportError:
        raise ConfigError(
            f"the web app needs gradio, which is not installed: {INSTALL_HINT}"
        ) from None
    return gradio


# ----------------------------------------------------------------------------- compile count

#: Recorded once per program traced and lowered, i.e. per miss of a jit cache (a program
#: then loaded from the persistent compilation cache counts too).
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lowerings = {"count": 0, "listening": False}
_lowerings_lock = threading.Lock()


def _count_lowering(event: str, duration: float, **kwargs: Any) -> None:
    if event == LOWERING_EVENT:
        _lowerings["count"] += 1


def lowered_programs() -> int:
    """Programs JAX has lowered in this process since this function was first called."""
    with _lowerings_lock:
        if not _lowerings["listening"]:
            jax.monitoring.register_event_duration_secs_listener(_count_lowering)
            _lowerings["listening"] = True
    return _lowerings["count"]


# ----------------------------------------------------------------------------- the handlers


@dataclasses.dataclass(frozen=True)
class Example:
    """A held-out clip offered in the page: a window of an EgoBench video."""

    label: str
    clip: Clip
    reference: str  # its narration, shown once the clip is loaded


@dataclasses.dataclass(frozen=True)
class Video:
    """A decoded video, kept per browser session (the upload itself is deleted)."""

    name: str
    frames: np.ndarray  # float32[T, H, W, 3], CLIP-normalised: what the model sees
    decode_s: float

    def strip(self) -> list[np.ndarray]:
        """The frames as ``uint8[H, W, 3]`` images."""
        return list(denormalize_frames(self.frames))


@dataclasses.dataclass(frozen=True)
class Reply:
    """One update of an answer: the text so far, then (``done``) its timings."""

    text: str
    done: bool = False
    timings: str = ""  # the line shown under the answer
    error: str = ""
    stats: Timings | None = None  # the numbers behind ``timings``


def example_clips(data_root: str | Path, n: int) -> list[Example]:
    """The first ``n`` held-out EgoMCQ clips of an EgoBench root (none if it has no EgoMCQ)."""
    try:
        clips = heldout_clips(Path(data_root), n) if n > 0 and data_root else []
    except FileNotFoundError:
        return []
    return [
        Example(
            f"{i + 1}: take {video.stem[:8]}, {start:.1f}-{end:.1f} s",
            Clip(video, start, end),
            narration.replace("#C ", "").strip(),
        )
        for i, (video, start, end, narration) in enumerate(clips)
    ]


class _DeviceThread:
    """Runs every generation on one thread of its own, one at a time.

    Gradio resumes a streaming handler on any of its worker threads; the decode loop holds
    the mesh context (thread-local) while it yields, so it must not move between threads.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="exo2ego-generate")

    def stream(self, pieces: Callable[[], Iterator[str]]) -> Iterator[str]:
        """Yields the pieces of ``pieces()`` as the device thread produces them (stops it
        after the next piece when the consumer goes away)."""
        out: queue.Queue = queue.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                for piece in pieces():
                    out.put(("piece", piece))
                    if stop.is_set():
                        break
                out.put(("done", None))
            except BaseException as e:  # handed to the consumer, raised there
                out.put(("error", e))

        self._pool.submit(run)
        try:
            while True:
                kind, value = out.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                yield value
        finally:
            stop.set()


class WebChat:
    """The page's handlers, free of Gradio (the tests call them directly).

    Args:
      session: the loaded model (a :class:`ChatSession`).
      upload_dir: the only directory uploads may come from (Gradio's upload folder).
      examples: the example clips, chosen in the page by index.
    """

    def __init__(
        self,
        session: ChatSession,
        *,
        upload_dir: str | Path,
        examples: Sequence[Example] = (),
    ):
        self.session = session
        self.config = session.config
        self.web = self.config.web
        self.upload_dir = Path(upload_dir).resolve()
        self.examples = list(examples)
        self._device = _DeviceThread()
        lowered_programs()  # start counting

    @classmethod
    def from_config(
        cls, config: ml_collections.ConfigDict, *, upload_dir: str | Path, log=print
    ) -> WebChat:
        """Loads the model of ``config`` and the example clips of ``config.eval.data_root``."""
        session = ChatSession(config, log=log)
        examples = example_clips(config.eval.get("data_root", ""), config.web.num_examples)
        return cls(session, upload_dir=upload_dir, examples=examples)

    # ------------------------------------------------------------------ what the page shows

    @property
    def is_demo(self) -> bool:
        """A demo-size model (``model.size='tiny'``): the page says what it knows."""
        return self.config.model.size == "tiny"

    @property
    def trained_model_config(self):
        return self.session.trained.model.config

    def model_info(self) -> str:
        """One line: which weights and tokenizer are loaded, and the clip size."""
        c, m = self.config, self.trained_model_config
        stages = list(c.init.stages)
        weights = f"`{stages[-1]}`" if stages else "random init (no stage checkpoint)"
        devices = f"{jax.device_count()} {jax.default_backend()} device(s)"
        return (
            f"Model: stage-3 weights {weights} ({c.model.size} size: {m.num_frames} frames of "
            f"{m.clip.image_size} px), tokenizer `{c.data.tokenizer}`, on {devices}. "
            f"Up to {c.chat.max_new_tokens} new tokens per answer."
        )

    def limits(self) -> str:
        w = self.web
        return (
            f"Videos up to {w.max_upload_mb:g} MB and {w.max_seconds:g} s; "
            f"the last {w.max_turns} turns are kept in a follow-up's prompt."
        )

    # ------------------------------------------------------------------ loading a video

    def load_upload(self, path: str | None) -> tuple[Video | None, str]:
        """An uploaded file -> ``(video, message)`` (``video`` None when it cannot be used).

        Only a file inside the upload directory is ever opened; it is deleted afterwards.
        """
        if not path:
            return None, "Choose a video file to upload."
        p = Path(path).resolve()
        if not p.is_relative_to(self.upload_dir) or p == self.upload_dir:
            logging.warning("refused a file outside the upload directory: %s", path)
            return None, "That file did not come from this page's upload; upload it again."
        name = p.name
        try:
            size_mb = p.stat().st_size / 2**20
            if size_mb > self.web.max_upload_mb:
                return None, (
                    f"**{name}** is {size_mb:.1f} MB, more than the "
                    f"{self.web.max_upload_mb:g} MB this server accepts: upload a shorter clip."
                )
            try:
                seconds = probe(p)["duration"]  # not a video: fails here, before decoding
                if seconds > self.web.max_seconds:
                    return None, (
                        f"**{name}** lasts {seconds:.0f} s, more than the "
                        f"{self.web.max_seconds:g} s this server accepts: cut it shorter."
                    )
                video = self._decode(name, Clip(p))
            except VideoDecodeError as e:  # its reason, without the server's path
                reason = str(e).split(": ", 1)[-1].replace(str(p), name)
                return None, f"**Could not read {name}**: {reason}"
            return video, self._loaded(video)
        except OSError as e:
            return None, f"**Could not read {name}**: {e.strerror or e}. Upload it again."
        finally:
            self._delete_upload(p)

    def load_example(self, index: int | None) -> tuple[Video | None, str]:
        """Example clip ``index`` of the server's list -> ``(video, message)``."""
        if not isinstance(index, int) or not 0 <= index < len(self.examples):
            return None, "No such example."
        ex = self.examples[index]
        try:
            video = self._decode(f"example {ex.label}", ex.clip)
        except VideoDecodeError as e:
            return None, f"**Could not read the example clip.** {e}"
        return video, f"{self._loaded(video)} Its narration: *{ex.reference}*."

    def _decode(self, name: str, clip: Clip) -> Video:
        """The model's frames of ``clip`` (a whole file: as the command-line chat decodes
        it, ``chat.load_frames``)."""
        start = time.perf_counter()
        if clip.start is None and clip.end is None:
            frames = load_frames(self.trained_model_config, clip.path)
        else:
            frames = clip_frames_fn(self.trained_model_config)(clip)
        return Video(name, frames, time.perf_counter() - start)

    @staticmethod
    def _loaded(video: Video) -> str:
        return (
            f"Loaded **{video.name}**: the model sees the {len(video.frames)} frames below "
            f"(decoded in {video.decode_s:.2f} s). Ask a question."
        )

    def _delete_upload(self, p: Path) -> None:
        """Deletes an upload and the per-upload folder Gradio made for it, if now empty."""
        if not p.is_relative_to(self.upload_dir) or not p.is_file():
            return
        p.unlink(missing_ok=True)
        if p.parent != self.upload_dir:
            try:
                p.parent.rmdir()
            except OSError:
                pass  # not empty: another file of the same upload

    # ------------------------------------------------------------------ answering

    def ask(
        self,
        question: str,
        video: Video | None,
        turns: History = (),
        temperature: float | None = None,
        top_p: float | None = None,
    ) -> Iterator[Reply]:
        """Streams the answer to ``question`` after the conversation ``turns``: a
        :class:`Reply` per new piece of text, then one with ``done`` and the timings."""
        question = (question or "").strip()
        if video is None:
            yield Reply("", True, error="Upload a video or click an example clip first.")
            return
        if not question:
            yield Reply("", True, error="Type a question.")
            return
        if len(question) > self.web.max_question_chars:
            yield Reply(
                "",
                True,
                error=f"The question is longer than {self.web.max_question_chars} characters.",
            )
            return
        history = list(turns)[-self.web.max_turns :] if self.web.max_turns else []
        timings = Timings()
        before = lowered_programs()
        try:
            self.session.prompt_ids(question, history)  # a prompt too long fails here
        except ValueError as e:
            yield Reply("", True, error=f"{e}: start a new conversation.")
            return
        text = ""
        pieces = self._device.stream(
            lambda: self.session.answer_pieces(
                video.frames,
                question,
                history=history,
                temperature=temperature,
                top_p=top_p,
                timings=timings,
            )
        )
        for piece in pieces:
            text += piece
            yield Reply(text)
        lowered = lowered_programs() - before
        line = self.timings_line(video, timings, lowered)
        yield Reply(text, True, timings=line, stats=timings)

    @staticmethod
    def timings_line(video: Video, t: Timings, lowered: int) -> str:
        speed = f"{t.tokens_per_s:.1f} tokens/s" if t.steps else "no decode step"
        return (
            f"video decode {video.decode_s:.2f} s (once, on load) · prefill + first token "
            f"{t.prefill_s:.2f} s · {t.tokens} tokens, {speed} · "
            f"{lowered} program(s) compiled for this answer"
        )

    def warm_up(self) -> float:
        """Compiles the decode programs of the first ``config.web.warmup_buckets`` prompt
        buckets (a question about a blank clip, then follow-ups after an earlier turn
        long enough to reach each next bucket); returns the seconds it took."""
        m = self.trained_model_config
        size = m.clip.image_size
        blank = Video("warm-up", np.zeros((m.num_frames, size, size, 3), np.float32), 0.0)
        start = time.perf_counter()
        first = decode.bucket(len(self.session.prompt_ids(QUESTION)))
        buckets = self.web.warmup_buckets if self.web.max_turns else 1
        for target in range(first, first + buckets * decode.PROMPT_BUCKET, decode.PROMPT_BUCKET):
            turns, earlier = [], ""
            while decode.bucket(len(self.session.prompt_ids(QUESTION, turns))) < target:
                earlier += " and then"  # a few tokens at a time: no bucket is skipped
                turns = [(QUESTION, earlier.strip())]
            for _ in self.ask(QUESTION, blank, turns):
                pass
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- the page


def build_app(web: WebChat) -> Any:
    """The Gradio Blocks of ``web`` (queued: one generation at a time)."""
    gr = import_gradio()
    m = web.trained_model_config
    with gr.Blocks(title="Exo2Ego chat", analytics_enabled=False, delete_cache=(600, 600)) as page:
        gr.Markdown("# Exo2Ego: ask about an egocentric video")
        intro = [web.model_info(), web.limits()]
        if web.is_demo:
            intro.insert(0, DEMO_NOTE)
        gr.Markdown("\n\n".join(intro), elem_id="model-info")
        video_state = gr.State(None)
        turns_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(
                    label="Upload a video", type="filepath", height=120, elem_id="upload"
                )
                examples = gr.Dataset(
                    components=[gr.Textbox(visible=False)],
                    samples=[[ex.label] for ex in web.examples],
                    type="index",
                    label="Example clips (held out from training)",
                    elem_id="examples",
                    samples_per_page=12,
                    visible=bool(web.examples),
                )
                status = gr.Markdown("Upload a video or click an example clip.", elem_id="status")
                columns = min(m.num_frames, 8)
                strip = gr.Gallery(
                    label="Frames the model sees",
                    columns=columns,
                    height=60 + 110 * -(-m.num_frames // columns),
                    allow_preview=False,
                    elem_id="frames",
                )
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(
                        0.0, 2.0, value=web.config.chat.temperature, step=0.05,
                        label="Temperature (0 = greedy)",
                    )  # fmt: skip
                    top_p = gr.Slider(
                        0.05, 1.0, value=web.config.chat.top_p, step=0.05, label="Top-p"
                    )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id="chat", height=420, render_markdown=False
                )  # the model's text as it is
                question = gr.Textbox(
                    label="Question", placeholder=QUESTION, elem_id="question", lines=1
                )
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                    new_button = gr.Button("New conversation", elem_id="new")
                timings = gr.Markdown(elem_id="timings")

        def shown(video: Video | None, message: str):
            frames = video.strip() if video is not None else []
            return video, [], [], frames, message, ""

        def on_upload(path):
            return (*shown(*web.load_upload(path)), None)

        def on_example(index):
            return shown(*web.load_example(index))

        def on_ask(q, video, turns, chat, temp, nucleus):
            chat = list(chat or [])
            for reply in web.ask(q, video, turns, temp, nucleus):
                if reply.error:
                    yield chat, turns, gr.skip(), f"**{reply.error}**", gr.skip()
                    return
                answer = {"role": "assistant", "content": reply.text}
                now = [*chat, {"role": "user", "content": q.strip()}, answer]
                if not reply.done:
                    yield now, turns, "", gr.skip(), ""
                else:
                    yield now, [*turns, (q.strip(), reply.text)], reply.timings, gr.skip(), ""

        page_only = dict(api_visibility="private")  # no API endpoints: the page's events only
        loaded = [video_state, turns_state, chatbot, strip, status, timings]
        upload.upload(
            on_upload, [upload], [*loaded, upload], concurrency_id="decode", concurrency_limit=2,
            **page_only,
        )  # fmt: skip
        examples.click(on_example, [examples], loaded, concurrency_id="decode", **page_only)
        ask_args = dict(
            fn=on_ask,
            inputs=[question, video_state, turns_state, chatbot, temperature, top_p],
            outputs=[chatbot, turns_state, timings, status, question],
            concurrency_id="generate",
            concurrency_limit=1,
            **page_only,
        )
        ask_button.click(**ask_args)
        question.submit(**ask_args)
        new_button.click(lambda: ([], [], ""), None, [chatbot, turns_state, timings], **page_only)
    # api_open=False: no REST route around the queue.
    return page.queue(max_size=web.web.max_queue, default_concurrency_limit=1, api_open=False)


def launch(
    page: Any,
    web: WebChat,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    share: bool = False,
    block: bool = True,
):
    """Serves ``page`` on ``host:port``; returns Gradio's ``(app, local_url, share_url)``
    (``block``: only once the server stops)."""
    gr = import_gradio()
    served = page.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=int(web.web.max_upload_mb * 2**20),
        prevent_thread_lock=True,
        ssr_mode=False,
        run_history=False,  # the page records nothing, in the browser or elsewhere
        footer_links=["gradio", "settings"],
        show_error=False,
        quiet=True,
        theme=gr.themes.Default(
            font=("ui-sans-serif", "system-ui", "sans-serif"),  # no web fonts: works offline
            font_mono=("ui-monospace", "monospace"),
        ),
    )
    _, local_url, share_url = served
    where = f"{local_url} (bound to {host})" + (f" and {share_url} (public)" if share_url else "")
    logging.info("serving on %s; stop with Ctrl-C", where)
    if block:
        page.block_thread()
    return served


# ----------------------------------------------------------------------------- command line


def define_flags() -> None:
    """The command line's flags (defined only when run as a program: ``main.py`` defines
    ``--config`` / ``--workdir`` too, and both modules may be imported in one process)."""
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A stage-3 model's eval config, e.g. configs/eval.py:paper (default: the demo's).",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", "workdirs/demo", "The demo's workdir (without --config).")
    flags.DEFINE_string("data_dir", "demo_data", "The demo's data directory (without --config).")
    flags.DEFINE_string("host", DEFAULT_HOST, "Interface to bind (0.0.0.0: every one).")
    flags.DEFINE_integer("port", DEFAULT_PORT, "Port to serve on.")
    flags.DEFINE_bool("share", False, "Also serve through a public Gradio share link.")
    flags.DEFINE_string(
        "compilation_cache", "", "Persistent XLA compilation cache directory (faster restarts)."
    )


def config_from_flags(fv: flags.FlagValues) -> ml_collections.ConfigDict:
    """``--config`` as given, or the demo's eval config for ``--workdir`` / ``--data_dir``."""
    if fv.config is not None:
        if fv["workdir"].present or fv["data_dir"].present:
            raise ConfigError(
                "--workdir / --data_dir pick the demo model; with --config set "
                "--config.init.stages and --config.data.tokenizer instead"
            )
        return fv.config
    workdir = Path(fv.workdir)
    if not (workdir / "stage3").is_dir():
        raise ConfigError(
            f"{workdir / 'stage3'}: no demo model there. Train it with `make demo` (or pass "
            "--workdir of a finished demo, or --config=configs/eval.py:paper ... for another)"
        )
    return demo_configs.eval_config(workdir, fv.data_dir, chat=True)


def use_compilation_cache(path: str) -> None:
    """A persistent XLA cache in ``path``: a restart loads the decode programs from disk."""
    if path:
        jax.config.update("jax_compilation_cache_dir", str(Path(path).absolute()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for quiet in ("absl", "httpx"):  # Orbax's per-step lines; Gradio's own HTTP requests
        logging.getLogger(quiet).setLevel(logging.WARNING)
    logging.getLogger().setLevel(logging.INFO)
    fv = flags.FLAGS
    config = config_from_flags(fv)
    gr = import_gradio()  # before the model loads: a missing extra fails at once
    use_compilation_cache(fv.compilation_cache)
    start = time.perf_counter()
    web = WebChat.from_config(config, upload_dir=gr.utils.get_upload_folder(), log=logging.info)
    loaded = time.perf_counter() - start
    warm = web.warm_up()
    logging.info("model loaded in %.1f s, decode programs compiled in %.1f s", loaded, warm)
    launch(build_app(web), web, host=fv.host, port=fv.port, share=fv.share)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
