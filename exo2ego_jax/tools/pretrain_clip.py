r"""Pretrain the demo world's tiny CLIP vision tower on the *exocentric* web clips.

The paper's two encoders start from a pretrained CLIP ViT-L/14-336 (web images and their
text: third-person views). Nothing can be downloaded here, so the demo makes its own small
"pretrained CLIP" first, in the same spirit: the tiny tower is trained on frames of the
world's exo web video-text corpus only (``exo_clip_text``: third-person cameras, never an
ego view and never an EgoBench item), then saved as a Hugging Face ``CLIPVisionModel``
directory that the stages load exactly as they load the real one (``config.init.clip``).
Ego video is therefore out of its domain, which is the gap the paper's method addresses.

Objective: multi-label "which words does the caption use" (a bag-of-words tagging loss,
sigmoid cross-entropy over the tokenizer's vocabulary) from an attention-pooled read-out of
the tower's VideoLLaMA2 features (penultimate layer, class token dropped), so the features
the stages use are the ones that learn. The read-out head is discarded.

Clips are decoded once (``frames_per_clip`` frames each); every step samples
``num_frames`` of them in temporal order (a cheap augmentation).

    python -m exo2ego_jax.tools.pretrain_clip --data_dir demo_data/prepared \
        --out demo_data/prepared/clip [--steps 1200]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from exo2ego_jax.models import clip as clip_lib

#: Caption tokens that carry no visual content (newline, end of sentence) are not targets.
_IGNORED_PIECES = ("<0x0A>", "</s>", "<s>", "<unk>", "<pad>")


class TagHead(nn.Module):
    """Attention pooling over every patch of every frame, then an MLP to word logits.

    ``features float[B, T, N, W]`` -> ``logits float[B, V]``.
    """

    vocab_size: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        b, t, n, w = features.shape
        frame_pos = self.param("frame_pos", nn.initializers.normal(0.02), (t, w))
        x = nn.LayerNorm(name="norm")(features) + frame_pos[None, :, None, :]
        x = x.reshape(b, t * n, w)
        query = self.param("query", nn.initializers.normal(0.02), (4, w))  # 4 pooling heads
        scores = jnp.einsum("bsw,hw->bhs", x, query) / np.sqrt(w)
        pooled = jnp.einsum("bhs,bsw->bhw", jax.nn.softmax(scores, axis=-1), x).reshape(b, 4 * w)
        h = nn.gelu(nn.Dense(2 * w, name="hidden")(pooled))
        return nn.Dense(self.vocab_size, name="logits")(h)


def _clips(data_dir: Path, tok, frames_per_clip: int, image_size: int, dataset: str):
    """All clips of ``dataset`` decoded once: ``(frames float[C, F, S, S, 3], targets
    float[C, V])`` with the multi-hot of each caption's content tokens."""
    from input_pipeline.pipeline import PipelineOptions, make_pipeline  # noqa: PLC0415

    options = PipelineOptions(
        batch_size=1,
        num_frames=frames_per_clip,
        image_size=image_size,
        max_text_len=48,
        shuffle=False,
        num_epochs=1,
        shard_index=0,
        shard_count=1,
        workers=0,
    )
    ignored = {tok.convert_tokens_to_ids(p) for p in _IGNORED_PIECES}
    frames, targets = [], []
    for batch in make_pipeline("exo_caption", data_dir, tok, options, dataset=dataset):
        labels = batch["labels"][0]
        target = np.zeros(len(tok), np.float32)
        target[[int(i) for i in labels[labels >= 0] if int(i) not in ignored]] = 1.0
        frames.append(batch["frames"][0])
        targets.append(target)
    if not frames:
        raise ValueError(f"{data_dir}/{dataset}: no clips to pretrain the demo CLIP on")
    return np.stack(frames), np.stack(targets)


def pretrain(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    config: clip_lib.CLIPVisionConfig | None = None,
    dataset: str = "exo_clip_text",
    steps: int = 1200,
    batch_size: int = 16,
    num_frames: int = 4,
    frames_per_clip: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Trains the tower and writes a HF ``CLIPVisionModel`` directory to ``out_dir``.

    ``config`` defaults to the demo tower (``clip.tiny`` at 64 px, 8-px patches: an 8×8
    grid). Returns ``{"first_loss", "last_loss", "steps", "seconds", "clips", "f1"}``
    (``f1``: word-tagging F1 on the training clips at the end, a sanity figure).
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from exo2ego_jax.checkpoints.hf import save_clip_vision  # noqa: PLC0415
    from input_pipeline.tokenizer import load_tokenizer  # noqa: PLC0415

    data_dir = Path(data_dir)
    tok = load_tokenizer(Path(tokenizer_dir or data_dir / "tokenizer"))
    cfg = config or clip_lib.tiny(image_size=64, patch_size=8)
    t0 = time.time()
    frames, targets = _clips(data_dir, tok, frames_per_clip, cfg.image_size, dataset)
    tower, head = clip_lib.CLIPVisionTower(cfg), TagHead(len(tok))

    def forward(params, x):
        feats = clip_lib.clip_features(cfg, params["tower"], x)  # [B, T, N, W]
        return head.apply({"params": params["head"]}, feats)

    k_tower, k_head = jax.random.split(jax.random.key(seed))
    sample = jnp.zeros((1, num_frames, cfg.image_size, cfg.image_size, 3), jnp.float32)
    params = {
        "tower": jax.jit(tower.init)(k_tower, sample[:, 0])["params"],
        "head": head.init(k_head, jnp.zeros((1, num_frames, cfg.num_patches, cfg.hidden_size))),
    }
    params["head"] = params["head"]["params"]
    params = jax.tree.map(
        lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value")
    )
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.sigmoid_binary_cross_entropy(forward(p, x), y).sum(-1).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)

    def sample_batch() -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(frames), batch_size)
        picks = np.sort(
            np.stack([rng.choice(frames_per_clip, num_frames, replace=False) for _ in idx]), -1
        )
        return frames[idx[:, None], picks], targets[idx]

    first = loss = None
    bar = tqdm(range(steps), desc="demo CLIP pretraining", disable=not progress, dynamic_ncols=True)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, *sample_batch())
        if i == 0:
            first = float(loss)
        if i % 50 == 0 or i == steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")

    # Tagging F1 over the training clips (evenly spaced frames), threshold 0.5.
    even = np.linspace(0, frames_per_clip - 1, num_frames).round().astype(int)
    predict = jax.jit(lambda p, x: forward(p, x) > 0)
    pred = np.concatenate(
        [np.asarray(predict(params, frames[i : i + 64, even])) for i in range(0, len(frames), 64)]
    )
    tp = float((pred * targets).sum())
    f1 = 2 * tp / max(float(pred.sum() + targets.sum()), 1.0)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:  # written aside and renamed: an interruption never leaves a half checkpoint
        save_clip_vision(cfg, params["tower"], tmp / "model")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (tmp / "model").rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "first_loss": first,
        "last_loss": float(loss),
        "steps": steps,
        "seconds": time.time() - t0,
        "clips": len(frames),
        "f1": f1,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.tools.pretrain_clip", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--data_dir", required=True, help="prepared datasets (input_pipeline.prepare)")
    p.add_argument("--out", required=True, help="output HF CLIPVisionModel directory")
    p.add_argument("--dataset", default="exo_clip_text", help="prepared dataset of exo clips")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(clip_lib.tiny(), image_size=a.image_size, patch_size=a.patch_size)
    s = pretrain(
        a.data_dir,
        a.out,
        config=cfg,
        dataset=a.dataset,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        seed=a.seed,
    )
    print(
        f"demo CLIP: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']} steps on "
        f"{s['clips']} exo clips (tag F1 {s['f1']:.2f}, {s['seconds']:.0f}s); saved to {a.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
