"""Templates token by token: plain and mistral layouts, label masks, truncation, padding."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from input_pipeline.templates import (
    DEFAULT_SYSTEM_PROMPT,
    FIRST_PERSON_CUE,
    IGNORE_INDEX,
    Encoded,
    build_prompt,
    build_system_prompt,
    encode_caption,
    encode_conversation,
    pad_batch,
    tokenize_multimodal,
)
from input_pipeline.tokenizer import load_tokenizer, train_demo_tokenizer

S = -201  # the video sentinel
X = IGNORE_INDEX
SYS = DEFAULT_SYSTEM_PROMPT
Q1, A1 = "What is C doing?", "C picks up the red cup"
Q2, A2 = "Where is the cup?", "On the table"
Q3, A3 = "What next?", "C opens the fridge"


def conv(*messages: str, roles: str = "hg" * 8) -> list[dict[str, str]]:
    names = {"h": "human", "g": "gpt"}
    pairs = zip(roles[: len(messages)], messages, strict=True)
    return [{"from": names[r], "value": m} for r, m in pairs]


def head(system: str) -> str:
    return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n"


# Every prompt below, written out independently of the library, as the tokenizers' corpus.
CORPUS = [
    f"<video>{A1}\n",
    f"{head('Be brief.')}<video>\n{Q1} [/INST] {A1} </s>",
    f"{head(SYS)}<video>\n{Q1} [/INST] {A1} </s>[INST] {Q2} [/INST] {A2} </s>"
    f"[INST] {Q3} [/INST] {A3} </s>",
    f"[INST] {Q1} [/INST] {A1} </s>[INST] <video>\n{Q2} [/INST] {A2} </s>",
    f"[INST] <video>\n{Q1} [/INST] {A1} </s>",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    """Word-level sentencepiece-style tokenizer: vocab large enough that every word of the
    corpus is one piece, so the expected pieces can be written down."""
    path = tmp_path_factory.mktemp("words")
    return load_tokenizer(train_demo_tokenizer(CORPUS, path, vocab_size=4000))


def pieces(text: str, prefix: bool = True) -> list[str]:
    """Expected pieces of ``text`` for the word-level tokenizer, as sentencepiece (legacy
    Llama/Mistral): "▁" before the text (``prefix``) and after "</s>", spaces become "▁",
    a newline is the byte token <0x0A>, and each word is one piece."""
    out: list[str] = []
    for k, seg in enumerate(re.split("(</s>)", text)):
        if seg == "</s>":
            out.append(seg)
        elif seg:
            seg = ("▁" if prefix or k else "") + seg.replace(" ", "▁")
            words = re.findall(r"\n|▁[^▁\n]*|[^▁\n]+", seg)
            out += ["<0x0A>" if w == "\n" else w for w in words]
    return out


def ids(tok, parts: list[tuple[list, bool]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of concatenated (pieces, supervised) parts; ints pass through."""
    input_ids, labels = [], []
    for part, supervised in parts:
        for p in part:
            i = p if isinstance(p, int) else tok.convert_tokens_to_ids(p)
            assert i != tok.unk_token_id, f"{p!r} is not a piece"
            input_ids.append(i)
            labels.append(i if supervised else X)
    return input_ids, labels


def check(enc: Encoded, expected: tuple[list[int], list[int]]) -> None:
    assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32
    assert enc.input_ids.tolist() == expected[0]
    assert enc.labels.tolist() == expected[1]
    assert (enc.input_ids == S).sum() == 1
    assert enc.labels[enc.input_ids == S].tolist() == [X]


# --- plain ------------------------------------------------------------------------------


def test_caption_token_by_token(tok) -> None:
    enc = encode_caption(tok, A1)
    expected_pieces = ["▁C", "▁picks", "▁up", "▁the", "▁red", "▁cup", "<0x0A>"]
    assert pieces(A1 + "\n") == expected_pieces
    check(enc, ids(tok, [(["<s>", S], False), (expected_pieces, True)]))
    # No EOS, as VideoLLaMA2's plain template.
    assert tok.eos_token_id not in enc.input_ids.tolist()


def test_plain_conversation_drops_the_question(tok) -> None:
    from_conv = encode_conversation(tok, conv(f"<video>\n{Q1}", A1), template="plain")
    check(
        from_conv,
        (encode_caption(tok, A1).input_ids.tolist(), encode_caption(tok, A1).labels.tolist()),
    )


# --- mistral ----------------------------------------------------------------------------


def test_mistral_single_turn_token_by_token(tok) -> None:
    enc = encode_conversation(tok, conv(f"<video>\n{Q1}", A1), system="Be brief.")
    prompt = ["<s>", "▁[INST]", "▁<<SYS>>", "<0x0A>", "Be", "▁brief.", "<0x0A>", "<</SYS>>"]
    prompt += ["<0x0A>", "<0x0A>", S, "▁", "<0x0A>", "What", "▁is", "▁C", "▁doing?", "▁[/INST]"]
    answer = ["▁C", "▁picks", "▁up", "▁the", "▁red", "▁cup", "▁", "</s>"]
    check(enc, ids(tok, [(prompt, False), (answer, True)]))


def test_mistral_multi_turn_supervises_each_answer(tok) -> None:
    # The placeholder is moved to the front of its message, followed by "\n".
    messages = conv(f"{Q1} <video>", A1, Q2, A2, Q3, A3)
    enc = encode_conversation(tok, messages)
    expected = ids(
        tok,
        [
            (["<s>"] + pieces(head(SYS)) + [S] + pieces(f"\n{Q1} [/INST]"), False),
            (pieces(f" {A1} </s>", prefix=False), True),
            (pieces(f"[INST] {Q2} [/INST]"), False),  # "▁[INST]": "▁" after "</s>" (legacy)
            (pieces(f" {A2} </s>", prefix=False), True),
            (pieces(f"[INST] {Q3} [/INST]"), False),
            (pieces(f" {A3} </s>", prefix=False), True),
        ],
    )
    check(enc, expected)
    assert (enc.input_ids == tok.eos_token_id).sum() == 3
    assert (enc.labels == tok.eos_token_id).sum() == 3


def test_no_system_block_and_video_in_a_later_turn(tok) -> None:
    enc = encode_conversation(tok, conv(Q1, A1, f"<video>\n{Q2}", A2), system=None)
    expected = ids(
        tok,
        [
            (["<s>"] + pieces(f"[INST] {Q1} [/INST]"), False),
            (pieces(f" {A1} </s>", prefix=False), True),
            (pieces("[INST] ") + [S] + pieces(f"\n{Q2} [/INST]"), False),
            (pieces(f" {A2} </s>", prefix=False), True),
        ],
    )
    check(enc, expected)


def test_build_prompt_ends_after_inst(tok) -> None:
    full = encode_conversation(tok, conv(f"<video>\n{Q1}", A1))
    prompt = build_prompt(tok, Q1)  # no placeholder given: put in front, as VideoLLaMA2
    n = len(prompt)
    assert prompt.input_ids.tolist() == full.input_ids[:n].tolist()
    assert tok.convert_ids_to_tokens(int(prompt.input_ids[-1])) == "▁[/INST]"
    assert full.labels[n - 1] == X and full.labels[n] != X  # the answer starts right after
    assert (prompt.labels == X).all()
    with_history = build_prompt(tok, Q2, history=[(f"<video>\n{Q1}", A1)])
    two_turns = encode_conversation(tok, conv(f"<video>\n{Q1}", A1, Q2, A2))
    m = len(with_history)
    assert with_history.input_ids.tolist() == two_turns.input_ids[:m].tolist()
    assert two_turns.labels[m - 1] == X and two_turns.labels[m] != X


def test_system_prompt_options(tok) -> None:
    system = build_system_prompt(
        task_detail="Answer about the video.", first_person_cue=FIRST_PERSON_CUE
    )
    assert system == f"{SYS} Answer about the video. You are the camera wearer."
    assert build_system_prompt() == SYS
    plain_words = build_system_prompt("Be brief.")
    enc = encode_conversation(tok, conv(f"<video>\n{Q1}", A1), system=plain_words)
    assert (
        enc.input_ids.tolist()
        == encode_conversation(
            tok, conv(f"<video>\n{Q1}", A1), system="Be brief."
        ).input_ids.tolist()
    )


def test_configurable_sentinel(tok) -> None:
    enc = encode_caption(tok, A1, video_token_index=-300)
    assert enc.input_ids[1] == -300 and (enc.input_ids == -300).sum() == 1
    other = encode_conversation(tok, conv(f"[VID]\n{Q1}", A1), video_token="[VID]")
    assert (
        other.input_ids.tolist()
        == encode_conversation(tok, conv(f"<video>\n{Q1}", A1)).input_ids.tolist()
    )
    with pytest.raises(ValueError, match="negative"):
        encode_caption(tok, A1, video_token_index=5)


# --- parity with VideoLLaMA2 v1.0's own tokenization and masking -------------------------


def videollama2_tokenize(tok, prompt: str) -> list[int]:
    """tokenizer_MMODAL_token with a BOS-adding tokenizer (reference, written for the test)."""
    chunks = [
        [tok.bos_token_id] + tok(c, add_special_tokens=False).input_ids
        for c in prompt.split("<video>")
    ]
    out = [tok.bos_token_id]
    for k, chunk in enumerate(chunks):
        out += ([S] if k else []) + chunk[1:]
    return out


def videollama2_llama2_labels(tok, conversation: str) -> tuple[list[int], list[int]]:
    """preprocess_llama2's masking: per round, mask len(tok(instruction + "[/INST] ")) - 2."""
    input_ids = videollama2_tokenize(tok, conversation)
    target = list(input_ids)
    cur = 1
    target[:cur] = [X]
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split("[/INST] ")
        assert len(parts) == 2
        round_len = len(videollama2_tokenize(tok, rou))  # its BOS stands for the "</s>"
        instruction_len = len(videollama2_tokenize(tok, parts[0] + "[/INST] ")) - 2
        target[cur : cur + instruction_len] = [X] * instruction_len
        cur += round_len
    assert cur == len(input_ids)  # VideoLLaMA2 would otherwise ignore the whole example
    return input_ids, target


def test_matches_videollama2_with_subword_tokenizer(tmp_path: Path) -> None:
    # A small vocab, so words split into several pieces.
    narrations = [A1, A2, A3, Q1, Q2, Q3, "C puts the cup down", "C walks to the door"]
    sub = load_tokenizer(train_demo_tokenizer(narrations * 4, tmp_path, vocab_size=330))
    assert len(sub.tokenize(" ".join([A1, A2, Q1]))) > len((" ".join([A1, A2, Q1])).split())

    text = f"{head(SYS)}<video>\n{Q1} [/INST] {A1} </s>[INST] {Q2} [/INST] {A2} </s>"
    enc = encode_conversation(sub, conv(f"<video>\n{Q1}", A1, Q2, A2))
    check(enc, videollama2_llama2_labels(sub, text))

    caption = encode_caption(sub, A1)
    reference = videollama2_tokenize(sub, f"<video>{A1}\n")
    check(caption, (reference, [X, X] + reference[2:]))


# --- truncation -------------------------------------------------------------------------


def test_truncation_drops_whole_turns(tok) -> None:
    messages = conv(f"<video>\n{Q1}", A1, Q2, A2, Q3, A3)
    full = encode_conversation(tok, messages)
    two = encode_conversation(tok, messages[:4])
    one = encode_conversation(tok, messages[:2])
    assert len(one) < len(two) < len(full)
    assert (
        encode_conversation(tok, messages, max_len=len(full)).input_ids.tolist()
        == full.input_ids.tolist()
    )
    for max_len, expected in [(len(full) - 1, two), (len(two), two), (len(two) - 1, one)]:
        got = encode_conversation(tok, messages, max_len=max_len)
        check(got, (expected.input_ids.tolist(), expected.labels.tolist()))


def test_truncation_cuts_the_tail(tok) -> None:
    messages = conv(f"<video>\n{Q1}", A1, Q2, A2)
    full = encode_conversation(tok, messages)
    one = encode_conversation(tok, messages[:2])
    # "tail": VideoLLaMA2's collator cut, even mid-answer.
    cut = encode_conversation(tok, messages, max_len=len(full) - 2, truncation="tail")
    check(cut, (full.input_ids[:-2].tolist(), full.labels[:-2].tolist()))
    # "turns" with even the first turn too long: its tail is cut, the placeholder kept.
    first_answer = int(np.argmax(one.labels != X))
    got = encode_conversation(tok, messages, max_len=first_answer + 1)
    check(
        got, (one.input_ids[: first_answer + 1].tolist(), one.labels[: first_answer + 1].tolist())
    )
    with pytest.raises(ValueError, match="not even the first answer fits"):
        encode_conversation(tok, messages, max_len=first_answer)
    # A placeholder in a later turn that the cut would lose.
    late = conv(Q1, A1, f"<video>\n{Q2}", A2)
    sentinel_at = int(np.argmax(encode_conversation(tok, late).input_ids == S))
    with pytest.raises(ValueError, match="placeholder does not fit"):
        encode_conversation(tok, late, max_len=sentinel_at)


def test_caption_truncation(tok) -> None:
    full = encode_caption(tok, A1)
    cut = encode_caption(tok, A1, max_len=4)
    check(cut, (full.input_ids[:4].tolist(), full.labels[:4].tolist()))
    with pytest.raises(ValueError, match="not even the first answer fits"):
        encode_caption(tok, A1, max_len=2)


# --- padding ----------------------------------------------------------------------------


def test_pad_batch_right_pads() -> None:
    a = Encoded(np.array([1, S, 7, 8], np.int32), np.array([X, X, 7, 8], np.int32))
    b = Encoded(np.array([1, S, 9], np.int32), np.array([X, X, 9], np.int32))
    batch = pad_batch([a, b], None, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, S, 7, 8], [1, S, 9, 0]]
    assert batch["labels"].tolist() == [[X, X, 7, 8], [X, X, 9, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    fixed = pad_batch([a, b], 6, pad_id=3)
    assert fixed["input_ids"].tolist() == [[1, S, 7, 8, 3, 3], [1, S, 9, 3, 3, 3]]
    assert fixed["labels"].tolist() == [[X, X, 7, 8, X, X], [X, X, 9, X, X, X]]
    assert fixed["attention_mask"].sum(1).tolist() == [4, 3]
    assert all(v.dtype == np.int32 and v.shape == (2, 6) for v in fixed.values())
    with pytest.raises(ValueError, match="more than max_len=3"):
        pad_batch([a, b], 3, pad_id=0)


def test_pad_batch_of_encoded_examples(tok) -> None:
    examples = [encode_caption(tok, A1), encode_conversation(tok, conv(f"<video>\n{Q1}", A1))]
    batch = pad_batch(examples, 64, tok.pad_token_id)
    for row, example in enumerate(examples):
        n = len(example)
        assert batch["input_ids"][row, :n].tolist() == example.input_ids.tolist()
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert (batch["labels"][row, n:] == X).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (64 - n)


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (conv(Q1, A1), "exactly one <video>, found 0"),
        (conv(f"<video><video>\n{Q1}", A1), "exactly one <video>, found 2"),
        (conv(f"<video>\n{Q1}", A1, f"<video>\n{Q2}", A2), "exactly one <video>, found 2"),
        (conv(f"<video>\n{Q1}", A1, roles="hh"), "alternate human/gpt"),
        (conv(A1, f"<video>\n{Q1}", roles="gh"), "alternate human/gpt"),
        (conv(f"<video>\n{Q1}", A1, Q2), "must end with a gpt answer"),
        (conv(f"<video>\n{Q1}", " "), "empty value"),
        (conv(Q1, f"<video> {A1}"), "only human ones may"),
        ([], "empty"),
    ],
)
def test_bad_conversations(tok, messages, match) -> None:
    with pytest.raises(ValueError, match=match):
        encode_conversation(tok, messages)


def test_bad_arguments(tok) -> None:
    good = conv(f"<video>\n{Q1}", A1)
    with pytest.raises(ValueError, match="unknown template"):
        encode_conversation(tok, good, template="llama3")
    with pytest.raises(ValueError, match="unknown truncation"):
        encode_conversation(tok, good, truncation="middle")
    with pytest.raises(ValueError, match="one human/gpt pair"):
        encode_conversation(tok, conv(f"<video>\n{Q1}", A1, Q2, A2), template="plain")
    with pytest.raises(ValueError, match="must not contain <video>"):
        encode_caption(tok, f"<video> {A1}")
    with pytest.raises(ValueError, match="non-empty"):
        encode_caption(tok, "")


def test_tokenize_multimodal_spans(tok) -> None:
    # Supervise the last word only: the token starting inside the span.
    enc = tokenize_multimodal(tok, "<video>C picks", [(len("<video>C"), len("<video>C picks"))])
    assert enc.input_ids.tolist() == [1, S] + tok.convert_tokens_to_ids(["▁C", "▁picks"])
    assert enc.labels.tolist() == [X, X, X, tok.convert_tokens_to_ids("▁picks")]
