r"""Pretrain the demo world's tiny Mistral on the world's training text.

The paper starts every stage from a *pretrained* Mistral-7B-Instruct; nothing can be
downloaded here, so the demo makes its own small "pretrained LLM" first: a tiny Mistral
trained as a plain language model on the text of the training datasets (narrations,
captions, instructions and answers — never the held-out EgoBench items). It is saved as a
Hugging Face Mistral directory, so the stages load it exactly the way they load the real
model (``config.init.llm``).

    python -m exo2ego_jax.tools.pretrain_lm --data_dir demo_data/prepared \
        --out demo_data/prepared/llm [--steps 600]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from exo2ego_jax import losses
from exo2ego_jax.models import mistral as mistral_lib

#: The training datasets whose text the demo LM reads (EgoBench is held out).
TRAIN_TEXT = (
    ("ego_exo_clip", ("text",)),
    ("ego_clip", ("text",)),
    ("exo_clip_text", ("text",)),
)


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def training_text(data_dir: str | Path) -> Iterator[str]:
    """Narrations, captions and instruction turns of the prepared *training* datasets."""
    from input_pipeline.datasets import open_dataset  # noqa: PLC0415

    for name, keys in TRAIN_TEXT:
        source, _ = open_dataset(name, data_dir, "train")
        for i in range(len(source)):
            yield from (_s(source[i][k]) for k in keys)
    source, _ = open_dataset("ego_it", data_dir)
    for i in range(len(source)):
        turns = [_s(v).replace("<video>", "").strip() for v in source[i]["conversations"]["value"]]
        yield " ".join(turns)


def pack(token_lists: list[list[int]], seq_len: int, bos: int, eos: int) -> np.ndarray:
    """Concatenates ``<s> text </s>`` documents and cuts ``int32[N, seq_len]`` rows."""
    stream: list[int] = []
    for ids in token_lists:
        stream += [bos, *ids, eos]
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"only {len(stream)} tokens of text; need at least seq_len={seq_len}")
    return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    config: mistral_lib.MistralConfig | None = None,
    vocab_size: int = 1024,
    steps: int = 600,
    batch_size: int = 16,
    seq_len: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Trains the LM and writes an HF Mistral directory (plus the tokenizer) to ``out_dir``.

    ``vocab_size``: rows of the embedding table (the demo configs' ``model.vocab_size``;
    0 = exactly the tokenizer's size).

    Returns ``{"first_loss", "last_loss", "steps", "seconds"}``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from exo2ego_jax.weights.hf import save_mistral  # noqa: PLC0415
    from input_pipeline.tokenizer import load_tokenizer  # noqa: PLC0415

    data_dir = Path(data_dir)
    tokenizer_dir = Path(tokenizer_dir or data_dir / "tokenizer")
    tok = load_tokenizer(tokenizer_dir)
    texts = sorted(set(training_text(data_dir)))
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    rows = pack(ids, seq_len, tok.bos_token_id, tok.eos_token_id)
    cfg = config or mistral_lib.tiny(initializer_range=0.2)
    if vocab_size and vocab_size < len(tok):
        raise ValueError(f"vocab_size={vocab_size} < the tokenizer's {len(tok)} tokens")
    # The embedding table is sized like the stage configs' ``model.vocab_size`` (ids past
    # the tokenizer are never seen), so a small world's smaller tokenizer still loads.
    cfg = dataclasses.replace(cfg, vocab_size=vocab_size or len(tok))
    model = mistral_lib.MistralLM(cfg)
    rng = jax.random.key(seed)
    params = jax.jit(model.init)(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch).logits
            return losses.vtg_loss(logits, batch)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    order = np.random.default_rng(seed)
    t0, first, loss = time.time(), None, None
    bar = tqdm(range(steps), desc="demo LM pretraining", disable=not progress, dynamic_ncols=True)
    for i in bar:
        batch = jnp.asarray(rows[order.integers(0, len(rows), batch_size)])
        params, opt_state, loss = step(params, opt_state, batch)
        if i == 0:
            first = float(loss)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    last = float(loss)

    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_mistral(cfg, params, tmp / "model")
        for f in tokenizer_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / "model" / f.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (tmp / "model").rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "first_loss": first,
        "last_loss": last,
        "steps": steps,
        "seconds": time.time() - t0,
        "rows": int(len(rows)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.tools.pretrain_lm", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data_dir", required=True, help="prepared datasets (input_pipeline.prepare)")
    p.add_argument("--out", required=True, help="output HF Mistral directory")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    s = pretrain(
        a.data_dir,
        a.out,
        steps=a.steps,
        batch_size=a.batch_size,
        seq_len=a.seq_len,
        lr=a.lr,
        seed=a.seed,
    )
    print(
        f"demo LM: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']} steps "
        f"({s['seconds']:.0f}s); saved to {a.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
