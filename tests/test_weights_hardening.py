"""Tampered checkpoints: every reader refuses them with one CheckpointError naming the problem.

Safetensors files are written by the reference ``safetensors`` library, then their header is
edited by hand; where the reference reader has an opinion, the test checks it refuses the
file too. ``config.json`` files are checked before any tensor is read or allocated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
from flax import traverse_util

from exo2ego_jax.models import clip, mistral
from exo2ego_jax.models import connector as connector_lib
from exo2ego_jax.models.connector import STCConnector
from exo2ego_jax.tools import convert
from exo2ego_jax.weights import hf_clip, hf_mistral, mm_projector
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf import load_clip_vision, load_mistral
from exo2ego_jax.weights.safetensors_format import INDEX_FILE, read_header, write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

# ----------------------------------------------------------------------------- safetensors


def _valid(path: Path) -> Path:
    """``a`` float32[2, 3] at bytes [0, 24), ``b`` float32[4] at [24, 40)."""
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    safetensors.numpy.save_file(tensors, path)
    return path


def _split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write(path: Path, header: bytes | dict, body: bytes, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


def _tampered(tmp_path: Path, edit) -> Path:
    """The valid file with ``edit(header, body) -> (header, body)`` applied."""
    header, body = _split(_valid(tmp_path / "ok.safetensors"))
    header, body = edit(header, body)
    return _write(tmp_path / "model.safetensors", header, body)


def _set(header: dict, name: str, **fields) -> dict:
    header[name] = {**header[name], **fields}
    return header


def _refused(path: Path, *words: str, reference: bool = True) -> str:
    """Asserts our reader (file and directory) refuses ``path`` with all ``words``; checks
    the reference reader refuses it too."""
    with pytest.raises(CheckpointError) as e:
        TensorSource(path)
    message = str(e.value)
    for w in (str(path), *words):
        assert w in message, (w, message)
    with pytest.raises(CheckpointError):
        TensorSource(path.parent)  # the directory reader goes through the same checks
    if reference:
        with pytest.raises(safetensors.SafetensorError):
            safetensors.numpy.load_file(path)
    return message


def test_a_valid_file_passes_and_reads_exactly(tmp_path):
    path = _valid(tmp_path / "model.safetensors")
    source = TensorSource(path)
    assert source.names() == ["a", "b"] and source.shape("a") == (2, 3)
    np.testing.assert_array_equal(source.read("a"), np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(source.read("a", 1, 2), [[3, 4, 5]])
    np.testing.assert_array_equal(source.get("b"), np.ones(4))
    entries, metadata = read_header(path)
    assert entries["b"].offset == path.stat().st_size - 16 and metadata == {}


def test_overlapping_offsets(tmp_path):
    # b starts inside a; its size still matches its shape (16 bytes), the file is unchanged.
    path = _tampered(tmp_path, lambda h, b: (_set(h, "b", data_offsets=[16, 32]), b))
    _refused(path, "tensor 'b'", "overlaps tensor 'a'")


def test_negative_offset(tmp_path):
    path = _tampered(tmp_path, lambda h, b: (_set(h, "a", data_offsets=[-24, 0]), b))
    _refused(path, "tensor 'a'", "negative data offset")


def test_offset_past_the_end(tmp_path):
    path = _tampered(tmp_path, lambda h, b: (_set(h, "b", shape=[8], data_offsets=[24, 56]), b))
    _refused(path, "tensor 'b'", "extends past the end of the file")


def test_gap_between_tensors(tmp_path):
    # b moved 8 bytes later, the file grown by 8: bytes [24, 32) belong to no tensor.
    path = _tampered(
        tmp_path, lambda h, b: (_set(h, "b", data_offsets=[32, 48]), b[:24] + bytes(8) + b[24:])
    )
    _refused(path, "gap of 8 bytes after tensor 'a'", "do not cover")


def test_bytes_after_the_last_tensor(tmp_path):
    path = _tampered(tmp_path, lambda h, b: (h, b + bytes(8)))
    _refused(path, "8 bytes after the last tensor are not covered")


def test_unknown_dtype(tmp_path):
    path = _tampered(tmp_path, lambda h, b: (_set(h, "a", dtype="F128"), b))
    _refused(path, "tensor 'a'", "unsupported dtype 'F128'")


def test_shape_does_not_match_byte_size(tmp_path):
    path = _tampered(tmp_path, lambda h, b: (_set(h, "a", shape=[3, 3]), b))
    _refused(path, "tensor 'a'", "hold 24 bytes", "needs 36", "does not match the shape")


@pytest.mark.parametrize("shape", [[2, -3], [2, 3.0], [True, 6], "23"])
def test_shape_entries_must_be_non_negative_ints(tmp_path, shape):
    path = _tampered(tmp_path, lambda h, b: (_set(h, "a", shape=shape), b))
    _refused(path, "tensor 'a'", "not a list of non-negative integers")


def test_header_length_larger_than_the_file(tmp_path):
    header, body = _split(_valid(tmp_path / "ok.safetensors"))
    size = 8 + len(json.dumps(header)) + len(body)
    path = _write(tmp_path / "model.safetensors", header, body, length=10 * size)
    _refused(path, "header length", "larger than the file")


def test_header_not_json(tmp_path):
    _, body = _split(_valid(tmp_path / "ok.safetensors"))
    path = _write(tmp_path / "model.safetensors", b'{"a": {"dtype": "F32", ', body)
    _refused(path, "header is not valid UTF-8 JSON")
    path = _write(tmp_path / "model.safetensors", b"\xff\xfe{}", body)
    _refused(path, "header is not valid UTF-8 JSON")
    path = _write(tmp_path / "model.safetensors", b"[" * 100_000 + b"]" * 100_000, body)
    _refused(path, "header is not valid UTF-8 JSON")  # too deep for json: no RecursionError


def test_header_not_an_object(tmp_path):
    _, body = _split(_valid(tmp_path / "ok.safetensors"))
    path = _write(tmp_path / "model.safetensors", b"[1, 2]", body)
    _refused(path, "header is a JSON list, not an object")


def test_duplicate_names_and_bad_metadata(tmp_path):
    _, body = _split(_valid(tmp_path / "ok.safetensors"))
    a = '{"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}'
    b = '{"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}'
    raw = f'{{"a": {a}, "b": {b}, "a": {a}}}'.encode()
    _refused(_write(tmp_path / "model.safetensors", raw, body), "names 'a' twice", reference=False)
    path = _tampered(tmp_path, lambda h, b: ({**h, "__metadata__": {"format": 1}}, b))
    _refused(path, "__metadata__", "not a map of strings")


def test_sharded_index_is_checked(tmp_path):
    write_safetensors(
        tmp_path / "ckpt",
        [("a", np.ones((4, 4), np.float32)), ("b", np.ones((4, 4), np.float32))],
        max_shard_bytes=64,
    )
    index_file = tmp_path / "ckpt" / INDEX_FILE
    index = json.loads(index_file.read_text())
    assert TensorSource(tmp_path / "ckpt").names() == ["a", "b"]
    escape = {**index, "weight_map": {**index["weight_map"], "a": "../outside.safetensors"}}
    index_file.write_text(json.dumps(escape))
    with pytest.raises(CheckpointError, match="'../outside.safetensors', which is not a file"):
        TensorSource(tmp_path / "ckpt")
    shards = sorted(set(index["weight_map"].values()))
    swapped = {**index, "weight_map": {"a": shards[1], "b": shards[0]}}
    index_file.write_text(json.dumps(swapped))
    with pytest.raises(CheckpointError, match="weight_map puts tensor 'a' in .*does not hold it"):
        TensorSource(tmp_path / "ckpt")
    index_file.write_text("[]")
    with pytest.raises(CheckpointError, match="needs a 'weight_map' object"):
        TensorSource(tmp_path / "ckpt")


def test_loaders_see_the_same_checks(tmp_path):
    """A tampered shard of a real checkpoint stops load_clip_vision with the same message."""
    cfg = clip.tiny()
    rng = np.random.default_rng(0)
    tensors = [
        (m.hf_names[i], rng.standard_normal(m.hf_shape).astype(np.float32))
        for m in hf_clip.param_mappings(cfg)
        for i in range(len(m.hf_names))
    ]
    d = write_safetensors(tmp_path / "clip", tensors, config=cfg.to_hf_config())
    load_clip_vision(d)  # valid
    file = d / "model.safetensors"
    header, body = _split(file)
    name = "vision_model.post_layernorm.bias"
    begin = header[name]["data_offsets"][0]
    overlapping = [begin - 4, begin - 4 + 4 * cfg.hidden_size]  # the right size, 4 bytes early
    _write(file, _set(header, name, data_offsets=overlapping), body)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}'.*overlaps"):
        load_clip_vision(d)


# ----------------------------------------------------------------------------- config.json


def _config_dir(tmp_path: Path, config: dict | str) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (d / "config.json").write_text(text)
    return d


MISTRAL = mistral.to_hf_config(mistral.tiny())
CLIP = clip.tiny().to_hf_config()


@pytest.mark.parametrize(
    "load, base, edit, words",
    [
        (load_mistral, MISTRAL, {"hidden_size": "64"}, "'hidden_size' must be an integer, got '6"),
        (load_mistral, MISTRAL, {"num_hidden_layers": 2.0}, "'num_hidden_layers' must be an int"),
        (load_mistral, MISTRAL, {"vocab_size": True}, "'vocab_size' must be an integer, got True"),
        (load_mistral, MISTRAL, {"intermediate_size": [96]}, "'intermediate_size' must be an"),
        (load_mistral, MISTRAL, {"rms_norm_eps": "1e-6"}, "'rms_norm_eps' must be a number"),
        (load_mistral, MISTRAL, {"rope_scaling": [1]}, "'rope_scaling' must be an object"),
        (load_mistral, MISTRAL, {"architectures": "Mistral"}, "'architectures' must be a list of"),
        (load_mistral, MISTRAL, {"vocab_size": None}, "'vocab_size' must be an integer, got None"),
        (load_clip_vision, CLIP, {"hidden_size": "64"}, "'hidden_size' must be an integer"),
        (load_clip_vision, CLIP, {"image_size": 32.5}, "'image_size' must be an integer"),
        (load_clip_vision, CLIP, {"hidden_act": 3}, "'hidden_act' must be a string"),
    ],
)  # fmt: skip
def test_config_field_of_the_wrong_type(tmp_path, load, base, edit, words):
    d = _config_dir(tmp_path, {**base, **edit})
    with pytest.raises(CheckpointError) as e:
        load(d)
    assert f"{d / 'config.json'}: field {words}" in str(e.value), str(e.value)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_attention_heads"])
def test_config_missing_field(tmp_path, field):
    d = _config_dir(tmp_path, {k: v for k, v in MISTRAL.items() if k != field})
    with pytest.raises(CheckpointError, match=f"config.json: required field '{field}' is missing"):
        load_mistral(d)


@pytest.mark.parametrize(
    "load, base, edit, field",
    [
        (load_mistral, MISTRAL, {"hidden_size": 10**12}, "hidden_size"),
        (load_mistral, MISTRAL, {"vocab_size": 2**40}, "vocab_size"),
        (load_mistral, MISTRAL, {"num_hidden_layers": 0}, "num_hidden_layers"),
        (load_mistral, MISTRAL, {"intermediate_size": -5}, "intermediate_size"),
        (load_mistral, MISTRAL, {"rope_theta": 1e300}, "rope_theta"),
        (load_clip_vision, CLIP, {"hidden_size": 10**12}, "hidden_size"),
        (load_clip_vision, CLIP, {"image_size": 10**9}, "image_size"),
    ],
)
def test_config_absurd_size(tmp_path, load, base, edit, field):
    d = _config_dir(tmp_path, {**base, **edit})
    with pytest.raises(CheckpointError, match=f"field '{field}' = .* outside its sane range"):
        load(d)


@pytest.mark.parametrize(
    "load, base, edit, words",
    [
        (load_mistral, MISTRAL, {"num_attention_heads": 5, "head_dim": None},
         "'hidden_size' = 64 is not divisible by 'num_attention_heads' = 5"),
        (load_mistral, MISTRAL, {"num_key_value_heads": 3},
         "'num_attention_heads' = 4 is not divisible by 'num_key_value_heads' = 3"),
        (load_clip_vision, CLIP, {"num_attention_heads": 5},
         "'hidden_size' = 64 is not divisible by 'num_attention_heads' = 5"),
        (load_clip_vision, CLIP, {"patch_size": 5},
         "'image_size' = 32 is not divisible by 'patch_size' = 5"),
    ],
)  # fmt: skip
def test_config_heads_not_dividing(tmp_path, load, base, edit, words):
    d = _config_dir(tmp_path, {**base, **edit})
    with pytest.raises(CheckpointError) as e:
        load(d)
    assert words in str(e.value) and str(d / "config.json") in str(e.value)


def test_config_not_an_object_and_clip_vision_config(tmp_path):
    d = _config_dir(tmp_path, "[1, 2]")
    with pytest.raises(CheckpointError, match="config.json: a JSON list, not an object"):
        load_mistral(d)
    d = _config_dir(tmp_path, {"model_type": "clip", "vision_config": "big"})
    with pytest.raises(CheckpointError, match="vision_config: must be an object"):
        load_clip_vision(d)
    d = _config_dir(tmp_path, {"model_type": "clip", "vision_config": {**CLIP, "hidden_size": "x"}})
    with pytest.raises(CheckpointError, match="config.json vision_config: field 'hidden_size'"):
        load_clip_vision(d)


def test_converter_checks_config_too(tmp_path):
    d = _config_dir(tmp_path, {**MISTRAL, "hidden_size": 10**12})
    with pytest.raises(CheckpointError, match="'hidden_size' = 1000000000000 is outside"):
        convert.convert(tmp_path / "out", llm=d, progress=False)
    assert not (tmp_path / "out").exists()
    assert convert.main([f"--llm={d}", f"--out={tmp_path / 'out'}", "--no_progress"]) == 2


# ----------------------------------------------------------------------------- PyTorch .bin


class _Payload:
    """Pickles as a call to ``os.mkdir``: what a hostile .bin would run on unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_torch_bin_with_a_pickled_object_is_refused_unrun(tmp_path):
    marker = tmp_path / "code_ran"
    state = {"s1.b1.conv1.conv.weight": torch.zeros(2, 2, 1, 1), "evil": _Payload(marker)}
    torch.save(state, tmp_path / "mm_projector.bin")
    for read in (TensorSource, mm_projector.load_mm_projector):
        with pytest.raises(CheckpointError) as e:
            read(tmp_path / "mm_projector.bin")
        message = str(e.value)
        assert "mm_projector.bin: cannot read as a PyTorch state dict" in message
        assert "weights_only=True" in message and "posix.mkdir" in message
    with pytest.raises(CheckpointError, match="mm_projector.bin: cannot read"):
        convert.convert(tmp_path / "out", projector=tmp_path, progress=False)
    assert not marker.exists()  # refused, never run


def test_torch_bin_that_is_not_a_state_dict_of_tensors(tmp_path):
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "a.bin")
    with pytest.raises(CheckpointError, match=r"a\.bin: tensor 'step' is of type int; expected"):
        TensorSource(tmp_path / "a.bin")
    torch.save([torch.ones(2)], tmp_path / "b.bin")
    with pytest.raises(CheckpointError, match=r"b\.bin: expected a state dict of tensors, got"):
        TensorSource(tmp_path / "b.bin")
    torch.save({"w": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match=r"c\.bin: tensor 'w': unsupported PyTorch tensor"):
        TensorSource(tmp_path / "c.bin")


# ----------------------------------------------------------------------------- mapping tables


def _abstract(module, *inputs) -> dict[str, tuple[int, ...]]:
    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs))["params"]
    return {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep="/").items()}


@pytest.mark.parametrize("scan", [True, False])
def test_mapping_tables_match_the_modules(scan):
    """Every table's parameter shapes are the module's own (checked with eval_shape only)."""
    cases = [
        (
            hf_clip.param_mappings(clip.tiny(scan_layers=scan)),
            clip.CLIPVisionTower(clip.tiny(scan_layers=scan)),
            (jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),),
        ),
        (
            hf_mistral.param_mappings(mistral.tiny(scan_layers=scan)),
            mistral.MistralLM(mistral.tiny(scan_layers=scan)),
            (jax.ShapeDtypeStruct((1, 4), jnp.int32),),
        ),
        (
            mm_projector.param_mappings(connector_lib.tiny()),
            STCConnector(connector_lib.tiny()),
            (jax.ShapeDtypeStruct((1, 4, 36, 32), jnp.float32),),
        ),
    ]
    for mappings, module, inputs in cases:
        want = _abstract(module, *inputs)
        got = {"/".join(m.path): m.param_shape for m in mappings}
        assert got == want, type(module).__name__
        for m in mappings:  # the layout rule is its own inverse
            a = np.arange(np.prod(m.hf_shape)).reshape(m.hf_shape)
            np.testing.assert_array_equal(m.to_hf(m.to_ours(a)), a)


def test_tied_mistral_has_no_lm_head_mapping():
    config = dataclasses.replace(mistral.tiny(), tie_word_embeddings=True)
    assert all(m.path != ("lm_head", "kernel") for m in hf_mistral.param_mappings(config))
