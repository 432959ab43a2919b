"""The web chat (``exo2ego_jax.web``): its handlers against the command-line chat, bad
input, and a real browser (headless Chromium driven by Selenium) using the page.

The browser test needs Debian's ``chromium`` and ``chromium-driver`` and the ``web`` extra
(gradio, selenium); without them it is skipped, unless ``EXO2EGO_REQUIRE_BROWSER=1`` (CI)
makes it fail. ``EXO2EGO_SCREENSHOT=PATH`` saves the page after the first answer; after
``make demo``, retake docs/web.png on the demo model with::

    EXO2EGO_WEB_WORKDIR=workdirs/demo EXO2EGO_SCREENSHOT=docs/web.png \
        .venv/bin/python -m pytest tests/test_web.py -k browser -n 0
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import tiny_stage3

from configs import demo as demo_configs
from exo2ego_jax import chat, web
from exo2ego_jax.config_lib import ConfigError
from exo2ego_jax.eval.scoring import clip_frames_fn
from exo2ego_jax.models import decode
from input_pipeline.video import load_clip

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is C doing?"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # containers often have a small /dev/shm
    "--window-size=1280,1100",
)


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random stage-3 model on a tiny world; with ``EXO2EGO_WEB_WORKDIR=workdirs/demo``
    (and ``EXO2EGO_WEB_DATA_DIR``, default ``demo_data``) the trained demo model instead,
    e.g. to retake docs/web.png after ``make demo``."""
    if workdir := os.environ.get("EXO2EGO_WEB_WORKDIR"):
        data_dir = Path(os.environ.get("EXO2EGO_WEB_DATA_DIR", "demo_data"))
        return demo_configs.eval_config(workdir, data_dir, chat=True), data_dir / "world"
    config, world = tiny_stage3(tmp_path_factory.mktemp("web"))
    config.chat.max_new_tokens = 12  # a few pieces to stream
    return config, world


@pytest.fixture(scope="module")
def video(setup) -> Path:
    """A held-out take of the world's EgoBench videos."""
    return sorted((setup[1] / "egobench" / "videos").glob("*.mp4"))[0]


@pytest.fixture(scope="module")
def cli_answer(setup, video) -> str:
    """The command-line chat's greedy answer (its own model load and session)."""
    return chat.answer(setup[0], str(video), QUESTION, stream=_quiet, log=_quiet)


@pytest.fixture(scope="module")
def app(setup, tmp_path_factory) -> web.WebChat:
    uploads = tmp_path_factory.mktemp("gradio_uploads")
    chat_app = web.WebChat.from_config(setup[0], upload_dir=uploads, log=_quiet)
    chat_app.warm_up()
    return chat_app


def _upload(app: web.WebChat, data: bytes | Path, name: str = "clip.mp4") -> Path:
    """A file where Gradio puts an upload: its own folder inside the upload directory."""
    folder = app.upload_dir / secrets.token_hex(8)
    folder.mkdir()
    path = folder / name
    path.write_bytes(data.read_bytes() if isinstance(data, Path) else data)
    return path


def _final(replies) -> web.Reply:
    *_, last = replies
    assert last.done and not last.error, last
    return last


# ----------------------------------------------------------------------------- handlers


def test_uploaded_clip_answer_streams_and_equals_the_command_line(app, video, cli_answer):
    path = _upload(app, video)
    clip, message = app.load_upload(str(path))
    assert clip is not None and "Loaded **clip.mp4**" in message, message
    assert not path.exists() and not path.parent.exists()  # the upload is deleted once decoded
    # The strip shows what the model sees: the decoded frames, un-normalised.
    m = app.trained_model_config
    raw = load_clip(video, num_frames=m.num_frames, size=m.clip.image_size)
    strip = np.stack(clip.strip())
    assert strip.dtype == np.uint8 and strip.shape == raw.shape
    assert np.abs(strip.astype(int) - raw).max() <= 1

    replies = list(app.ask(QUESTION, clip))
    final = _final(replies)
    assert final.text == cli_answer  # token for token: the same decode engine, greedy
    partial = [r.text for r in replies[:-1]]
    assert len(partial) >= 2, partial  # streamed piece by piece
    pairs = zip(partial[:-1], partial[1:], strict=True)
    assert all(b.startswith(a) and len(b) > len(a) for a, b in pairs)
    assert partial[-1] == final.text
    assert "0 program(s) compiled" in final.timings and "tokens/s" in final.timings

    # The sampling controls reach the same engine (seeded: reproducible).
    sampled = app.session.config.copy_and_resolve_references()
    sampled.chat.temperature, sampled.chat.top_p = 1.5, 0.9
    want = chat.ChatSession(sampled, trained=app.session.trained).ask(
        clip.frames, QUESTION, stream=_quiet
    )
    assert _final(app.ask(QUESTION, clip, temperature=1.5, top_p=0.9)).text == want


def test_follow_ups_keep_the_conversation_and_do_not_recompile(app, video):
    clip, _ = app.load_upload(str(_upload(app, video)))
    session = app.session
    first = _final(app.ask(QUESTION, clip)).text
    follow = "Which cup is it?"
    turns = [(QUESTION, first)]
    answer = _final(app.ask(follow, clip, turns)).text
    assert answer == session.ask(clip.frames, follow, history=turns, stream=_quiet)
    assert len(session.prompt_ids(follow, turns)) > len(session.prompt_ids(follow))

    # New questions compile nothing: prompts are padded to 64-token buckets and the warm-up
    # compiled the first two (config.web.warmup_buckets).
    before = web.lowered_programs()
    long = "What happened before that, and after it? " * 8
    buckets = set()
    for question in ("Where am I?", "What colour is the bowl on the table?", long):
        buckets.add(decode.bucket(len(session.prompt_ids(question))))
        reply = _final(app.ask(question, clip))
        assert "0 program(s) compiled" in reply.timings, reply.timings
    assert web.lowered_programs() == before
    assert len(buckets) == 2  # both warmed-up buckets were used

    # Only the last max_turns turns go into the prompt.
    turns = [("Where am I?", "at a table"), (QUESTION, first)]
    app.web.max_turns = 1
    try:
        short = _final(app.ask(follow, clip, turns)).text
    finally:
        app.web.max_turns = 4
    assert short == answer


def test_example_clips_are_chosen_by_index_from_the_server_list(app, setup):
    assert len(app.examples) == app.web.num_examples
    example = app.examples[0]
    clip, message = app.load_example(0)
    assert example.reference in message and example.clip.path.exists()  # never deleted
    want_frames = clip_frames_fn(app.trained_model_config)(example.clip)
    np.testing.assert_array_equal(clip.frames, want_frames)
    want = app.session.ask(want_frames, QUESTION, stream=_quiet)
    assert _final(app.ask(QUESTION, clip)).text == want
    for bad in (-1, len(app.examples), "0", None):
        assert app.load_example(bad) == (None, "No such example.")


def test_bad_files_give_a_message_and_the_app_keeps_answering(
    app, video, cli_answer, tmp_path, monkeypatch
):
    data = video.read_bytes()
    for name, content in [
        ("empty.mp4", b""),
        ("notes.mp4", b"not a video at all\n" * 20),
        ("truncated.mp4", data[: len(data) // 2]),
    ]:
        path = _upload(app, content, name)
        clip, message = app.load_upload(str(path))
        assert clip is None and message.startswith(f"**Could not read {name}**: "), message
        assert str(app.upload_dir) not in message  # the server's paths stay on the server
        assert not path.exists()

    # A path the browser made up is never opened (nor deleted): outside the upload
    # directory, through "..", through a symlink, or the directory itself.
    outside = tmp_path / "secret.mp4"
    shutil.copy(video, outside)
    link = _upload(app, b"", "link.mp4")
    link.unlink()
    link.symlink_to(outside)
    for forged in (outside, app.upload_dir / ".." / outside.name, link, app.upload_dir):
        clip, message = app.load_upload(str(forged))
        assert clip is None and "did not come from this page's upload" in message
    assert outside.exists()
    folder = _upload(app, b"", "x.mp4").parent  # a folder inside: not a video, kept
    clip, message = app.load_upload(str(folder))
    assert clip is None and message.startswith(f"**Could not read {folder.name}**: ")

    # Ceilings from config.web.
    monkeypatch.setitem(app.web, "max_upload_mb", 0.01)
    clip, message = app.load_upload(str(_upload(app, video)))
    assert clip is None and "more than the 0.01 MB" in message
    monkeypatch.setitem(app.web, "max_upload_mb", 50.0)
    monkeypatch.setitem(app.web, "max_seconds", 2.0)
    clip, message = app.load_upload(str(_upload(app, video)))
    assert clip is None and "lasts" in message and "more than the 2 s" in message
    monkeypatch.setitem(app.web, "max_seconds", 600.0)

    # Questions the model is not asked.
    assert app.load_upload(None) == (None, "Choose a video file to upload.")
    clip, _ = app.load_upload(str(_upload(app, video)))
    assert list(app.ask(QUESTION, None))[-1].error.startswith("Upload a video")
    assert list(app.ask("   ", clip))[-1].error == "Type a question."
    assert "longer than" in list(app.ask("x" * 2000, clip))[-1].error

    # ... and the app still answers.
    assert _final(app.ask(QUESTION, clip)).text == cli_answer


def test_gradio_is_an_optional_extra(monkeypatch):
    code = "import sys, exo2ego_jax, exo2ego_jax.web, main; print('gradio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs gradio.*pip install -e '\.\[web\]'"):
        web.import_gradio()


def test_command_line_names_a_missing_demo_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "exo2ego_jax.web", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 1
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("web.py: error:") and "no demo model" in first
    assert "make demo" in first
    assert web.DEFAULT_HOST == "127.0.0.1"


# ----------------------------------------------------------------------------- the browser


def _browser(profile: Path):
    """A headless Chromium under Selenium (its profile in ``profile``), or skip (fail with
    EXO2EGO_REQUIRE_BROWSER=1)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        web.import_gradio()
        from selenium import webdriver  # noqa: PLC0415  (optional: the dev extra)
    except (ConfigError, ImportError) as e:
        missing.append(f"python packages ({e})")
    if missing:
        reason = f"browser test needs {', '.join(missing)}"
        if os.environ.get("EXO2EGO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{reason} (EXO2EGO_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")  # a fresh one
    options.binary_location = str(CHROMIUM)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    return webdriver.Chrome(options=options, service=service)


def test_a_missing_browser_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("EXO2EGO_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-chromium"):
        _browser(tmp_path)
    monkeypatch.setenv("EXO2EGO_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="EXO2EGO_REQUIRE_BROWSER=1"):
        _browser(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Records every distinct text of the latest answer bubble as the page updates it.
WATCH_ANSWER = """
window.seen = [];
const chat = document.querySelector('#chat');
new MutationObserver(() => {
  const bots = chat.querySelectorAll('[data-testid="bot"]');
  if (!bots.length) return;
  const text = bots[bots.length - 1].innerText.trim();
  if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
}).observe(chat, {subtree: true, childList: true, characterData: true});
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated)")
def test_browser_asks_about_an_upload_and_survives_a_broken_file(
    app, video, cli_answer, tmp_path, monkeypatch
):
    from selenium.webdriver.common.by import By  # noqa: PLC0415  (optional: the dev extra)
    from selenium.webdriver.support.ui import WebDriverWait  # noqa: PLC0415

    driver = _browser(tmp_path / "chromium-profile")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(app.upload_dir))  # where the app puts uploads
    page = web.build_app(app)
    asks = [f for f in page.fns.values() if f.name == "on_ask"]
    assert asks and all(f.concurrency_limit == 1 for f in asks)  # one generation at a time
    port = _free_port()
    try:
        _, url, share_url = web.launch(
            page, app, host="127.0.0.1", port=port, share=False, block=False
        )
        assert url.startswith(f"http://127.0.0.1:{port}") and share_url is None
        with urllib.request.urlopen(f"{url}gradio_api/info", timeout=10) as r:
            api = json.load(r)
        assert not api.get("named_endpoints") and not api.get("unnamed_endpoints")
        wait = WebDriverWait(driver, 60)

        def text(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        def status_has(words: str):
            wait.until(lambda d: words in text("status"), f"{words!r} not in the status")

        def answered(n: int) -> str:
            wait.until(lambda d: "tokens" in text("timings"), "no timings under the answer")
            bots = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')
            assert len(bots) == n
            return bots[-1].text.strip()

        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        assert "trained only on the synthetic world" in text("model-info")
        assert "stage-3 weights" in text("model-info")

        # Upload a held-out demo clip; the frames the model sees appear as a strip.
        upload = tmp_path / "clip.mp4"
        shutil.copy(video, upload)
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(upload))
        status_has("Loaded clip.mp4")
        frames = driver.find_elements(By.CSS_SELECTOR, "#frames img")
        assert len(frames) == app.trained_model_config.num_frames
        assert not list(app.upload_dir.rglob("clip.mp4"))  # deleted on the server

        # Ask; the answer streams in and equals the command line's.
        driver.execute_script(WATCH_ANSWER)
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        answer = answered(1)
        assert answer == cli_answer
        seen = driver.execute_script("return window.seen;")
        print(f"answer bubble states seen while streaming: {seen}")
        assert len(seen) >= 2 and seen[-1] == answer  # streamed: several states shown
        assert all(answer.startswith(s) for s in seen), seen
        assert "prefill" in text("timings") and "0 program(s) compiled" in text("timings")
        if shot := os.environ.get("EXO2EGO_SCREENSHOT"):
            driver.save_screenshot(shot)

        # A broken file: a message in the page, and the server keeps serving.
        broken = tmp_path / "broken.mp4"
        broken.write_bytes(video.read_bytes()[:2000])
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(broken))
        status_has("Could not read broken.mp4")
        driver.find_element(By.CSS_SELECTOR, "#examples button").click()
        status_has("Loaded example 1")
        driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        driver.find_element(By.ID, "ask").click()
        want = app.session.ask(
            clip_frames_fn(app.trained_model_config)(app.examples[0].clip), QUESTION, stream=_quiet
        )
        assert answered(1) == want  # a new clip starts a new conversation
    finally:
        driver.quit()
        page.close()
