r"""Pretrain the demo world's tiny CLIP vision tower on a labelled, freshly rendered corpus.

The paper's two encoders start from a pretrained CLIP ViT-L/14-336, which already knows
colours, objects and hands from hundreds of millions of web images seen from every kind of
viewpoint. Nothing can be downloaded here, so the demo makes its own small "pretrained
CLIP" first: the tiny tower is trained on :mod:`input_pipeline.synthetic.clip_corpus`,
clips of new takes (never a take of the world, so never a training or EgoBench clip) from the
world's head-mounted and fixed cameras, each labelled by the simulator with its verb, the
acted-on object's colour and shape, the target's colour and the direction. It is then saved as a
Hugging Face ``CLIPVisionModel`` directory that the stages load exactly as they load the
real one (``config.init.clip``); the stages keep it frozen, as VideoLLaMA2 does.
``--views exo`` pretrains on third-person clips only (ego video then lies outside the
tower's domain).

Objective: one softmax classifier per label field on an attention-pooled read-out of the
tower's VideoLLaMA2 features (penultimate layer, class token dropped), so the features the
stages use are the ones that learn; plus (``dense_weight``) dense supervision from the
simulator's geometry: per-patch linear probes of the same features name the colour and
shape of the object centred in each patch and find the acted-on object's patch. A clip label
alone teaches a from-scratch ViT slowly (one label per 256 patches); where-is-what in every
frame is the kind of knowledge a web-scale CLIP brings. Both heads are discarded.

Clips are decoded once (``frames_per_clip`` frames each); every step samples ``num_frames``
of them in temporal order (a cheap augmentation). The last ``val_fraction`` of the corpus
takes is held out for the reported accuracies.

    python -m exo2ego_jax.demo.pretrain_clip --out demo_data/prepared/clip \
        [--takes 1200] [--steps 8000] [--views ego exo]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from exo2ego_jax.demo.fit import fit
from exo2ego_jax.models import clip as clip_lib
from exo2ego_jax.weights.hf import save_clip_vision
from input_pipeline import atomic
from input_pipeline.synthetic.clip_corpus import LABELS, render_corpus


class ReadoutHead(nn.Module):
    """Attention pooling over every patch of every frame, then an MLP to the logits of every
    label field (concatenated).

    ``features float[B, T, N, W]`` -> ``logits float[B, num_outputs]``.
    """

    num_outputs: int
    num_queries: int = 4

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        b, t, n, w = features.shape
        frame_pos = self.param("frame_pos", nn.initializers.normal(0.02), (t, w))
        x = nn.LayerNorm(name="norm")(features) + frame_pos[None, :, None, :]
        x = x.reshape(b, t * n, w)
        query = self.param("query", nn.initializers.normal(0.02), (self.num_queries, w))
        scores = jnp.einsum("bsw,hw->bhs", x, query) / np.sqrt(w)
        pooled = jnp.einsum("bhs,bsw->bhw", jax.nn.softmax(scores, axis=-1), x)
        h = nn.gelu(nn.Dense(2 * w, name="hidden")(pooled.reshape(b, self.num_queries * w)))
        return nn.Dense(self.num_outputs, name="logits")(h)


class DenseHead(nn.Module):
    """Per-patch linear read-outs for dense supervision: the colour and shape of the object
    whose centre lies in each patch (0 = none), and which patch holds the acted-on object.

    ``features float[B, T, N, W]`` -> ``(color float[B, T, N, num_colors],
    shape float[B, T, N, num_shapes], where float[B, T, N + 1])`` (the last ``where`` logit:
    the acted-on object is not in the frame).
    """

    num_colors: int
    num_shapes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        nc, ns = self.num_colors, self.num_shapes
        out = nn.Dense(nc + ns + 1, name="proj")(nn.LayerNorm(name="norm")(features))
        absent = self.param("absent", nn.initializers.zeros, (1,))
        where = jnp.concatenate(
            [out[..., -1], jnp.broadcast_to(absent, out.shape[:-2] + (1,))], axis=-1
        )
        return out[..., :nc], out[..., nc : nc + ns], where


# Most patches hold no object centre; they count this much in the dense colour / shape loss.
_EMPTY_PATCH_WEIGHT = 0.1


def dense_targets(
    object_xy: np.ndarray, object_labels: np.ndarray, acted: np.ndarray, grid: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch targets of :class:`DenseHead` on a ``grid`` × ``grid`` patch grid.

    ``object_xy float[B, T, K, 2]``, ``object_labels int[B, K, 2]``, ``acted int[B]`` (as in
    :class:`input_pipeline.synthetic.clip_corpus.Corpus`) -> ``(color int32[B, T, N], shape
    int32[B, T, N], where int32[B, T])`` with ``N = grid²``: the colour / shape index of the
    object whose centre falls in each patch (0 = none; of two, either), and the patch of the
    acted-on object (``N`` when it is off the image or the step acts on none).
    """
    b, t, k, _ = object_xy.shape
    n = grid * grid
    seen = ~np.isnan(object_xy[..., 0])
    xy = np.where(seen[..., None], object_xy, 0.0)
    cell = (np.floor(xy[..., 1] * grid) * grid + np.floor(xy[..., 0] * grid)).astype(np.int32)
    color, shape = np.zeros((b, t, n), np.int32), np.zeros((b, t, n), np.int32)
    bi, ti, ki = np.nonzero(seen)
    color[bi, ti, cell[bi, ti, ki]] = object_labels[bi, ki, 0]
    shape[bi, ti, cell[bi, ti, ki]] = object_labels[bi, ki, 1]
    rows, a = np.arange(b)[:, None], np.maximum(acted, 0)[:, None]
    visible = seen[rows, np.arange(t)[None, :], a] & (acted >= 0)[:, None]
    where = np.where(visible, cell[rows, np.arange(t)[None, :], a], n).astype(np.int32)
    return color, shape, where


def _split_logits(logits: jax.Array, sizes: list[int]) -> list[jax.Array]:
    return jnp.split(logits, np.cumsum(sizes)[:-1], axis=-1)


def pretrain(
    out_dir: str | Path,
    *,
    config: clip_lib.CLIPVisionConfig | None = None,
    num_takes: int = 1200,
    views: tuple[str, ...] = ("ego", "exo"),
    steps: int = 8000,
    batch_size: int = 32,
    num_frames: int = 4,
    frames_per_clip: int = 8,
    lr: float = 1e-3,
    dense_weight: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    corpus=None,
) -> dict:
    """Renders the corpus, trains the tower and writes a HF ``CLIPVisionModel`` directory.

    ``config`` defaults to the demo tower (``clip.tiny`` at 64 px, 8-px patches: an 8×8
    grid). Returns ``{"first_loss", "last_loss", "steps", "seconds", "corpus_seconds", "clips",
    "val_clips", "accuracy", "accuracy_by_view"}``: ``seconds`` of the whole call, of which
    ``corpus_seconds`` rendering the corpus; ``accuracy`` maps each label field to its
    accuracy on the held-out takes' clips (evenly spaced frames), ``"all"`` to the share of
    clips with every field right; ``accuracy_by_view`` gives the same per camera kind
    (``"ego"`` / ``"exo"``). ``dense_weight`` scales the per-patch loss of
    :class:`DenseHead` (0 = off). ``corpus`` (an
    :class:`input_pipeline.synthetic.clip_corpus.Corpus`) is used instead of rendering one
    (``num_takes`` / ``views`` / ``frames_per_clip`` are then the corpus's)."""
    cfg = config or clip_lib.tiny(image_size=64, patch_size=8)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    t0 = time.time()
    if corpus is None:
        corpus = render_corpus(
            num_takes,
            seed,
            views=views,
            frames_per_clip=frames_per_clip,
            image_size=cfg.image_size,
            workers=workers,
            progress=progress,
        )
    corpus_seconds = time.time() - t0
    train_idx, val_idx = _split_takes(corpus, val_fraction)
    model = _Classifier(cfg, num_frames, dense_weight)
    result = fit(
        model.loss,
        model.init(seed),
        _sampler(corpus, train_idx, batch_size, num_frames, model.grid, seed),
        steps=steps,
        lr=lr,
        desc="demo CLIP pretraining",
        progress=progress,
    )
    params = result.params
    sizes = [len(v) for v in LABELS.values()]
    right = _right(model.forward, params, corpus.frames, corpus.labels, val_idx, num_frames, sizes)
    val_views = np.asarray(corpus.views)[val_idx]
    accuracy_by_view = {v: _accuracy(right[val_views == v]) for v in sorted(set(corpus.views))}

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic.staged_dir(out_dir) as stage:  # an interruption never leaves half a tower
        save_clip_vision(cfg, params["tower"], stage)
    return {
        "first_loss": result.first_loss,
        "last_loss": result.last_loss,
        "steps": steps,
        "seconds": time.time() - t0,
        "corpus_seconds": corpus_seconds,
        "clips": len(train_idx),
        "val_clips": len(val_idx),
        "accuracy": _accuracy(right),
        "accuracy_by_view": accuracy_by_view,
    }


def _split_takes(corpus, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train clip indices, held-out clip indices)``: the last ``val_fraction`` of the
    corpus's takes are held out (every clip of a take on one side)."""
    num_takes = int(corpus.takes.max()) + 1
    num_val = int(round(num_takes * val_fraction))
    is_val = corpus.takes >= num_takes - num_val
    train_idx, val_idx = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(train_idx) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} holds out all {num_takes} corpus takes; render more "
            "takes (num_takes) or lower val_fraction"
        )
    return train_idx, val_idx


class _Classifier:
    """The tower with its two heads: clip-level labels (:class:`ReadoutHead`) and, with
    ``dense_weight > 0``, what is where in every frame (:class:`DenseHead`)."""

    def __init__(self, cfg: clip_lib.CLIPVisionConfig, num_frames: int, dense_weight: float):
        self.cfg, self.num_frames, self.dense_weight = cfg, num_frames, dense_weight
        self.sizes = [len(v) for v in LABELS.values()]
        self.tower, self.head = clip_lib.CLIPVisionTower(cfg), ReadoutHead(sum(self.sizes))
        self.dense = DenseHead(len(LABELS["color"]), len(LABELS["shape"]))
        self.grid = cfg.image_size // cfg.patch_size

    def init(self, seed: int):
        cfg = self.cfg
        k_tower, k_head = jax.random.split(jax.random.key(seed))
        sample = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
        feats = jnp.zeros((1, self.num_frames, cfg.num_patches, cfg.hidden_size))
        params = {
            "tower": jax.jit(self.tower.init)(k_tower, sample)["params"],
            "head": self.head.init(k_head, feats)["params"],
            "dense": self.dense.init(k_head, feats[:, :1])["params"],
        }
        return nn.unbox(params)

    def features(self, params, x):  # uint8 frames, CLIP-normalised on the device
        return clip_lib.clip_features(self.cfg, params["tower"], x)  # [B, T, N, W]

    def forward(self, params, x):
        return self.head.apply({"params": params["head"]}, self.features(params, x))

    def loss(self, p, x, y, color, shape, where):
        ce = optax.softmax_cross_entropy_with_integer_labels
        feats = self.features(p, x)
        parts = _split_logits(self.head.apply({"params": p["head"]}, feats), self.sizes)
        loss = sum(ce(lg, y[:, k]).mean() for k, lg in enumerate(parts))
        if self.dense_weight:  # what is where in every frame: far more signal than a label
            c_logits, s_logits, w_logits = self.dense.apply({"params": p["dense"]}, feats)
            weight = jnp.where(color > 0, 1.0, _EMPTY_PATCH_WEIGHT)
            per_patch = ce(c_logits, color) + ce(s_logits, shape)
            loss_dense = (weight * per_patch).sum() / weight.sum() + ce(w_logits, where).mean()
            loss = loss + self.dense_weight * loss_dense
        return loss


def _sampler(corpus, train_idx, batch_size: int, num_frames: int, grid: int, seed: int):
    """``next_batch()`` of random training clips, ``num_frames`` random frames each (in
    order), with their labels and dense targets."""
    rng = np.random.default_rng(seed)
    frames = corpus.frames

    def sample_batch() -> tuple[np.ndarray, ...]:
        idx = rng.choice(train_idx, batch_size)
        picks = np.sort(
            np.stack([rng.choice(frames.shape[1], num_frames, replace=False) for _ in idx]), -1
        )
        xy = corpus.object_xy[idx[:, None], picks]
        targets = dense_targets(xy, corpus.object_labels[idx], corpus.acted[idx], grid)
        return frames[idx[:, None], picks], corpus.labels[idx], *targets

    return sample_batch


def _right(forward, params, frames, labels, idx, num_frames, sizes) -> np.ndarray:
    """``bool[len(idx), len(LABELS)]``: which fields ``forward`` gets right on clips ``idx``
    (evenly spaced frames)."""
    even = np.linspace(0, frames.shape[1] - 1, num_frames).round().astype(int)
    predict = jax.jit(
        lambda p, x: jnp.stack([lg.argmax(-1) for lg in _split_logits(forward(p, x), sizes)], -1)
    )
    pred = [
        np.asarray(predict(params, frames[idx[i : i + 64]][:, even]))
        for i in range(0, len(idx), 64)
    ]
    return np.concatenate(pred) == labels[idx] if pred else np.zeros((0, len(sizes)), bool)


def _accuracy(right: np.ndarray) -> dict[str, float]:
    """Per-field accuracy (and all-fields-right) from a :func:`_right` matrix."""
    if len(right) == 0:
        return {}
    out = {name: float(right[:, k].mean()) for k, name in enumerate(LABELS)}
    out["all"] = float(right.all(-1).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m exo2ego_jax.demo.pretrain_clip", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", required=True, help="output HF CLIPVisionModel directory")
    p.add_argument("--takes", type=int, default=1200, help="corpus takes to render")
    p.add_argument("--views", nargs="+", default=["ego", "exo"], choices=["ego", "exo"])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--patch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--dense_weight", type=float, default=1.0, help="weight of the per-patch loss (0 = off)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = dataclasses.replace(clip_lib.tiny(), image_size=a.image_size, patch_size=a.patch_size)
    s = pretrain(
        a.out,
        config=cfg,
        num_takes=a.takes,
        views=tuple(a.views),
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        dense_weight=a.dense_weight,
        seed=a.seed,
    )
    acc = ", ".join(f"{k} {v:.2f}" for k, v in s["accuracy"].items())
    for view, by_field in s["accuracy_by_view"].items():
        acc += f"; {view} clips: " + ", ".join(f"{k} {v:.2f}" for k, v in by_field.items())
    print(
        f"demo CLIP: loss {s['first_loss']:.3f} -> {s['last_loss']:.3f} in {s['steps']} steps on "
        f"{s['clips']} clips ({s['seconds']:.0f}s); held-out accuracy: {acc}; saved to {a.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
