"""Demo tokenizer (training, layout, round trip, AutoTokenizer) and load_tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
from tokenizers.processors import TemplateProcessing

from input_pipeline.tokenizer import BYTE_TOKENS, load_tokenizer, train_demo_tokenizer

NARRATIONS = [
    "C picks up the red cup",
    "C puts the red cup on the table",
    "C opens the fridge",
    "C cuts the onion with the knife",
    "What is C doing?",
    "Where did C put the cup?",
]
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_demo_tokenizer(NARRATIONS * 3, tmp_path_factory.mktemp("demo"), vocab_size=400)


def test_training_is_deterministic(demo_dir: Path, tmp_path: Path) -> None:
    again = train_demo_tokenizer(NARRATIONS * 3, tmp_path / "again", vocab_size=400)
    for name in FILES:
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_layout_and_special_ids(demo_dir: Path) -> None:
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("<unk>", "<s>", "</s>", "<pad>")] == [0, 1, 2, 3]
    assert [vocab[t] for t in BYTE_TOKENS] == list(range(4, 260))
    assert 300 < tok.get_vocab_size() <= 400
    # Sentencepiece-style: no learned piece has an inner "▁" or a newline.
    learned = [t for t, i in vocab.items() if i >= 260]
    assert all("▁" not in t[1:] and "\n" not in t for t in learned)
    # No BOS/EOS added; "</s>" in text is the EOS token; newline is a byte token.
    enc = tok.encode("C picks up the cup </s>\n")
    assert enc.tokens == ["▁C", "▁picks", "▁up", "▁the", "▁cup", "▁", "</s>", "▁", "<0x0A>"]
    assert enc.ids[6] == 2


def test_round_trip(demo_dir: Path) -> None:
    tok = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    for text in NARRATIONS + ["C  grabs\nthe mug.", "Ça va? 🙂 zebra", "line one\n\nline two"]:
        ids = tok.encode(text).ids
        assert 0 not in ids  # byte fallback: never <unk>
        assert tok.decode(ids) == text


def test_loads_with_auto_tokenizer(demo_dir: Path) -> None:
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(demo_dir)
    text = "C picks up the red cup </s>"
    assert hf(text).input_ids == raw.encode(text).ids  # nothing added
    ids = (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ids == (0, 1, 2, 3)
    asked = AutoTokenizer.from_pretrained(demo_dir, add_bos_token=True)
    assert asked(text).input_ids == [1] + raw.encode(text).ids
    assert hf.decode(hf(NARRATIONS[0]).input_ids) == NARRATIONS[0]


def test_load_tokenizer_demo_keeps_pad(demo_dir: Path) -> None:
    tok = load_tokenizer(demo_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    assert tok.padding_side == "right"


def test_vocab_size_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_demo_tokenizer(NARRATIONS, tmp_path, vocab_size=100)


# --- a Mistral-7B-Instruct-v0.2-style directory, built by hand -------------------------

WORDS = ["▁C", "▁picks", "▁up", "▁the", "▁cup", "▁[INST]", "▁[/INST]"]


def _write_mistral_style_dir(path: Path) -> dict[str, int]:
    """tokenizer.json laid out as Mistral's (legacy sentencepiece normalizer, BPE with byte
    fallback, BOS post-processor), a LlamaTokenizer config without pad token, and no
    <pad>. Pieces are whole words built by chained merges, so segmentation is obvious."""
    chars = sorted({c for w in WORDS for c in w})
    pieces, merges = [], []
    for word in WORDS:
        for k in range(2, len(word) + 1):
            if word[:k] not in pieces:
                pieces.append(word[:k])
                merges.append((word[: k - 1], word[k - 1]))
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(BYTE_TOKENS) + chars + pieces)}
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        **special_map,
        "add_bos_token": True,
        "add_eos_token": False,
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizer",
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return vocab


def test_load_mistral_style_pad_is_unk(tmp_path: Path) -> None:
    vocab = _write_mistral_style_dir(tmp_path / "mistral")
    tok = load_tokenizer(tmp_path / "mistral")
    assert tok.pad_token == "<unk>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 0, 0)
    # Verbatim tokenizer.json pipeline: "▁" is prepended after "</s>" too (legacy), and the
    # file's post-processor adds BOS by default, as Mistral's does.
    text = "C picks up the cup </s>[INST] C"
    pieces = ["<s>", "▁C", "▁picks", "▁up", "▁the", "▁cup", "▁", "</s>", "▁[INST]", "▁C"]
    assert tok(text).input_ids == [vocab[p] for p in pieces]
    raw = Tokenizer.from_file(str(tmp_path / "mistral" / "tokenizer.json"))
    assert tok(text).input_ids == raw.encode(text).ids


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*empty"):
        load_tokenizer(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load a tokenizer from .*broken"):
        load_tokenizer(broken)
