"""Model scoring: prefix reuse == naive, controlled logits pick the expected option, letters."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from exo2ego_jax.eval import scoring as S
from exo2ego_jax.models import exo2ego, mistral
from input_pipeline.egobench import Clip, EvalItem
from input_pipeline.templates import (
    DEFAULT_SYSTEM_PROMPT,
    FIRST_PERSON_CUE,
    build_prompt,
    encode_conversation,
)
from input_pipeline.tokenizer import load_tokenizer, train_demo_tokenizer

TEXTS = [
    "What colour was the cup that I shook?",
    "Which way did I turn?",
    "red",
    "blue",
    "green",
    "the red cup",
    "the blue bowl",
    "in the green bowl",
    "turn left",
    "C picks up the red cup.",
] * 4

# ----------------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    "text, n, expect",
    [
        ("(B) blue", 4, 1),
        ("Answer: C", 4, 2),  # VideoLLaMA2's regex would read the A of "Answer"
        ("The answer is (D).", 4, 3),
        ("c.", 4, 2),
        ("B", 5, 1),
        ("[e]", 5, 4),
        ("E", 4, -1),  # beyond the options
        ("the red cup", 4, -1),  # no letter
        ("a red cup", 4, -1),  # a lower-case article is not an answer
        ("", 4, -1),
    ],
)
def test_extract_letter(text, n, expect):
    assert S.extract_letter(text, n) == expect


def test_prompts():
    assert S.letter_prompt("Which way?", ["left", "right"]) == (
        "Question: Which way?\nOptions:\n(A) left\n(B) right\nAnswer with the option's letter "
        "from the given choices directly and only give the best option."
    )
    assert S.system_prompt() == DEFAULT_SYSTEM_PROMPT
    full = S.system_prompt("Questions ask about the motion.", first_person=True)
    assert full == f"{DEFAULT_SYSTEM_PROMPT} Questions ask about the motion. {FIRST_PERSON_CUE}"
    assert S.system_prompt(base=None) is None


# ----------------------------------------------------------------------------- model fixtures


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Demo tokenizer + a tiny random Exo2Ego.

    Ego encoder only (``x_only``, no exo encoder, no F/G): scoring treats the visual tokens
    as an opaque prefix, and the smaller model halves init and compile time on CPU.
    """
    tok = load_tokenizer(train_demo_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), 400))
    llm = mistral.tiny(vocab_size=len(tok), initializer_range=0.2)
    cfg = exo2ego.tiny(llm=llm, with_exo=False, with_mapping=False, fusion="x_only")
    model = exo2ego.Exo2Ego(cfg)
    return tok, model, model.init(jax.random.key(0))


def frames_fn(clip: Clip) -> np.ndarray:
    """Deterministic random frames per clip (no video files needed)."""
    seed = int(hashlib.sha256(f"{clip.path}{clip.start}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=(4, 32, 32, 3)).astype(np.float32)


KW = dict(batch_size=2, row_batch=4, frames_fn=frames_fn, progress=False)
GEN = dict(batch_size=2, frames_fn=frames_fn, progress=False)


def unigram_params(params, alpha):
    """LLM params whose next-token logits equal ``alpha`` at every position.

    Every token embeds to the all-ones vector u (RMS 1) and attention / MLP outputs are
    zeroed, so the final hidden state is u everywhere; the LM head ``u alpha^T / D`` then
    maps it to ``alpha`` whatever the video or the text.
    """
    llm = jax.tree_util.tree_map(jnp.asarray, params["llm"])
    d = llm["embed_tokens"]["embedding"].shape[1]
    llm["embed_tokens"]["embedding"] = jnp.ones_like(llm["embed_tokens"]["embedding"])
    layers = llm["layers"]
    layers["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(
        layers["self_attn"]["o_proj"]["kernel"]
    )
    layers["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(layers["mlp"]["down_proj"]["kernel"])
    llm["norm"]["scale"] = jnp.ones_like(llm["norm"]["scale"])
    llm["lm_head"]["kernel"] = jnp.outer(jnp.ones(d), jnp.asarray(alpha, jnp.float32)) / d
    return {**params, "llm": llm}


def bigram_params(params, seed=0, scale=3.0):
    """LLM params whose logits at a position depend only on the token *at* that position.

    Attention and MLP outputs are zeroed, so the last hidden state at position t is
    ``RMSNorm(E[token_t]) * norm_scale``; a random embedding and head then give every token
    its own next-token distribution. A score read one position off (the logits of the token
    itself, or of the one after it) gives other numbers.
    """
    llm = jax.tree_util.tree_map(jnp.asarray, params["llm"])
    rng = np.random.default_rng(seed)
    emb = llm["embed_tokens"]["embedding"]
    llm["embed_tokens"]["embedding"] = jnp.asarray(rng.standard_normal(emb.shape), emb.dtype)
    layers = llm["layers"]
    for part, name in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        layers[part][name]["kernel"] = jnp.zeros_like(layers[part][name]["kernel"])
    norm = llm["norm"]["scale"]
    llm["norm"]["scale"] = jnp.asarray(1 + 0.3 * rng.standard_normal(norm.shape), norm.dtype)
    head = llm["lm_head"]["kernel"]
    llm["lm_head"]["kernel"] = jnp.asarray(
        scale * rng.standard_normal(head.shape) / np.sqrt(head.shape[0]), head.dtype
    )
    return {**params, "llm": llm}


def bigram_logprobs(model, params):
    """``float64[V, V]``: row a = log p(next token | current token a), by hand from the
    bigram params (RMSNorm, head, log-softmax in numpy)."""
    llm = params["llm"]
    e = np.asarray(llm["embed_tokens"]["embedding"], np.float64)
    h = e / np.sqrt((e * e).mean(-1, keepdims=True) + model.config.llm.rms_norm_eps)
    z = (h * np.asarray(llm["norm"]["scale"], np.float64)) @ np.asarray(
        llm["lm_head"]["kernel"], np.float64
    )
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def full_model_logprob(model, params, tok, question, answer, frames, system):
    """``(summed log-prob, tokens)`` of ``answer`` after ``question``: the whole conversation
    through the full model once (Exo2Ego.__call__), log-softmax of its logits in numpy,
    logits[t] scoring the token at t + 1 of the spliced sequence (labels mark the answer)."""
    prompt = build_prompt(tok, question, system=system).input_ids
    messages = [{"from": "human", "value": "<video>" + question}, {"from": "gpt", "value": answer}]
    full = np.asarray(encode_conversation(tok, messages, system=system).input_ids)
    labels = full.copy()
    labels[: len(prompt)] = -100
    logits, spliced = _forward(model)(
        params,
        jnp.asarray(frames)[None],
        jnp.asarray(full)[None],
        jnp.ones((1, len(full)), jnp.int32),
        jnp.asarray(labels)[None],
    )
    z = np.asarray(logits[0], np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    y = np.asarray(spliced[0])
    pos = np.nonzero(y[1:] != -100)[0]
    assert len(pos) == len(full) - len(prompt)
    return float(logp[pos, y[pos + 1]].sum()), len(pos)


_FORWARDS = {}


def _forward(model):
    if model not in _FORWARDS:
        _FORWARDS[model] = jax.jit(lambda p, f, i, m, lab: model(p, f, i, m, lab))
    return _FORWARDS[model]


def continuation_ids(tok, question, answer):
    """Answer tokens as the training template writes them (reference for the tests)."""
    prompt = build_prompt(tok, question).input_ids
    messages = [{"from": "human", "value": "<video>" + question}, {"from": "gpt", "value": answer}]
    full = encode_conversation(tok, messages).input_ids
    assert np.array_equal(full[: len(prompt)], prompt)
    return full[len(prompt) :]


def piece(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{text!r} is not one token: {ids}"
    return ids[0]


def mcq(item_id, question, options, answer, clip="a.mp4"):
    return EvalItem(
        "egotaskqa",
        item_id,
        Path(clip),
        question,
        options=tuple(options),
        answer_index=answer,
        answer_text=options[answer],
    )


# ----------------------------------------------------------------------------- prefix reuse


@pytest.mark.slow
def test_prefix_reuse_equals_naive_full_sequence(lm):
    tok, model, params = lm
    q1 = "What colour was the cup that I shook?"
    requests = [
        S.Request(Clip(Path("a.mp4")), q1, ("red", "the blue bowl", "in the green bowl")),
        S.Request(
            Clip(Path("b.mp4"), 1.0, 2.0),
            "Which way did I turn?",
            ("turn left", "C picks up the red cup.", "blue"),
        ),
    ]
    # two prompts of different lengths in one batch; 6 rows in chunks of 4
    got = S.continuation_logprobs(model, params, tok, requests, **KW)
    for req, res in zip(requests, got, strict=True):
        ref = S.naive_continuation_logprobs(model, params, tok, req, frames_fn(req.clip))
        hand = [
            full_model_logprob(
                model, params, tok, req.question, c, frames_fn(req.clip), S.system_prompt()
            )
            for c in req.continuations
        ]
        np.testing.assert_array_equal(res[:, 1], [n for _, n in hand])
        np.testing.assert_allclose(res[:, 0], [v for v, _ in hand], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(res[:, 1], ref[:, 1])  # same token counts
        np.testing.assert_allclose(res[:, 0], ref[:, 0], atol=1e-4, rtol=0)
        means = res[:, 0] / res[:, 1]
        np.testing.assert_allclose(means, ref[:, 0] / ref[:, 1], atol=1e-4, rtol=0)
    # the video matters: the same question about another clip scores differently
    other = S.continuation_logprobs(
        model, params, tok, [S.Request(Clip(Path("c.mp4")), q1, requests[0].continuations)], **KW
    )[0]
    assert np.abs(other[:, 0] - got[0][:, 0]).max() > 1e-3


def test_egomcq_scores_query_given_each_clip(lm):
    tok, model, params = lm
    clips = tuple(Clip(Path(f"clip{k}.mp4"), 0.0, 1.0) for k in range(3))
    item = EvalItem(
        "egomcq",
        "7",
        None,
        "C picks up the red cup.",
        options=("x", "y", "z"),
        answer_index=1,
        group="intra",
        option_clips=clips,
    )
    (pred,) = S.score_multiple_choice(model, params, tok, [item], **KW)
    # The query narration scored given each clip, by the full model (not the scorer).
    hand = [
        full_model_logprob(
            model, params, tok, S.DESCRIBE_QUESTION, item.question, frames_fn(c), S.system_prompt()
        )
        for c in clips
    ]
    expect = [v / n for v, n in hand]
    assert np.ptp(expect) > 1e-3  # the clips score differently: the order means something
    np.testing.assert_allclose(pred["scores"], expect, atol=1e-4, rtol=0)
    assert pred["num_tokens"] == [n for _, n in hand]
    assert pred["pred_index"] == int(np.argmax(expect)) and pred["group"] == "intra"
    assert pred["correct"] == (pred["pred_index"] == 1)


def test_requests_sharing_a_clip_and_question_share_one_prompt(lm, monkeypatch):
    # EgoMCQ: two items whose option clips overlap; each (clip, question) is prefilled once.
    tok, model, params = lm
    monkeypatch.setattr(S, "_cached", lambda fn: fn)  # one frames call per prompt prefilled
    clips = tuple(Clip(Path(f"clip{k}.mp4"), 0.0, 1.0) for k in range(3))
    queries = ("C picks up the red cup.", "C turns left.")
    items = [
        EvalItem("egomcq", str(n), None, q, options=("x", "y"), answer_index=0,
                 group="inter", option_clips=(clips[n], clips[2]))
        for n, q in enumerate(queries)
    ]  # fmt: skip
    fetched = []

    def counting_frames(clip):
        fetched.append(clip)
        return frames_fn(clip)

    kw = KW | dict(frames_fn=counting_frames, batch_size=1)
    preds = S.score_multiple_choice(model, params, tok, items, **kw)
    assert sorted(map(str, (c.path for c in fetched))) == [f"clip{k}.mp4" for k in range(3)]
    for it, pred in zip(items, preds, strict=True):
        hand = [
            full_model_logprob(
                model, params, tok, S.DESCRIBE_QUESTION, it.question, frames_fn(c),
                S.system_prompt(),
            )
            for c in it.option_clips
        ]  # fmt: skip
        np.testing.assert_allclose(pred["scores"], [v / n for v, n in hand], atol=1e-4, rtol=0)
        assert pred["num_tokens"] == [n for _, n in hand]


# ----------------------------------------------------------------------------- controlled logits


def test_controlled_logits_pick_the_expected_option(lm):
    tok, model, params = lm
    alpha = np.zeros(len(tok), np.float32)
    alpha[piece(tok, "blue")] = 6.0  # "▁blue": the model prefers options made of it
    p = unigram_params(params, alpha)
    q1, q2 = "What colour was the cup that I shook?", "Which way did I turn?"
    items = [
        mcq("a", q1, ["red", "blue", "green"], 1),
        mcq("b", q2, ["the blue bowl", "turn left", "the red cup"], 1, clip="b.mp4"),
    ]
    preds = S.score_multiple_choice(
        model, p, tok, items, task_detail="Questions ask about colours.", first_person=True, **KW
    )
    assert [r["pred_index"] for r in preds] == [1, 0]
    assert [r["correct"] for r in preds] == [True, False]
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(alpha)))
    system = S.system_prompt("Questions ask about colours.", True)
    for it, r in zip(items, preds, strict=True):
        for k, opt in enumerate(it.options):
            prompt = build_prompt(tok, it.question, system=system).input_ids
            messages = [
                {"from": "human", "value": "<video>" + it.question},
                {"from": "gpt", "value": opt},
            ]
            full = encode_conversation(tok, messages, system=system).input_ids
            ids = full[len(prompt) :]
            assert r["num_tokens"][k] == len(ids)
            assert r["scores"][k] == pytest.approx(logp[ids].mean(), abs=1e-4)
    assert set(preds[0]) >= {"task", "item_id", "scores", "pred_index", "answer_index", "correct"}

    classes = [
        EvalItem(
            "charades_ego", "v", Path("v.mp4"), "", options=("red", "blue", "green"), labels=(1,)
        )
    ]
    (cls,) = S.score_classes(model, p, tok, classes, **KW)
    assert int(np.argmax(cls["scores"])) == 1 and cls["labels"] == [1]
    clips = [mcq(f"c{i}", "", ["x", "y"], 0, clip=f"c{i}.mp4") for i in range(3)]
    rows = S.score_retrieval(model, p, tok, clips, ["red", "the blue bowl"], **KW)
    sim = S.score_matrix(rows, ["c0", "c1", "c2"])
    assert sim.shape == (3, 2) and (sim[:, 1] > sim[:, 0]).all()
    ref = logp[continuation_ids(tok, S.DESCRIBE_QUESTION, "red")].mean()
    np.testing.assert_allclose(sim[:, 0], ref, atol=1e-4)


def test_each_token_is_scored_by_the_previous_positions_logits(lm):
    """Bigram logits (they depend on the current token): every option's score must be
    sum_j log p(c_j | c_{j-1}) / n, with c_{-1} the prompt's last token, from a log-softmax
    written here; the scorer's numbers must also match the full model's (one forward over
    the whole conversation)."""
    tok, model, params = lm
    p = bigram_params(params)
    table = bigram_logprobs(model, p)
    items = [
        mcq(
            "a",
            "What colour was the cup that I shook?",
            ["the red cup", "in the green bowl", "blue"],
            0,
        ),
        mcq(
            "b",
            "Which way did I turn?",
            ["turn left", "C picks up the red cup.", "the blue bowl"],
            2,
            clip="b.mp4",
        ),
    ]
    preds = S.score_multiple_choice(model, p, tok, items, **KW)
    system = S.system_prompt()
    for it, r in zip(items, preds, strict=True):
        prompt = build_prompt(tok, it.question, system=system).input_ids
        want, shifted = [], []
        for k, opt in enumerate(it.options):
            messages = [
                {"from": "human", "value": "<video>" + it.question},
                {"from": "gpt", "value": opt},
            ]
            full = encode_conversation(tok, messages, system=system).input_ids
            cont, prev = full[len(prompt) :], full[len(prompt) - 1 : -1]
            assert len(cont) > 1 and r["num_tokens"][k] == len(cont)
            want.append(table[prev, cont].mean())
            shifted.append(table[cont, cont].mean())  # logits of the token itself
            hand = full_model_logprob(model, p, tok, it.question, opt, frames_fn(it.clip), system)
            assert hand[1] == len(cont)
            np.testing.assert_allclose(hand[0] / hand[1], want[-1], atol=1e-4, rtol=0)
        print(it.item_id, np.round(r["scores"], 4), np.round(want, 4), np.round(shifted, 4))
        np.testing.assert_allclose(r["scores"], want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(r["logprob_sums"], np.asarray(want) * r["num_tokens"], atol=1e-3)
        assert np.abs(np.asarray(want) - shifted).max() > 0.1  # an off-by-one is visible
        assert r["pred_index"] == int(np.argmax(want))


@pytest.mark.slow
def test_letter_mode_and_open_answers(lm):
    tok, model, params = lm
    alpha = np.zeros(len(tok), np.float32)
    alpha[tok.convert_tokens_to_ids("<0x42>")] = 8.0  # the byte "B"
    items = [
        mcq("a", "What colour was the cup that I shook?", ["red", "blue", "green"], 1),
        mcq("b", "Which way did I turn?", ["turn left", "turn right"], 0, clip="b.mp4"),
    ]
    preds = S.answer_with_letters(
        model, unigram_params(params, alpha), tok, items, max_new_tokens=1, **GEN
    )
    assert [(r["output"], r["pred_index"], r["correct"]) for r in preds] == [
        ("B", 1, True),
        ("B", 1, False),
    ]
    alpha[:] = 0.0
    alpha[piece(tok, "red")] = 8.0
    answers = S.answer_open(
        model, unigram_params(params, alpha), tok, items, max_new_tokens=1, **GEN
    )
    assert [(r["item_id"], r["prediction"], r["answer"]) for r in answers] == [
        ("a", "red", "blue"),
        ("b", "red", "turn left"),
    ]
    item = EvalItem("egomcq", "0", None, "q", option_clips=(Clip(Path("x")),) * 2)
    with pytest.raises(ValueError, match="EgoMCQ"):
        S.answer_with_letters(model, params, tok, [item])


def test_continuation_tokens_with_and_without_eos(lm):
    tok = lm[0]
    tokens = S._Tokens(tok, DEFAULT_SYSTEM_PROMPT, -201, include_eos=False)
    with_eos = S._Tokens(tok, DEFAULT_SYSTEM_PROMPT, -201, include_eos=True)
    q = "Which way did I turn?"
    assert with_eos.continuation(q, "red")[-1] == tok.eos_token_id
    short = tokens.continuation(q, "red")
    assert tok.decode(short).strip() == "red" and tok.eos_token_id not in short
