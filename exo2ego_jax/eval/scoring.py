"""Scoring EgoBench items with an Exo2Ego model (method.md §6, "Scoring decision").

Modes, each ``f(model, params, tokenizer, items, ...) -> list[dict]`` (one JSON-serialisable
prediction per item, keyed by ``item_id``):

* :func:`score_multiple_choice` — every option's **length-normalised log-likelihood** given
  the video and the question (``mistral`` template prompt, the option as the answer, its
  ``</s>`` included); the prediction is the best option. The prompt (video + question) is
  run once and its KV cache shared by all options (prefix reuse). EgoMCQ's options are
  clips: there the query narration is scored given each clip.
* :func:`answer_with_letters` — VideoLLaMA2's way: options listed with letters, a few greedy
  tokens, the letter read off with :func:`extract_letter`.
* :func:`score_classes` — Charades-Ego: every class name scored as an option; the scores
  (``[num_items, num_classes]`` via :func:`score_matrix`) feed mAP.
* :func:`score_retrieval` — EPIC MIR: the log-likelihood of every sentence given every clip
  (``[num_clips, num_sentences]``). Cost: one prompt pass per clip plus one continuation
  row per (clip, sentence) pair, O(N·M) — 9668 x 3843 ≈ 37M rows on the full test set, so
  cap it with ``RetrievalBenchmark.subset(max_clips)``.
* :func:`answer_open` — greedy generation of a free-form answer.

Prompt switches (the paper's best prompt): ``task_detail`` (a line describing the task) and
``first_person`` (adds "You are the camera wearer."), both appended to the system prompt by
``templates.build_system_prompt``. ``TASK_DETAILS`` holds a default line per task.

Shapes: B prompts per batch, R continuation rows per chunk, P padded prompt length, S
visual tokens, C padded continuation length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from exo2ego_jax.models import decode
from exo2ego_jax.models.mistral import KVCache
from input_pipeline.clip_cache import ClipCache
from input_pipeline.egobench import Clip, EvalItem
from input_pipeline.progress import bar as progress_bar
from input_pipeline.templates import (
    CLASS_QUESTION,
    DEFAULT_SYSTEM_PROMPT,
    DEFAULT_VIDEO_TOKEN,
    DESCRIBE_QUESTION,
    FIRST_PERSON_CUE,
    LETTERS,
    build_prompt,
    build_system_prompt,
    encode_conversation,
    letter_prompt,
)
from input_pipeline.video import load_clip, normalize_frames

FramesFn = Callable[[Clip], np.ndarray]  # -> CLIP-normalised float32[T, H, W, 3]
TASK_DETAILS = {
    "egoschema": "The video is a long first-person recording; questions ask about the whole "
    "activity.",
    "qaego4d_close": "Questions ask what the camera wearer did or where objects ended up.",
    "qaego4d_open": "Questions ask what the camera wearer did or where objects ended up; "
    "answer in a few words.",
    "egotaskqa": "Questions ask about the actions of the camera wearer and the state of objects.",
    "charades_ego": "The video shows an everyday action from the actor's own view.",
    "epic_mir": "The video shows a short kitchen action from the actor's own view.",
    "egoplan": "The video shows the progress of a task; choose the next step.",
    "vlnqa": "The video shows the camera wearer moving; answer about the motion.",
    "egomcq": "The video shows a short action from the actor's own view.",
}
_PAD_CONT = 16  # continuation lengths are padded to a multiple of this


def system_prompt(
    task_detail: str | None = None,
    first_person: bool = False,
    base: str | None = DEFAULT_SYSTEM_PROMPT,
) -> str | None:
    """The system prompt with the optional task-detail line and first-person cue."""
    if base is None and not task_detail and not first_person:
        return None
    cue = FIRST_PERSON_CUE if first_person else None
    return build_system_prompt(base or "", task_detail=task_detail, first_person_cue=cue)


def clip_frames_fn(config: Any, *, pad_to_square: bool = False) -> FramesFn:
    """Decode a clip as the model expects: ``config.num_frames`` frames at CLIP size.

    Frames are sampled as VideoLLaMA2's ``process_video`` (``input_pipeline.video``);
    ``pad_to_square`` pads instead of centre-cropping.
    """

    def frames(clip: Clip) -> np.ndarray:
        raw = load_clip(
            clip.path,
            clip.start,
            clip.end,
            num_frames=config.num_frames,
            size=config.clip.image_size,
            pad_to_square=pad_to_square,
        )
        return normalize_frames(raw)

    return frames


def _cached(fn: FramesFn, max_mb: float = 256) -> FramesFn:
    """``fn`` with a least-recently-used cache of ``max_mb`` MiB (several questions often share
    one clip; 11 clips at paper size, every EgoBench clip of the demo)."""
    cache = ClipCache(int(max_mb * 2**20))

    def frames(clip: Clip) -> np.ndarray:
        return cache.get(clip, lambda: np.asarray(fn(clip), np.float32))

    return frames


# ----------------------------------------------------------------------------- letters

_LETTER_PATTERNS = (
    # the whole reply is a letter: "C", "(B)", "c.", "[d]"
    r"^\s*[\(\[]?(?P<l>[{U}{L}])[\)\]]?\s*[.:,]?\s*$",
    # "Answer: C", "the answer is (B)", "Option D"
    r"(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*[\(\[]?(?P<l>[{U}])(?![A-Za-z])",
    # VideoLLaMA2: the first stand-alone capital letter, optionally bracketed: "(B) blue"
    r"(?<![A-Za-z])[\(\[]?(?P<l>[{U}])(?![A-Za-z])",
)


def extract_letter(text: str, num_options: int) -> int:
    """Option index named by a generated reply, or -1 if it names none.

    VideoLLaMA2's eval scripts take the first match of ``[\\(\\ ]*[A-E][\\)\\ ]*``, which
    reads "Answer: C" as A. Here, in order: a reply that is only a letter (any case,
    optional brackets / final punctuation); an "answer/option/choice (is)" phrase followed by
    a capital letter; the first capital letter not inside a word. Letters beyond
    ``num_options`` are ignored.
    """
    upper = LETTERS[:num_options]
    for pattern in _LETTER_PATTERNS:
        m = re.search(pattern.format(U=upper, L=upper.lower()), text)
        if m:
            return upper.index(m.group("l").upper())
    return -1


# ----------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class Request:
    """Score each of ``continuations`` as the answer to ``question`` about ``clip``."""

    clip: Clip
    question: str
    continuations: tuple[str, ...]


def _with_video(question: str) -> str:
    return question if DEFAULT_VIDEO_TOKEN in question else DEFAULT_VIDEO_TOKEN + question


class _Tokens:
    """Prompt and continuation token ids, memoised (MIR reuses one question for all clips)."""

    def __init__(self, tokenizer: Any, system: str | None, vti: int, include_eos: bool):
        self.tok, self.system, self.vti, self.include_eos = tokenizer, system, vti, include_eos
        self._prompts: dict[str, np.ndarray] = {}
        self._conts: dict[tuple[str, str], np.ndarray] = {}

    def prompt(self, question: str) -> np.ndarray:
        if question not in self._prompts:
            enc = build_prompt(self.tok, question, system=self.system, video_token_index=self.vti)
            self._prompts[question] = enc.input_ids
        return self._prompts[question]

    def continuation(self, question: str, answer: str) -> np.ndarray:
        """Tokens of ``" {answer} </s>"`` exactly as the training template tokenizes them."""
        key = (question, answer)
        if key not in self._conts:
            prompt = self.prompt(question)
            messages = [
                {"from": "human", "value": _with_video(question)},
                {"from": "gpt", "value": answer},
            ]
            full = encode_conversation(
                self.tok, messages, system=self.system, video_token_index=self.vti
            ).input_ids
            if len(full) <= len(prompt) or not np.array_equal(full[: len(prompt)], prompt):
                raise ValueError(
                    f"the tokenizer merges the answer {answer!r} into the prompt's last tokens, "
                    "so options cannot share one prompt prefix"
                )
            cont = full[len(prompt) :]
            if not self.include_eos:
                cont = self._strip_eos(cont)
            if cont.size == 0:
                raise ValueError(f"answer {answer!r} has no tokens")
            self._conts[key] = cont
        return self._conts[key]

    def _strip_eos(self, ids: np.ndarray) -> np.ndarray:
        ids = list(ids)
        if ids and ids[-1] == self.tok.eos_token_id:
            ids.pop()
        while ids and not self.tok.decode([ids[-1]]).strip():
            ids.pop()  # the space before </s>
        return np.asarray(ids, np.int32)


def _to_host(x: Any) -> np.ndarray:
    """A jitted output as numpy, also when it is sharded over other processes' devices.

    On a multi-host mesh a batch-sharded output cannot be read directly (only replicated ones
    can); every process then gathers it (a collective: all processes call this in lockstep).
    """
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


# ----------------------------------------------------------------------------- engine


@dataclasses.dataclass(frozen=True)
class _Engine:
    prefill: Callable
    rows: Callable
    full_logprobs: Callable
    embed: Callable  # (params, frames, ids, mask) -> (spliced embeds, mask)


@functools.lru_cache(maxsize=4)
def _engine(model: Any) -> _Engine:
    """The decode engine's prefill / extend (``models.decode``) jitted for scoring, once per
    model object: log-probabilities instead of logits, and rows over copies of a cache."""

    @functools.partial(jax.jit, static_argnames=("cache_len",))
    def prefill(params, frames, ids, mask, *, cache_len):
        """-> (log p of the first continuation token float[B, V], cache, lengths int[B])."""
        logits, cache, lengths = decode.prefill(
            model, params, frames, ids, mask, cache_len=cache_len
        )
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), cache, lengths

    @jax.jit
    def rows(params, first, cache, lengths, item, tokens):
        """Per-token log-probs ``float[R, C]`` of continuation rows ``tokens int[R, C]``.

        Row r continues prompt ``item[r]``: its tokens go to cache slots from that prompt's
        length on, over a copy of the prompt's cache (the prefix is never recomputed).
        """
        row_cache = KVCache(k=jnp.take(cache.k, item, axis=1), v=jnp.take(cache.v, item, axis=1))
        c = tokens.shape[1]
        positions = lengths[item][:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
        logits, _ = decode.llm_extend(model.llm, params["llm"], tokens, positions, row_cache)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        rest = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        head = first[item, tokens[:, 0]]
        return jnp.concatenate([head[:, None], rest], axis=1)

    @jax.jit
    def full_logprobs(params, frames, ids, mask):
        """Log-probs ``float[B, L', V]`` of a whole spliced sequence (naive reference)."""
        embeds, mask = decode.embed_prompt(model, params, frames, ids, mask)
        logits = model.lm_logits(params, embeds, mask)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    embed = functools.partial(decode.embed_prompt, model)
    return _Engine(prefill, rows, full_logprobs, jax.jit(embed))


def continuation_logprobs(
    model: Any,
    params: Any,
    tokenizer: Any,
    requests: Sequence[Request],
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    include_eos: bool = True,
    batch_size: int = 4,
    row_batch: int = 32,
    frames_fn: FramesFn | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> list[np.ndarray]:
    """Log-likelihood of every continuation of every request, with prefix reuse.

    Requests that ask the same question of the same clip share one prompt (EgoMCQ asks
    each clip once for all the narrations it is an option of). Per batch of ``batch_size``
    prompts: one prefill over the (right-padded) prompts with the visual tokens spliced in
    fills a KV cache; then every (prompt, continuation) pair is a row that runs only its own
    tokens over a copy of its prompt's cache, in chunks of ``row_batch`` rows.

    Returns:
      per request ``float64[K, 2]``: summed log-prob and token count of each continuation.
    """
    requests, where = _share_prompts(requests)
    cfg = model.config
    tokens = _Tokens(tokenizer, system, cfg.video_token_index, include_eos)
    frames_of = _cached(frames_fn or clip_frames_fn(cfg))
    engine = _engine(model)
    pad_id = int(tokenizer.pad_token_id)
    out: list[np.ndarray] = []
    batches = range(0, len(requests), batch_size)
    for b0 in progress_bar(batches, desc=desc, disable=not progress, unit="batch"):
        batch = list(requests[b0 : b0 + batch_size])
        n_real = len(batch)
        batch += [batch[0]] * (batch_size - n_real)  # fixed batch shape: one compilation
        prompts = [tokens.prompt(r.question) for r in batch]
        conts = [[tokens.continuation(r.question, c) for c in r.continuations] for r in batch]
        p = decode.bucket(max(len(x) for x in prompts))
        c = decode.bucket(max(len(x) for row in conts for x in row), _PAD_CONT)
        ids, mask = _pad_rows(prompts, p, pad_id)
        frames = np.stack([frames_of(r.clip) for r in batch])
        cache_len = decode.spliced_length(model, p) + c
        first, cache, lengths = engine.prefill(
            params, jnp.asarray(frames), jnp.asarray(ids), jnp.asarray(mask), cache_len=cache_len
        )
        pairs = [(i, k) for i in range(n_real) for k in range(len(conts[i]))]
        sums = [np.zeros((len(conts[i]), 2)) for i in range(n_real)]
        for r0 in range(0, len(pairs), row_batch):
            chunk = pairs[r0 : r0 + row_batch]
            chunk += [chunk[0]] * (row_batch - len(chunk))
            row_ids, row_mask = _pad_rows([conts[i][k] for i, k in chunk], c, pad_id)
            item = jnp.asarray([i for i, _ in chunk], jnp.int32)
            logp = _to_host(
                engine.rows(params, first, cache, lengths, item, jnp.asarray(row_ids))
            ).astype(np.float64)
            for r, (i, k) in enumerate(chunk[: min(row_batch, len(pairs) - r0)]):
                sums[i][k] = (np.sum(np.where(row_mask[r], logp[r], 0.0)), row_mask[r].sum())
        out.extend(sums)
    return [out[j][part] for j, part in where]


def _share_prompts(requests: Sequence[Request]) -> tuple[list[Request], list[tuple[int, slice]]]:
    """Requests merged by (clip, question), their continuations concatenated; per request,
    the merged request it went to and the slice of that request's continuations that is its."""
    merged: list[Request] = []
    index: dict[tuple[Clip, str], int] = {}
    where = []
    for r in requests:
        j = index.setdefault((r.clip, r.question), len(merged))
        if j == len(merged):
            merged.append(r)
            start = 0
        else:
            start = len(merged[j].continuations)
            merged[j] = dataclasses.replace(
                merged[j], continuations=merged[j].continuations + r.continuations
            )
        where.append((j, slice(start, start + len(r.continuations))))
    return merged, where


def naive_continuation_logprobs(
    model: Any,
    params: Any,
    tokenizer: Any,
    request: Request,
    frames: np.ndarray,
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    include_eos: bool = True,
) -> np.ndarray:
    """Reference for :func:`continuation_logprobs`: each option as one full sequence.

    Args:
      frames: ``float32[T, H, W, 3]`` CLIP-normalised frames of ``request.clip``.
    Returns:
      ``float64[K, 2]`` summed log-prob and token count per continuation.
    """
    cfg = model.config
    tokens = _Tokens(tokenizer, system, cfg.video_token_index, include_eos)
    prompt = tokens.prompt(request.question)
    conts = [tokens.continuation(request.question, c) for c in request.continuations]
    seqs = [np.concatenate([prompt, c]) for c in conts]
    length = decode.bucket(max(len(s) for s in seqs))  # fewer recompilations
    ids, mask = _pad_rows(seqs, length, int(tokenizer.pad_token_id))
    k = len(seqs)
    batch_frames = jnp.asarray(np.broadcast_to(frames, (k, *frames.shape)))
    logp = _to_host(
        _engine(model).full_logprobs(params, batch_frames, jnp.asarray(ids), jnp.asarray(mask))
    )
    start = len(prompt) - 1 + cfg.visual_tokens_in_prompt  # spliced index of the 1st answer token
    out = np.zeros((k, 2))
    for i, c in enumerate(conts):
        pos = start + np.arange(len(c))
        out[i] = (np.sum(logp[i, pos - 1, c]), len(c))
    return out


# ----------------------------------------------------------------------------- generation


def generate_texts(
    model: Any,
    params: Any,
    tokenizer: Any,
    clips: Sequence[Clip],
    questions: Sequence[str],
    *,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    max_new_tokens: int = 32,
    batch_size: int = 4,
    frames_fn: FramesFn | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy answers to ``questions`` about ``clips`` (decoded, special tokens dropped)."""
    cfg = model.config
    frames_of = _cached(frames_fn or clip_frames_fn(cfg))
    engine = _engine(model)
    pad_id = int(tokenizer.pad_token_id)
    texts: list[str] = []
    for b0 in progress_bar(range(0, len(clips), batch_size), desc=desc, disable=not progress):
        idx = list(range(b0, min(b0 + batch_size, len(clips))))
        n_real = len(idx)
        idx += [idx[0]] * (batch_size - n_real)
        prompts = [
            build_prompt(
                tokenizer, questions[i], system=system, video_token_index=cfg.video_token_index
            ).input_ids
            for i in idx
        ]
        ids, mask = _pad_rows(prompts, decode.bucket(max(map(len, prompts))), pad_id)
        frames = np.stack([frames_of(clips[i]) for i in idx])
        embeds, emask = engine.embed(
            params, jnp.asarray(frames), jnp.asarray(ids), jnp.asarray(mask)
        )
        out = decode.generate(
            model.llm,
            params["llm"],
            inputs_embeds=embeds,
            attention_mask=emask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        toks, lengths = _to_host(out.tokens), _to_host(out.lengths)
        for r in range(n_real):
            row = [t for t in toks[r, : lengths[r]].tolist() if t != tokenizer.eos_token_id]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


# ----------------------------------------------------------------------------- task modes


def _system(task_detail: str | None, first_person: bool, system: str | None) -> str | None:
    return system_prompt(task_detail, first_person, base=system)


def score_multiple_choice(
    model: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    task_detail: str | None = None,
    first_person: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    egomcq_question: str = DESCRIBE_QUESTION,
    **kwargs: Any,
) -> list[dict]:
    """Length-normalised log-likelihood MCQ; ``kwargs`` go to :func:`continuation_logprobs`.

    Each prediction holds ``scores`` (mean log-prob per token of each option),
    ``logprob_sums``, ``num_tokens``, ``pred_index`` (first best), ``answer_index``,
    ``correct`` and ``group``. EgoMCQ items (``option_clips``) score their query narration
    given each clip, asked with ``egomcq_question``.
    """
    system_text = _system(task_detail, first_person, system)
    requests, owner = [], []
    for n, it in enumerate(items):
        if it.option_clips:
            for clip in it.option_clips:
                requests.append(Request(clip, egomcq_question, (it.question,)))
                owner.append(n)
        else:
            if it.clip is None or len(it.options) < 2:
                raise ValueError(f"item {it.item_id!r} has no video or fewer than two options")
            requests.append(Request(it.clip, it.question, tuple(it.options)))
            owner.append(n)
    results = continuation_logprobs(
        model, params, tokenizer, requests, system=system_text, **kwargs
    )
    per_item: list[list[np.ndarray]] = [[] for _ in items]
    for n, res in zip(owner, results, strict=True):
        per_item[n].append(res)
    preds = []
    for it, parts in zip(items, per_item, strict=True):
        res = np.concatenate(parts, axis=0)  # [K, 2]
        mean = res[:, 0] / res[:, 1]
        pred = int(np.argmax(mean))
        preds.append(
            _mcq_record(
                it,
                pred,
                scores=mean.tolist(),
                logprob_sums=res[:, 0].tolist(),
                num_tokens=res[:, 1].astype(int).tolist(),
                mode="loglik",
            )
        )
    return preds


def _mcq_record(it: EvalItem, pred: int, **fields: Any) -> dict:
    correct = None if it.answer_index is None else bool(pred == it.answer_index)
    return {
        "task": it.task,
        "item_id": it.item_id,
        "group": it.group,
        **fields,
        "pred_index": pred,
        "answer_index": it.answer_index,
        "num_options": len(it.options),
        "correct": correct,
    }


def answer_with_letters(
    model: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    task_detail: str | None = None,
    first_person: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    max_new_tokens: int = 8,
    **kwargs: Any,
) -> list[dict]:
    """Letter generation (VideoLLaMA2's MCQA protocol); -1 when no letter is found."""
    if any(it.option_clips for it in items):
        raise ValueError("letter mode needs text options; EgoMCQ's options are clips")
    texts = generate_texts(
        model,
        params,
        tokenizer,
        [it.clip for it in items],
        [letter_prompt(it.question, it.options) for it in items],
        system=_system(task_detail, first_person, system),
        max_new_tokens=max_new_tokens,
        **kwargs,
    )
    return [
        _mcq_record(it, extract_letter(t, len(it.options)), output=t, mode="letter")
        for it, t in zip(items, texts, strict=True)
    ]


def score_classes(
    model: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    question: str = CLASS_QUESTION,
    task_detail: str | None = None,
    first_person: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    **kwargs: Any,
) -> list[dict]:
    """Charades-Ego: mean log-prob of every class name (``item.options``) per video."""
    requests = [Request(it.clip, question, tuple(it.options)) for it in items]
    results = continuation_logprobs(
        model,
        params,
        tokenizer,
        requests,
        system=_system(task_detail, first_person, system),
        **kwargs,
    )
    return [
        {
            "task": it.task,
            "item_id": it.item_id,
            "scores": (r[:, 0] / r[:, 1]).tolist(),
            "labels": list(it.labels),
        }
        for it, r in zip(items, results, strict=True)
    ]


def score_retrieval(
    model: Any,
    params: Any,
    tokenizer: Any,
    clips: Sequence[EvalItem],
    sentences: Sequence[str],
    *,
    question: str = DESCRIBE_QUESTION,
    task_detail: str | None = None,
    first_person: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    **kwargs: Any,
) -> list[dict]:
    """EPIC MIR: mean log-prob of every sentence given every clip (row of the similarity).

    O(len(clips) x len(sentences)) continuation rows; restrict the benchmark with
    ``RetrievalBenchmark.subset(max_clips)`` to bound it.
    """
    requests = [Request(it.clip, question, tuple(sentences)) for it in clips]
    results = continuation_logprobs(
        model,
        params,
        tokenizer,
        requests,
        system=_system(task_detail, first_person, system),
        **kwargs,
    )
    return [
        {"task": it.task, "item_id": it.item_id, "scores": (r[:, 0] / r[:, 1]).tolist()}
        for it, r in zip(clips, results, strict=True)
    ]


def answer_open(
    model: Any,
    params: Any,
    tokenizer: Any,
    items: Sequence[EvalItem],
    *,
    task_detail: str | None = None,
    first_person: bool = False,
    system: str | None = DEFAULT_SYSTEM_PROMPT,
    max_new_tokens: int = 32,
    **kwargs: Any,
) -> list[dict]:
    """Open-ended QA: a greedy answer per item (``prediction``) beside its ``answer``."""
    texts = generate_texts(
        model,
        params,
        tokenizer,
        [it.clip for it in items],
        [it.question for it in items],
        system=_system(task_detail, first_person, system),
        max_new_tokens=max_new_tokens,
        **kwargs,
    )
    return [
        {"task": it.task, "item_id": it.item_id, "prediction": t, "answer": it.answer_text}
        for it, t in zip(items, texts, strict=True)
    ]


def score_matrix(predictions: Sequence[dict], item_ids: Sequence[str]) -> np.ndarray:
    """``float[N, K]`` of the predictions' ``scores``, rows in ``item_ids`` order."""
    by_id = {p["item_id"]: p["scores"] for p in predictions}
    missing = [i for i in item_ids if i not in by_id]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} items, e.g. {missing[0]!r}")
    return np.asarray([by_id[i] for i in item_ids], np.float64)
