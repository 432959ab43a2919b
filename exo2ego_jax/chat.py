"""Ask the trained Exo2Ego model about any ego video, with the answer streamed as it decodes.

``python main.py --config=configs/eval.py:chat --video=PATH --question="..."`` calls
:func:`answer`. The model is loaded as evaluation loads it (``runtime.load_trained``:
stage-3 weights on the mesh);
the video is decoded with VideoLLaMA2's sampling (``input_pipeline.video.load_clip``) at the
model's frame count and size; the prompt is the ``mistral`` template with the system prompt
stage 3 trains with (:func:`chat_system_prompt`; ``config.chat.first_person`` adds EgoBench's
first-person cue, which a model trained without it answers worse: docs/egobench.md).

Decoding is a Python loop over the decode engine's jitted prefill and step
(``models.decode.decoder``) sharing one preallocated KV cache: a prefill over the spliced
prompt (video tokens in place of ``<video>``), then one single-token step per new token (the
cache is donated and updated in place). After every
token the text decoded so far is compared with what was already shown and the new piece
is passed to ``stream`` (:meth:`ChatSession.ask`) or yielded
(:meth:`ChatSession.answer_pieces`, what the web app streams). Greedy by default;
``chat.temperature`` > 0 samples with ``chat.top_p`` nucleus filtering. Follow-up questions
pass the earlier ``(question, answer)`` turns as ``history`` (the ``mistral`` template's
multi-turn prompt, the video in the first turn).

The batch is padded to the number of devices a batch is split over (every row the same
prompt): an uneven batch split is not possible on the mesh.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from exo2ego_jax import config_lib, runtime
from exo2ego_jax.eval.scoring import clip_frames_fn, system_prompt
from exo2ego_jax.models import decode
from exo2ego_jax.models.exo2ego import Exo2EgoConfig
from exo2ego_jax.runtime import Log, Trained
from input_pipeline.egobench import Clip
from input_pipeline.templates import build_prompt

Stream = Callable[[str], None]
History = Sequence[tuple[str, str]]


@dataclasses.dataclass
class Timings:
    """Where one answer's time went (filled in while it decodes)."""

    video_s: float = 0.0  # the video decoded to frames (0 when frames were passed)
    prefill_s: float = 0.0  # clip + prompt through the model, first token picked
    decode_s: float = 0.0  # every single-token step after that
    steps: int = 0  # single-token steps
    tokens: int = 0  # answer tokens (EOS not counted)

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed after the first token (0 when only one token was picked)."""
        return self.steps / self.decode_s if self.steps and self.decode_s > 0 else 0.0


def print_piece(piece: str) -> None:
    """Default stream: print pieces on one line as they arrive."""
    print(piece, end="", flush=True)


# ----------------------------------------------------------------------------- decoding


_pick = jax.jit(decode.sample_token, static_argnames=("greedy",))


def decode_tokens(
    trained: Trained,
    frames: np.ndarray,
    prompt_ids: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    timings: Timings | None = None,
) -> Iterator[int]:
    """Yields the answer's token ids one at a time (stops after EOS, which is not yielded).

    Args:
      frames: ``float32[T, H, W, 3]`` CLIP-normalised frames.
      prompt_ids: ``int32[L]`` prompt with one ``<video>`` sentinel.
      timings: filled in as tokens are picked (prefill, steps, tokens).
    """
    timings = timings if timings is not None else Timings()
    model, tok = trained.model, trained.tokenizer
    b = trained.batch_ways
    length = decode.bucket(len(prompt_ids))
    ids = np.full((b, length), tok.pad_token_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    ids[:, : len(prompt_ids)], mask[:, : len(prompt_ids)] = prompt_ids, 1
    batch_frames = np.broadcast_to(frames, (b, *frames.shape))
    spliced = decode.spliced_length(model, length)
    engine = decode.decoder(model)
    greedy = temperature <= 0.0
    rng = jax.random.key(seed)
    temp, nucleus = jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p)
    start = time.perf_counter()
    with trained.context():
        logits, cache, lengths = engine.prefill(
            trained.params,
            jnp.asarray(batch_frames),
            jnp.asarray(ids),
            jnp.asarray(mask),
            cache_len=spliced + max_new_tokens,
        )
        for t in range(max_new_tokens):
            key = None if greedy else jax.random.fold_in(rng, t)
            token = int(_pick(logits, key, temp, nucleus, greedy)[0])  # waits for the device
            now = time.perf_counter()
            if t == 0:
                timings.prefill_s, start = now - start, now
            else:
                timings.decode_s, timings.steps = now - start, t
            if token == tok.eos_token_id:
                return
            timings.tokens = t + 1
            yield token
            if t + 1 == max_new_tokens:
                return
            # Every row carries the same prompt: feed row 0's token to all of them.
            tokens = jnp.full((b,), token, jnp.int32)
            logits, cache = engine.step(trained.params, tokens, lengths + t, cache)


def text_pieces(tokenizer: Any, token_ids: Iterator[int]) -> Iterator[str]:
    """Decodes ``token_ids`` incrementally, yielding each new piece of text.

    The whole prefix is decoded after every token (a token's text can depend on its
    neighbours); a piece is held back while it ends in an incomplete UTF-8 sequence
    (``\\ufffd`` from byte fallback) or in whitespace (the template's space before ``</s>``).
    The pieces add up to the answer without surrounding whitespace.
    """
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(shown) or len(text) == len(shown):
            continue
        piece, shown = text[len(shown) :], text
        yield piece


def stream_pieces(pieces: Iterable[str], stream: Stream = print_piece) -> str:
    """Passes each piece to ``stream``; returns their concatenation."""
    text = ""
    for piece in pieces:
        stream(piece)
        text += piece
    return text


def stream_text(tokenizer: Any, token_ids: Iterator[int], stream: Stream = print_piece) -> str:
    """:func:`text_pieces` of ``token_ids`` passed to ``stream``; returns the answer."""
    return stream_pieces(text_pieces(tokenizer, token_ids), stream)


# ----------------------------------------------------------------------------- sessions


def load_frames(model_config: Exo2EgoConfig, video_path: str | Path) -> np.ndarray:
    """Any video file -> the model's ``float32[T, H, W, 3]`` CLIP-normalised frames.

    Raises ``input_pipeline.video.VideoDecodeError`` for a missing or unreadable file.
    """
    return clip_frames_fn(model_config)(Clip(Path(video_path)))


def chat_system_prompt(config: ml_collections.ConfigDict) -> str:
    """The chat's system prompt: the one stage 3 trains with, plus EgoBench's first-person cue
    ("You are the camera wearer.") when ``config.chat.first_person``."""
    return system_prompt(None, first_person=config.chat.get("first_person", False))


class ChatSession:
    """The trained model loaded once, answering any number of questions."""

    def __init__(
        self,
        config: ml_collections.ConfigDict | config_lib.ResolvedConfig,
        *,
        log: Log = print,
        trained: Trained | None = None,
    ):
        if isinstance(config, config_lib.ResolvedConfig):
            resolved, config = config, config.config
        else:
            resolved = runtime.resolve_for_inference(config)
        self.config = config  # chat.* / eval.* are read at every question
        self.trained = trained or runtime.load_trained(resolved, log=log)

    def ask(
        self,
        video: str | Path | np.ndarray,
        question: str,
        *,
        stream: Stream = print_piece,
        history: History = (),
    ) -> str:
        """Streams the answer to ``question`` about ``video`` (a path or decoded frames)
        after the earlier ``(question, answer)`` turns of ``history``."""
        return stream_pieces(self.answer_pieces(video, question, history=history), stream)

    def prompt_ids(self, question: str, history: History = ()) -> np.ndarray:
        """``int32[L]``: the ``mistral`` prompt of ``question`` after ``history``, with the
        ``<video>`` sentinel in the first turn."""
        return build_prompt(
            self.trained.tokenizer,
            question,
            system=chat_system_prompt(self.config),
            history=history,
            video_token_index=self.trained.model.config.video_token_index,
        ).input_ids

    def answer_pieces(
        self,
        video: str | Path | np.ndarray,
        question: str,
        *,
        history: History = (),
        temperature: float | None = None,
        top_p: float | None = None,
        timings: Timings | None = None,
    ) -> Iterator[str]:
        """Yields the answer's text piece by piece as it decodes (:func:`text_pieces`).

        ``temperature`` / ``top_p`` default to ``config.chat``'s; ``timings`` is filled in.
        """
        c = self.config.chat
        timings = timings if timings is not None else Timings()
        start = time.perf_counter()
        if isinstance(video, np.ndarray):
            frames = video
        else:
            frames = load_frames(self.trained.model.config, video)
            timings.video_s = time.perf_counter() - start
        tokens = decode_tokens(
            self.trained,
            frames,
            self.prompt_ids(question, history),
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature if temperature is None else temperature,
            top_p=c.top_p if top_p is None else top_p,
            seed=c.seed,
            timings=timings,
        )
        return text_pieces(self.trained.tokenizer, tokens)


def answer(
    config: ml_collections.ConfigDict,
    video_path: str | Path | None = None,
    question: str | None = None,
    *,
    stream: Stream | None = None,
    log: Log = print,
) -> str:
    """Loads the trained model and streams its answer to ``question`` about ``video_path``.

    ``video_path`` / ``question`` default to ``config.chat.video`` / ``config.chat.question``.
    ``stream`` receives each new piece of text; by default pieces are printed on one line
    followed by a newline at the end. Returns the whole answer (the pieces concatenated).
    """
    video = video_path or config.chat.video
    question = question or config.chat.question
    if not video:
        raise ValueError("no video: pass --video=PATH (or set config.chat.video)")
    if not question:
        raise ValueError('no question: pass --question="..." (or set config.chat.question)')
    resolved = runtime.resolve_for_inference(config)  # config, then video: both fail
    frames = load_frames(resolved.model, video)  # before the model loads
    session = ChatSession(resolved, log=log)
    text = session.ask(frames, question, stream=stream or print_piece)
    if stream is None:
        print(flush=True)
    return text
