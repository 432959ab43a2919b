"""Deterministic, checkpointable in-memory batch streams for training tests."""

from __future__ import annotations

import json

import numpy as np

from exo2ego_jax.training.streams import Stream


class CountingStream:
    """Batch ``i`` is a pure function of ``(seed, i)``; the state is the index (bytes JSON)."""

    def __init__(
        self,
        seed: int,
        batch: int,
        kind: str,
        *,
        num_frames=4,
        size=64,  # the demo config's model.image_size
        length=48,
        vocab=1024,
        nan_at: int | None = None,
    ):
        self.seed, self.batch, self.kind = seed, batch, kind
        self.shape = (batch, num_frames, size, size, 3)
        self.length, self.vocab, self.nan_at = length, vocab, nan_at
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.index])
        ids = rng.integers(3, self.vocab, (self.batch, self.length)).astype(np.int32)
        ids[:, 0], ids[:, 1] = 1, -201
        labels = ids.copy()
        labels[:, :2] = -100
        out = dict(input_ids=ids, labels=labels, attention_mask=np.ones_like(ids))
        frames = rng.normal(size=self.shape).astype(np.float32)
        if self.nan_at is not None and self.index >= self.nan_at:
            frames[:] = np.nan
        if self.kind == "pair":
            out.update(ego_frames=frames, exo_frames=frames[:, ::-1].copy())
        else:
            out["frames"] = frames
        self.index += 1
        return out

    # The protocol Grain's Orbax handler uses for non-Grain iterators.
    def get_state(self) -> bytes:
        return json.dumps({"index": self.index}).encode()

    def set_state(self, state: bytes) -> None:
        self.index = json.loads(state.decode())["index"]

    def start_prefetch(self) -> None:
        pass


def streams_for(stage: int, seed: int = 0, batch: int = 8, n: int = 64, **kw) -> dict:
    names = {
        0: ("ego_caption", "exo_caption"),
        1: ("exo_caption",),
        2: ("pair",),
        3: ("instruct",),
    }[stage]
    out = {}
    for i, name in enumerate(names):
        kind = "pair" if name == "pair" else "single"
        out[name] = Stream(CountingStream(seed + i, batch, kind, **kw), n)
    return out
