"""Tokenizers: a small Mistral-style demo tokenizer, and one loader for it and for Mistral's.

The demo tokenizer is a miniature of Mistral-7B-Instruct-v0.2's ``tokenizer.json``: a BPE
model with byte fallback (``<0x00>`` .. ``<0xFF>``), a sentencepiece-style normalizer that
prepends ``▁`` to every text segment and turns spaces into ``▁`` (no pre-tokenizer), and the
matching decoder. Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3, the 256 byte tokens
4..259, then the learned pieces. Like sentencepiece, no learned piece contains ``▁`` past its
first character or a newline (newlines are byte tokens, ``<0x0A>``, as in Mistral).

Unlike Mistral's, ``encode`` adds no BOS/EOS by default; ask with ``add_bos_token=True`` when
loading. The templates in :mod:`input_pipeline.templates` place BOS themselves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from input_pipeline.templates import template_text

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2, 3
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))  # ids 4 .. 259
SPIECE_UNDERLINE = "▁"
DEFAULT_VOCAB_SIZE = 1024
_MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + 16

# Never part of a learned piece: the specials (added tokens, split out before the BPE runs)
# and the video placeholder (the templates split it out before tokenizing).
_UNTOKENIZED = (*SPECIAL_TOKENS, "<video>")
_WORD_RE = re.compile(f"{SPIECE_UNDERLINE}[^{SPIECE_UNDERLINE}]*|[^{SPIECE_UNDERLINE}]+")


def _training_words(text: str) -> list[str]:
    """Split ``text`` into the units the demo tokenizer's BPE sees at run time.

    Mirrors the run-time pipeline: special tokens and placeholders cut the text into
    segments, each segment gets the sentencepiece dummy prefix ``▁`` and has its spaces
    replaced by ``▁``; newlines are byte tokens and so never part of a piece. A word is a
    maximal run starting at a ``▁`` (or at the start of a line).
    """
    pattern = "|".join(re.escape(t) for t in _UNTOKENIZED)
    words: list[str] = []
    for segment in re.split(pattern, text):
        if not segment:
            continue
        normalized = SPIECE_UNDERLINE + segment.replace(" ", SPIECE_UNDERLINE)
        for line in normalized.split("\n"):
            words.extend(_WORD_RE.findall(line))
    return words


def _learn_bpe(texts: Iterable[str], vocab_size: int) -> tuple[list[str], list[list[str]]]:
    """Learn pieces and merges on the pre-split words of ``texts``.

    Returns the learned pieces in id order (alphabet first, then merges) and the merges.
    """
    # Words contain no whitespace, so joining with spaces and splitting on whitespace hands
    # the trainer exactly the run-time words.
    corpus = (" ".join(_training_words(text)) for text in texts)
    bpe = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),  # the trainer's count includes the specials
        special_tokens=list(SPECIAL_TOKENS),
        # Rarer characters are left to byte fallback, so vocab_size is a true bound.
        limit_alphabet=vocab_size - len(BYTE_TOKENS) - len(SPECIAL_TOKENS),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    skip = set(SPECIAL_TOKENS) | set(BYTE_TOKENS)
    pieces = [p for p, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1]) if p not in skip]
    return pieces, [list(m) for m in model["merges"]]


def _assemble(pieces: list[str], merges: list[list[str]]):
    """Build the run-time ``tokenizers.Tokenizer`` (Mistral tokenizer.json layout)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces))}
    model = models.BPE(
        vocab=vocab,
        merges=[tuple(m) for m in merges],
        unk_token=UNK_TOKEN,
        fuse_unk=True,
        byte_fallback=True,
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)]
    )
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),  # drop the dummy prefix's space
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def train_demo_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    add_template_text: bool = True,
    model_max_length: int = 2048,
) -> Path:
    """Train the demo tokenizer on ``texts`` and save it as a HF tokenizer directory.

    Args:
      texts: training text (narrations, questions, answers, ...). ``<video>`` placeholders
        and special-token strings in it are skipped, as the templates never tokenize them.
      out_dir: directory to create or overwrite ``tokenizer.json``,
        ``tokenizer_config.json`` and ``special_tokens_map.json`` in.
      vocab_size: upper bound on the vocabulary, specials and the 256 byte tokens included.
        Training stops earlier when every word is a single piece; characters that do not
        fit in the alphabet are left to byte fallback.
      add_template_text: also train on the prompt templates' fixed text (``[INST]``,
        ``<<SYS>>``, the default system prompt, ...).
      model_max_length: written to ``tokenizer_config.json``.

    Returns:
      ``out_dir`` as a Path. Same inputs give byte-identical files.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: need >= {_MIN_VOCAB_SIZE}")
    texts = list(texts)
    if add_template_text:
        texts += template_text()
    pieces, merges = _learn_bpe(texts, vocab_size)
    tok = _assemble(pieces, merges)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=True)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    special_map["pad_token"] = PAD_TOKEN
    _write_json(out / "special_tokens_map.json", special_map)
    config = {
        **special_map,
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as written
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "right",
    }
    _write_json(out / "tokenizer_config.json", config)
    return out


def load_tokenizer(path: str | Path, *, verbatim: bool = True) -> PreTrainedTokenizerBase:
    """Load the demo tokenizer or a real Mistral tokenizer directory.

    Args:
      path: a directory with ``tokenizer.json`` (preferred) or ``tokenizer.model``, plus the
        usual ``tokenizer_config.json`` / ``special_tokens_map.json``.
      verbatim: when ``tokenizer.json`` exists, run its pipeline exactly as written (what
        transformers 4.41, which VideoLLaMA2 v1.0 trained with, did). Transformers 5
        otherwise rebuilds a ``LlamaTokenizer``'s pre-tokenizer from the config's ``legacy``
        flag, which changes the ids after special tokens (``</s>[INST]``) for Mistral.
        False: plain ``AutoTokenizer``.

    Returns:
      A fast transformers tokenizer with ``bos_token_id``, ``eos_token_id`` and
      ``pad_token_id`` set. With no pad token (Mistral has none), pad = unk, as VideoLLaMA2.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    has_json = (path / "tokenizer.json").is_file()
    if not has_json and not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected tokenizer.json or tokenizer.model"
        )

    loader = PreTrainedTokenizerFast if has_json and verbatim else AutoTokenizer
    try:
        tok = loader.from_pretrained(str(path))
    except Exception as e:  # many failure types; all re-raised with the path
        hint = "" if has_json else " (a tokenizer.model alone needs the sentencepiece package)"
        raise ValueError(f"could not load a tokenizer from {path}{hint}: {e}") from e

    for name in ("bos", "eos"):
        if getattr(tok, f"{name}_token_id") is None:
            raise ValueError(f"tokenizer in {path} has no {name} token")
    if tok.pad_token is None:
        if tok.unk_token is None:
            raise ValueError(f"tokenizer in {path} has neither a pad nor an unk token")
        tok.pad_token = tok.unk_token
    tok.padding_side = "right"
    return tok
