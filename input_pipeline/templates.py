"""Prompt templates of VideoLLaMA2 v1.0 as token ids and label masks (pure numpy).

Two templates, as VideoLLaMA2 v1.0 trains Mistral-7B-Instruct:

* ``plain`` (caption stages, ``--version plain``)::

      <s> <video> caption\\n

  The human turn is dropped; the text is ``"<video>" + caption + "\\n"``. Only the caption
  and the newline are supervised. There is no ``</s>``: VideoLLaMA2's plain template ends
  a caption with ``"\\n"`` (its ``sep2``) and never appends EOS; neither do we.

* ``mistral`` (instruction stages, ``--version mistral``)::

      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<video>\\n{Q1} [/INST] {A1} </s>
      [INST] {Q2} [/INST] {A2} </s>

  (one line: nothing between ``</s>`` and the next ``[INST]``; VideoLLaMA2's ``sep`` is "").

  Only ``" {A} </s>"`` of every turn is supervised, i.e. every token after ``[/INST]`` up
  to and including ``</s>`` (VideoLLaMA2's masking).

Tokenization follows VideoLLaMA2's ``tokenizer_MMODAL_token``: the text is split at the
``<video>`` placeholder, each chunk is tokenized on its own (so each gets the
sentencepiece dummy prefix), BOS is put first and one sentinel id (``-201``) replaces the
placeholder. Labels come from character spans mapped through the fast tokenizer's
offsets, so they do not depend on VideoLLaMA2's length arithmetic (which only holds for
legacy Llama-style tokenizers), yet equal it where that arithmetic holds.

Every sequence is ``int32[L]``; unsupervised positions (BOS, prompt, sentinel, padding) have
label ``IGNORE_INDEX``.

The evaluation prompts live here too, one text each, for the EgoBench scorers
(``exo2ego_jax.eval.scoring``) and the ``eval`` batches of ``input_pipeline.pipeline``:
:data:`DESCRIBE_QUESTION`, :data:`CLASS_QUESTION` and VideoLLaMA2's lettered multiple-choice
prompt (:func:`letter_prompt`, ending with :data:`LETTER_INSTRUCTION`).
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IGNORE_INDEX = -100
DEFAULT_VIDEO_TOKEN = "<video>"
VIDEO_TOKEN_INDEX = -201  # VideoLLaMA2's MODAL_INDEX_MAP["<video>"]
MAX_TEXT_LEN = 2048  # the placeholder counts as one token
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
FIRST_PERSON_CUE = "You are the camera wearer."

# Evaluation prompts: what a scored EgoBench item is asked.
DESCRIBE_QUESTION = "Describe what the camera wearer is doing in this video."  # EgoMCQ, EPIC
CLASS_QUESTION = "Which action does the camera wearer perform in this video?"  # Charades-Ego
LETTER_INSTRUCTION = (
    "Answer with the option's letter from the given choices directly and only give the best "
    "option."
)  # VideoLLaMA2's MCQA instruction
LETTERS = string.ascii_uppercase  # option letters: (A), (B), ...

Truncation = Literal["turns", "tail"]
Span = tuple[int, int]  # [start, end) character offsets of supervised text


@dataclass(frozen=True)
class Encoded:
    """One tokenized example.

    Attributes:
      input_ids: int32[L]; the video placeholder is one negative sentinel id.
      labels: int32[L]; ``input_ids`` where supervised, ``IGNORE_INDEX`` elsewhere.
    """

    input_ids: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.ndim != 1:
            raise ValueError(
                f"input_ids {self.input_ids.shape} and labels {self.labels.shape} "
                "must be 1-D of the same length"
            )

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def build_system_prompt(
    base: str = DEFAULT_SYSTEM_PROMPT,
    *,
    task_detail: str | None = None,
    first_person_cue: str | None = None,
) -> str:
    """System prompt: ``base``, then an optional task-detail line and first-person cue.

    The paper's best prompt adds task details and a first-person cue (e.g.
    :data:`FIRST_PERSON_CUE`); *decision*: they follow the base prompt, space-separated.
    """
    parts = (base, task_detail, first_person_cue)
    return " ".join(p.strip() for p in parts if p and p.strip())


def letter_prompt(question: str, options: Sequence[str]) -> str:
    """VideoLLaMA2's MCQA prompt: the question, the lettered options, :data:`LETTER_INSTRUCTION`.

    ``"Question: {question}\nOptions:\n(A) {option}\n...\n{LETTER_INSTRUCTION}"``.
    """
    if len(options) > len(LETTERS):
        raise ValueError(
            f"{len(options)} options, but letters run to {LETTERS[-1]} ({len(LETTERS)} options)"
        )
    lines = [f"Question: {question}", "Options:"]
    lines += [f"({LETTERS[i]}) {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines + [LETTER_INSTRUCTION])


def template_text(system: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """The templates' fixed text, e.g. to train a tokenizer that knows it."""
    return [
        _mistral_text([("Q", "A"), ("Q", "A")], system)[0],
        _mistral_text([("Q", None)], None)[0],
        FIRST_PERSON_CUE,
    ]


def tokenize_multimodal(
    tokenizer: Any,
    text: str,
    supervised: Sequence[Span] = (),
    *,
    video_token: str = DEFAULT_VIDEO_TOKEN,
    video_token_index: int = VIDEO_TOKEN_INDEX,
) -> Encoded:
    """``[BOS] + tok(chunk_0) + [sentinel] + tok(chunk_1) + ...``, chunks split at ``video_token``.

    Args:
      tokenizer: a fast (``tokenizers``-backed) transformers tokenizer.
      text: the full prompt; may hold any number of ``video_token``.
      supervised: character spans of ``text``; a token is supervised iff the character it
        starts at lies in one (so ``"▁A"`` after ``"[/INST]"`` counts as the answer's).

    Returns:
      Encoded with input_ids, labels: int32[L].
    """
    ids, labels = [tokenizer.bos_token_id], [IGNORE_INDEX]
    position = 0  # character offset of the current chunk in `text`
    for k, chunk in enumerate(text.split(video_token)):
        if k:
            ids.append(video_token_index)
            labels.append(IGNORE_INDEX)
            position += len(video_token)
        for token_id, start in _tokenize_chunk(tokenizer, chunk):
            ids.append(token_id)
            inside = any(a <= position + start < b for a, b in supervised)
            labels.append(token_id if inside else IGNORE_INDEX)
        position += len(chunk)
    return Encoded(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


def _tokenize_chunk(tokenizer: Any, chunk: str) -> list[tuple[int, int]]:
    """(id, start character) of every token of ``chunk``, no special tokens added."""
    try:
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as e:
        raise TypeError("templates need a fast (tokenizers-backed) tokenizer") from e
    pairs = zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    return [(int(token_id), int(start)) for token_id, (start, _) in pairs]


def encode_caption(
    tokenizer: Any,
    caption: str,
    *,
    max_len: int = MAX_TEXT_LEN,
    video_token: str = DEFAULT_VIDEO_TOKEN,
    video_token_index: int = VIDEO_TOKEN_INDEX,
) -> Encoded:
    """``plain`` template: ``<s> <video> caption\\n``; caption and newline supervised.

    Too long: the caption's tail is cut (BOS and the sentinel come first, so they stay).

    Returns:
      Encoded with input_ids, labels: int32[L], L <= max_len.
    """
    _check_index(video_token_index)
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"caption must be a non-empty string, got {caption!r}")
    if video_token in caption:
        raise ValueError(f"caption must not contain {video_token}: {caption!r}")
    text = f"{video_token}{caption}\n"
    enc = tokenize_multimodal(
        tokenizer,
        text,
        [(len(video_token), len(text))],
        video_token=video_token,
        video_token_index=video_token_index,
    )
    return _cut_tail(enc, max_len, video_token_index) if len(enc) > max_len else enc


def encode_conversation(
    tokenizer: Any,
    conversations: Sequence[Mapping[str, str]],
    *,
    template: Literal["mistral", "plain"] = "mistral",
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    max_len: int = MAX_TEXT_LEN,
    truncation: Truncation = "turns",
    video_token: str = DEFAULT_VIDEO_TOKEN,
    video_token_index: int = VIDEO_TOKEN_INDEX,
) -> Encoded:
    """Encode a VideoLLaMA2 conversation (``[{"from": "human"|"gpt", "value": ...}, ...]``).

    Messages must alternate human/gpt, start with human, end with gpt, and hold exactly one
    ``video_token`` in a human message; it is moved to the front of that message, followed
    by ``"\\n"``, as VideoLLaMA2's ``preprocess_multimodal`` does.

    Args:
      template: ``"mistral"``; or ``"plain"``, which needs one human/gpt pair and encodes
        the gpt value as a caption (:func:`encode_caption`).
      system: system prompt (see :func:`build_system_prompt`); None: no ``<<SYS>>`` block.
      max_len: maximum length, the sentinel counting as one token.
      truncation: when too long, ``"turns"`` drops whole trailing turns (down to the turn
        holding the video) so kept answers stay complete with their ``</s>``, then cuts the
        tail; ``"tail"`` only cuts the tail, as VideoLLaMA2's collator. Either way the
        sentinel is kept, and a ValueError is raised if no answer token fits.

    Returns:
      Encoded with input_ids, labels: int32[L], L <= max_len.
    """
    _check_index(video_token_index)
    turns, video_turn = _parse_conversation(conversations, video_token)
    if template == "plain":
        if len(turns) != 1:
            raise ValueError(f"plain template needs one human/gpt pair, got {len(turns)} turns")
        return encode_caption(
            tokenizer,
            turns[0][1],
            max_len=max_len,
            video_token=video_token,
            video_token_index=video_token_index,
        )
    if template != "mistral":
        raise ValueError(f"unknown template {template!r}: expected 'mistral' or 'plain'")
    if truncation not in ("turns", "tail"):
        raise ValueError(f"unknown truncation {truncation!r}: expected 'turns' or 'tail'")

    def encode(n_turns: int) -> Encoded:
        text, spans = _mistral_text(turns[:n_turns], system, tokenizer.eos_token)
        return tokenize_multimodal(
            tokenizer, text, spans, video_token=video_token, video_token_index=video_token_index
        )

    enc = encode(len(turns))
    if len(enc) <= max_len:
        return enc
    if truncation == "turns":
        for n_turns in range(len(turns) - 1, video_turn, -1):
            enc = encode(n_turns)
            if len(enc) <= max_len:
                return enc
    return _cut_tail(enc, max_len, video_token_index)


def build_prompt(
    tokenizer: Any,
    question: str,
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    history: Sequence[tuple[str, str]] = (),
    max_len: int = MAX_TEXT_LEN,
    video_token: str = DEFAULT_VIDEO_TOKEN,
    video_token_index: int = VIDEO_TOKEN_INDEX,
) -> Encoded:
    """Inference prompt of the ``mistral`` template, ending right after ``[/INST]``.

    ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n<video>\\n{question} [/INST]``; generation
    then produces ``" {answer} </s>"``. ``history`` holds earlier (question, answer) turns.
    Without a ``video_token`` anywhere, it is put in front of the first question.

    Returns:
      Encoded with input_ids: int32[L] and labels all ``IGNORE_INDEX``.
    """
    _check_index(video_token_index)
    questions = [q for q, _ in history] + [question]
    if not any(video_token in q for q in questions):
        questions[0] = video_token + questions[0]
    messages = []
    for q, a in zip(questions, [a for _, a in history] + [None], strict=True):
        messages.append({"from": "human", "value": q})
        messages.append({"from": "gpt", "value": a})
    turns, _ = _parse_conversation(messages, video_token, open_end=True)
    text, _ = _mistral_text(turns, system, tokenizer.eos_token)
    enc = tokenize_multimodal(
        tokenizer, text, video_token=video_token, video_token_index=video_token_index
    )
    if len(enc) > max_len:
        raise ValueError(f"prompt has {len(enc)} tokens, more than max_len={max_len}")
    return enc


def pad_batch(
    examples: Sequence[Encoded], max_len: int | None, pad_id: int
) -> dict[str, np.ndarray]:
    """Right-pad examples to ``max_len`` (None: the longest example).

    Returns:
      ``input_ids`` int32[B, T] (padded with ``pad_id``), ``labels`` int32[B, T] (padded with
      ``IGNORE_INDEX``) and ``attention_mask`` int32[B, T] (1 on tokens, 0 on padding).
      The mask comes from the lengths, not from ``input_ids != pad_id`` as in VideoLLaMA2,
      since pad is unk for Mistral.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    longest = max(len(e) for e in examples)
    length = longest if max_len is None else max_len
    if longest > length:
        raise ValueError(
            f"an example has {longest} tokens, more than max_len={max_len}: "
            "encode with max_len to truncate it"
        )
    shape = (len(examples), length)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "labels": np.full(shape, IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
    }
    for row, example in enumerate(examples):
        n = len(example)
        batch["input_ids"][row, :n] = example.input_ids
        batch["labels"][row, :n] = example.labels
        batch["attention_mask"][row, :n] = 1
    return batch


def _check_index(video_token_index: int) -> None:
    # Negative, so the sentinel can never be mistaken for a real token id.
    if video_token_index >= 0:
        raise ValueError(f"video_token_index must be negative, got {video_token_index}")


def _cut_tail(enc: Encoded, max_len: int, video_token_index: int) -> Encoded:
    """Keep the first ``max_len`` tokens, if the sentinel and a supervised token survive."""
    cut = Encoded(enc.input_ids[:max_len], enc.labels[:max_len])
    if not np.any(cut.input_ids == video_token_index):
        raise ValueError(
            f"the video placeholder does not fit in max_len={max_len} "
            f"(sequence of {len(enc)} tokens)"
        )
    if not np.any(cut.labels != IGNORE_INDEX):
        raise ValueError(
            f"not even the first answer fits in max_len={max_len} (sequence of {len(enc)} tokens)"
        )
    return cut


def _parse_conversation(
    conversations: Sequence[Mapping[str, str]], video_token: str, *, open_end: bool = False
) -> tuple[list[tuple[str, str | None]], int]:
    """Validate messages; return (question, answer) turns and the index of the video turn.

    ``open_end``: the last gpt value may be None (an inference prompt).
    """
    if not conversations:
        raise ValueError("conversation is empty")
    if len(conversations) % 2:
        raise ValueError(
            f"conversation has {len(conversations)} messages: it must end with a gpt answer"
        )
    for i, message in enumerate(conversations):
        role, value = message.get("from"), message.get("value")
        expected = ("human", "gpt")[i % 2]
        if role != expected:
            raise ValueError(
                f"message {i} is from {role!r}, expected {expected!r}: messages must "
                "alternate human/gpt, starting with human"
            )
        if value is None and open_end and i == len(conversations) - 1:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"message {i} ({role}) has an empty value: {value!r}")
        if role == "gpt" and video_token in value:
            raise ValueError(f"message {i} (gpt) contains {video_token}; only human ones may")

    counts = [m["value"].count(video_token) if m["value"] else 0 for m in conversations]
    if sum(counts) != 1:
        raise ValueError(
            f"conversation must contain exactly one {video_token}, found {sum(counts)}"
        )
    video_message = counts.index(1)
    turns = []
    for i in range(0, len(conversations), 2):
        question, answer = conversations[i]["value"], conversations[i + 1]["value"]
        if i == video_message:
            # VideoLLaMA2's preprocess_multimodal: placeholder first, then a newline.
            rest = question.replace(video_token, "").strip()
            question = f"{video_token}\n{rest}".strip()
        turns.append((question, answer))
    return turns, video_message // 2


def _mistral_text(
    turns: Sequence[tuple[str, str | None]], system: str | None, eos: str = "</s>"
) -> tuple[str, list[Span]]:
    """Render turns as VideoLLaMA2's ``conv_mistral`` (LLAMA2 style, sep "", sep2 eos).

    Returns the text and the supervised spans: from just after each ``[/INST]`` through
    its ``eos``. A None answer ends the text right after ``[/INST]``.
    """
    text, spans = "", []
    for i, (question, answer) in enumerate(turns):
        if i == 0 and system is not None:
            question = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}"
        text += f"[INST] {question} [/INST]"
        if answer is None:
            break
        start = len(text)
        text += f" {answer} {eos}"
        spans.append((start, len(text)))
    return text, spans
