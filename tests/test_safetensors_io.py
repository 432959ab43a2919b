"""The safetensors reader/writer against the reference `safetensors` package."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_config import read_hf_config
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource


def _reference_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b16": torch.randn(5, generator=g).bfloat16(),
        "h": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def _as_f32(a):
    return np.asarray(a).astype(np.float32)


def test_reads_reference_file_exactly(tmp_path):
    ref = _reference_tensors()
    save_file(ref, tmp_path / "model.safetensors")
    index = TensorSource(tmp_path)
    assert sorted(index.names()) == sorted(ref)
    assert index.dtype("b16") == np.dtype(ml_dtypes.bfloat16)
    assert index.shape("ids") == (2, 3)
    for name, t in ref.items():
        np.testing.assert_array_equal(_as_f32(index.get(name)), t.float().numpy())


def test_sharded_write_loads_with_reference_reader(tmp_path):
    ref = _reference_tensors()
    save_file(ref, tmp_path / "src.safetensors")
    src = TensorSource(tmp_path)
    out = write_safetensors(
        tmp_path / "out",
        ((n, src.get(n)) for n in src.names()),
        max_shard_bytes=40,
        config={"model_type": "x"},
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert json.loads((out / "config.json").read_text()) == {"model_type": "x"}
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    assert sorted(merged) == sorted(ref)
    for name, t in ref.items():
        assert merged[name].dtype == t.dtype
        torch.testing.assert_close(merged[name], t, rtol=0, atol=0)
    # and back through our reader
    again = TensorSource(out)
    for name, t in ref.items():
        np.testing.assert_array_equal(_as_f32(again.get(name)), t.float().numpy())


def test_single_shard_uses_plain_file_name(tmp_path):
    out = write_safetensors(tmp_path / "o", [("a", np.ones((2, 2), np.float32))])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    np.testing.assert_array_equal(
        load_file(out / "model.safetensors")["a"].numpy(), np.ones((2, 2))
    )


def test_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        TensorSource(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickled .bin files are not loaded"):
        TensorSource(tmp_path)
    save_file({"w": torch.ones(64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-16])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorSource(tmp_path)
    save_file({"w": torch.ones(64)}, tmp_path / "ok.safetensors")
    index = TensorSource(tmp_path / "ok.safetensors")
    with pytest.raises(CheckpointError, match="'nope' not found"):
        index.get("nope")
