"""Streaming conversion (tools/convert.py) and the sharded loader (weights/converted.py).

Fast tests use tiny transformers checkpoints; ``test_peak_memory_of_a_multi_gib_conversion``
(slow) measures the converter's peak RSS on a synthetic ~2.6 GiB sharded Mistral.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from hf_helpers import norm_weights_distinct, perturb_

from exo2ego_jax import sharding as sh
from exo2ego_jax.models import connector as connector_lib
from exo2ego_jax.models import exo2ego
from exo2ego_jax.models.clip import CLIPVisionConfig
from exo2ego_jax.models.lora import LoRAConfig
from exo2ego_jax.models.mistral import from_hf_config
from exo2ego_jax.tools import convert
from exo2ego_jax.weights import converted, hf
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.mm_projector import load_mm_projector, param_mappings
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

# Sizes differ from each other everywhere, so a wrong transpose or reshape cannot pass.
TINY_CLIP = dict(
    image_size=32,
    patch_size=8,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
)
TINY_MISTRAL = dict(
    vocab_size=136,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    sliding_window=None,
)


def flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny HF CLIP + sharded HF Mistral (index.json) + VideoLLaMA2 projector."""
    root = tmp_path_factory.mktemp("convert_sources")
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY_CLIP))
    with torch.no_grad():  # HF inits norms to 1 / biases to 0: make every tensor distinct
        for p in clip.parameters():
            p.add_(0.1 * torch.randn_like(p))
    clip.save_pretrained(root / "clip")
    llm = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY_MISTRAL))
    perturb_(llm, seed=0)  # every RMSNorm weight != 1 and distinct per layer
    assert norm_weights_distinct(llm) and norm_weights_distinct(clip)
    llm.save_pretrained(root / "llm", max_shard_size="40KB")
    assert (root / "llm" / "model.safetensors.index.json").is_file()
    # Random projector tensors in VideoLLaMA2's names and layouts (no connector init to compile).
    cfg = connector_lib.tiny(in_channels=48, out_size=64)
    rng = np.random.default_rng(3)
    tensors = [
        (m.hf_names[0], rng.standard_normal(m.hf_shape).astype(np.float32))
        for m in param_mappings(cfg)
    ]
    write_safetensors(root / "proj", tensors)
    os.replace(root / "proj" / "model.safetensors", root / "mm_projector.safetensors")
    return {
        "clip": root / "clip",
        "llm": root / "llm",
        "projector": root / "mm_projector.safetensors",
    }


def model_for(sources, lora: bool = True) -> exo2ego.Exo2Ego:
    """An Exo2Ego whose CLIP / LLM / connector shapes match the tiny sources."""
    clip = CLIPVisionConfig.from_hf_config(
        json.loads((sources["clip"] / "config.json").read_text())
    )
    llm = from_hf_config(json.loads((sources["llm"] / "config.json").read_text()))
    cfg = exo2ego.tiny(
        clip=clip,
        llm=llm,
        connector=connector_lib.tiny(in_channels=48, out_size=64),
    )
    if lora:
        cfg = exo2ego.with_lora(cfg, LoRAConfig(rank=4, alpha=8.0))
    return exo2ego.Exo2Ego(cfg)


@pytest.fixture(scope="module")
def converted_dir(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "ckpt"
    summary = convert.convert(
        out, sources["clip"], sources["llm"], sources["projector"], progress=False
    )
    assert summary["num_tensors"] == len(converted.read_metadata(out)[0])
    return out


def expected_tree(sources, dtype=jnp.float32) -> dict:
    """What the host loaders give, at the Exo2Ego paths."""
    clip = flat(hf.load_clip_vision(sources["clip"], dtype)[1])
    llm = flat(hf.load_mistral(sources["llm"], dtype)[1])
    proj = flat(load_mm_projector(sources["projector"], dtype)[1])
    out = {f"llm/{k}": v for k, v in llm.items()}
    for sub in ("ego_encoder/clip", "exo_encoder/clip"):
        out.update({f"{sub}/{k}": v for k, v in clip.items()})
    out.update({f"exo_encoder/connector/{k}": v for k, v in proj.items()})
    return out


def random_params(model, mesh, rules, seed=0):
    """Stand-in for ``shard_init`` (same shapes, dtypes and shardings; no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a, s: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), s),
        model.abstract_params(),
        sh.param_shardings(model, mesh, rules),
    )


def test_restore_onto_mesh_equals_host_loaders(sources, converted_dir):
    model = model_for(sources)
    mesh = sh.make_mesh((1, 8, 1))
    rules = sh.rules_for("fsdp")
    params = random_params(model, mesh, rules)
    init = {k: np.asarray(v) for k, v in flat(params).items()}
    shardings = flat(sh.param_shardings(model, mesh, rules))

    restored, paths = converted.restore_converted(converted_dir, params)
    want = expected_tree(sources)
    assert sorted(paths) == sorted(want)
    got = flat(restored)
    assert set(got) == set(init)
    for k, v in got.items():
        assert v.sharding == shardings[k], k
        assert v.dtype == init[k].dtype, k
        if k in want:
            assert np.array_equal(np.asarray(v), np.asarray(want[k])), k
        else:  # F, G, the ego connector, LoRA adapters: as initialised
            assert np.array_equal(np.asarray(v), init[k]), k
    assert any(k.endswith("lora_a") for k in got) and "ego_encoder/connector" not in str(paths)
    # Something is actually sharded 8 ways (not everything replicated).
    q = got["llm/layers/self_attn/q_proj/kernel"]
    assert q.addressable_shards[0].data.shape[1] == q.shape[1] // 8

    # Only the converted subset, straight from the model + mesh + preset.
    subset = flat(converted.load_converted(converted_dir, model, mesh, "fsdp"))
    assert sorted(subset) == sorted(want)
    for k, v in subset.items():
        assert v.sharding == shardings[k] and np.array_equal(np.asarray(v), want[k]), k


def test_bfloat16_conversion_and_donation(sources, tmp_path):
    out = tmp_path / "bf16"
    convert.convert(out, llm=sources["llm"], dtype="bfloat16", progress=False)
    _, info = converted.read_metadata(out)
    assert info["dtype"] == "bfloat16" and set(info["sources"]) == {"llm"}
    model = model_for(sources, lora=False)
    mesh = sh.make_mesh((1, 2, 4))
    rules = sh.rules_for("fsdp_tp")
    params = random_params(model, mesh, rules)
    old_q = params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]
    restored, paths = converted.restore_converted(out, params, donate=True)
    assert old_q.is_deleted() and all(p.startswith("llm/") for p in paths)
    want = flat(hf.load_mistral(sources["llm"], jnp.bfloat16)[1])
    shardings = flat(sh.param_shardings(model, mesh, rules))
    for k, v in want.items():
        got = flat(restored)[f"llm/{k}"]
        assert got.dtype == jnp.float32 and got.sharding == shardings[f"llm/{k}"]
        assert np.array_equal(np.asarray(got), np.asarray(v, np.float32)), k


def test_build_params_restores_init_converted(tmp_path):
    """The trainer's path: ``config.init.converted`` -> ``runtime.build_params``."""
    import flax.linen as nn

    from configs import stage0
    from exo2ego_jax import config_lib, runtime
    from exo2ego_jax.weights.hf_clip import save_clip_vision
    from exo2ego_jax.weights.hf_mistral import save_mistral

    c = stage0.get_config("demo")
    c.init.llm = c.init.clip = ""
    c.init.stages = ()
    model = exo2ego.Exo2Ego(config_lib.build_model_config(c.model))
    abstract = model.abstract_params()
    rng = np.random.default_rng(1)
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    save_clip_vision(model.config.clip, values["exo_encoder"]["clip"], tmp_path / "clip")
    save_mistral(model.config.llm, values["llm"], tmp_path / "llm")
    convert.convert(tmp_path / "conv", tmp_path / "clip", tmp_path / "llm", progress=False)
    c.init.converted = str(tmp_path / "conv")

    mesh, rules = sh.make_mesh((1, 8, 1)), sh.rules_for(c.mesh.rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        resolved = config_lib.resolve(c)
        params, shardings = runtime.build_params(resolved, model, mesh, pretrained={})
    values["ego_encoder"]["clip"] = values["exo_encoder"]["clip"]  # one tower, both encoders
    want = flat(values)
    n = 0
    for k, v in flat(params).items():
        assert v.sharding == flat(shardings)[k], k
        if k.startswith(("llm/", "ego_encoder/clip/", "exo_encoder/clip/")):
            assert np.array_equal(np.asarray(v), want[k]), k
            n += 1
    assert n == len(converted.read_metadata(tmp_path / "conv")[0])


def test_projector_from_prefixed_torch_bin(sources, tmp_path):
    """A PyTorch ``mm_projector.bin`` (keys as in a full VideoLLaMA2 state dict) converts to
    the same values as the safetensors file."""
    src = TensorSource(sources["projector"])
    state = {f"model.mm_projector.{n}": torch.from_numpy(src.read(n)) for n in src.names()}
    torch.save(state, tmp_path / "mm_projector.bin")
    out = tmp_path / "conv"
    convert.convert(out, projector=tmp_path / "mm_projector.bin", progress=False)
    saved, _ = converted.read_metadata(out)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    got = converted.restore_leaves(
        out, {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=one) for k, (s, _) in saved.items()}
    )
    want = flat(load_mm_projector(sources["projector"])[1])
    assert sorted(got) == sorted(f"exo_encoder/connector/{k}" for k in want)
    for k, v in want.items():
        assert np.array_equal(np.asarray(got[f"exo_encoder/connector/{k}"]), np.asarray(v)), k


def _copy_without(src: Path, dst: Path, drop: str | None = None, reshape: str | None = None):
    """A copy of an HF dir with one tensor dropped or given a wrong shape."""
    index = TensorSource(src)
    tensors = []
    for n in index.names():
        if n == drop:
            continue
        a = np.array(index.get(n))
        if n == reshape:
            a = a[:-1]
        tensors.append((n, a))
    write_safetensors(dst, tensors, config=json.loads((src / "config.json").read_text()))
    return dst


def test_errors_name_file_and_tensor(sources, tmp_path):
    bad = _copy_without(
        sources["llm"], tmp_path / "missing", drop="model.layers.1.mlp.up_proj.weight"
    )
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*not found"):
        convert.convert(tmp_path / "o1", llm=bad, progress=False)
    name = next(
        n for n in TensorSource(sources["clip"]).names() if n.endswith("post_layernorm.bias")
    )
    bad = _copy_without(sources["clip"], tmp_path / "shape", reshape=name)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape"):
        convert.convert(tmp_path / "o2", clip=bad, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # The command line reports the same message and exits with 2.
    rc = convert.main([f"--llm={tmp_path / 'missing'}", f"--out={tmp_path / 'o3'}"])
    assert rc == 2
    with pytest.raises(ValueError, match="nothing to convert"):
        convert.convert(tmp_path / "o4", progress=False)


def test_unknown_tensors_are_refused_by_loader_and_converter(sources, tmp_path):
    """``hf_mistral.unused_tensors``: one rule for the host loader and the streaming converter."""
    index = TensorSource(sources["llm"])
    config = json.loads((sources["llm"] / "config.json").read_text())
    tensors = [(n, np.array(index.get(n))) for n in index.names()]
    # A rotary inv_freq buffer (old HF checkpoints carry it) is recomputed, not a leftover.
    ok = tmp_path / "with_inv_freq"
    inv_freq = ("model.layers.0.self_attn.rotary_emb.inv_freq", np.ones(4, np.float32))
    write_safetensors(ok, [*tensors, inv_freq], config=config)
    hf.load_mistral(ok)
    convert.convert(tmp_path / "o_ok", llm=ok, progress=False)
    bad = tmp_path / "with_extra"
    write_safetensors(
        bad, [*tensors, ("model.extra.weight", np.ones(3, np.float32))], config=config
    )
    with pytest.raises(CheckpointError, match=r"1 tensors do not belong.*model\.extra\.weight"):
        hf.load_mistral(bad)
    with pytest.raises(CheckpointError, match=r"1 tensors do not belong.*model\.extra\.weight"):
        convert.convert(tmp_path / "o_bad", llm=bad, progress=False)
    assert not (tmp_path / "o_bad").exists()


def test_interrupted_conversion_leaves_no_checkpoint(sources, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    original = convert.Leaf.blocks
    calls = {"n": 0}

    def failing(self):
        for item in original(self):
            calls["n"] += 1
            if calls["n"] == 20:
                raise OSError("disk full (simulated)")
            yield item

    monkeypatch.setattr(convert.Leaf, "blocks", failing)
    with pytest.raises(Exception, match="disk full"):
        convert.convert(out, sources["clip"], sources["llm"], progress=False)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the hidden temporary directory is gone too
    with pytest.raises(CheckpointError, match="no such converted checkpoint"):
        converted.read_metadata(out)

    monkeypatch.setattr(convert.Leaf, "blocks", original)
    convert.convert(out, llm=sources["llm"], progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert.convert(out, clip=sources["clip"], progress=False)
    convert.convert(out, clip=sources["clip"], progress=False, overwrite=True)
    assert set(converted.read_metadata(out)[1]["sources"]) == {"clip"}
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_loader_errors(sources, converted_dir, tmp_path):
    model = model_for(sources)
    mesh = sh.make_mesh((1, 8, 1))
    abstract = model.abstract_params()
    shardings = sh.param_shardings(model, mesh, "fsdp")
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    # A model whose LLM is wider than the checkpoint's.
    small = flat(target)
    k = "llm/norm/scale"
    small[k] = jax.ShapeDtypeStruct((65,), jnp.float32, sharding=small[k].sharding)
    with pytest.raises(CheckpointError, match=r"llm/norm/scale has shape \(64,\).*\(65,\)"):
        converted.restore_converted(converted_dir, traverse_util.unflatten_dict(small, sep="/"))
    # An ego-only model has no exo_encoder: those tensors are skipped, the rest restored.
    no_exo = {k: v for k, v in target.items() if k != "exo_encoder"}
    out, paths = converted.restore_converted(converted_dir, no_exo)
    assert paths and not any(p.startswith("exo_encoder") for p in paths)
    assert isinstance(flat(out)["llm/norm/scale"], jax.Array)
    # Not a converted checkpoint.
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a readable Orbax checkpoint|not written by"):
        converted.read_metadata(tmp_path / "empty")


# ----------------------------------------------------------------------------- peak memory

BIG = dict(  # float32: embed / lm_head 640 MiB each (the largest), 3 layers of 544 MiB
    vocab_size=40960,
    hidden_size=4096,
    intermediate_size=8192,
    num_hidden_layers=3,
    num_attention_heads=32,
    num_key_value_heads=8,
)


def _big_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, m, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, d))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (m, d)),
            (p + "mlp.up_proj.weight", (m, d)),
            (p + "mlp.down_proj.weight", (d, m)),
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
        ]
    return out + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def _fill(name: str, shape: tuple[int, ...], rows: slice) -> np.ndarray:
    """Rows ``rows`` of a synthetic float32 tensor: hashed exact integers below 2**24, so the
    values depend on position and tensor name (a transposed or shifted copy differs) and
    barely compress (like real weights: the writer's compression buffers are exercised)."""
    tid = sum(map(ord, name))
    r = np.arange(rows.start, rows.stop, dtype=np.int64)[:, None] * 0x9E3779B1
    c = np.arange(shape[1] if len(shape) > 1 else 1, dtype=np.int64)[None, :] * 0x85EBCA77
    x = r + c + tid * 0xC2B2AE3D
    x ^= x >> 13
    x *= 0x5BD1E995
    x ^= x >> 15
    out = (x & 0xFFFFFF).astype(np.float32)
    return out if len(shape) > 1 else out[:, 0]


def _write_synthetic(path: Path, c: dict, n_shards: int = 3) -> int:
    """Writes a sharded float32 safetensors checkpoint + index.json, one row block at a time
    (never a whole tensor in memory). Returns the largest tensor's bytes."""
    path.mkdir(parents=True)
    tensors = _big_tensors(c)
    per = -(-len(tensors) // n_shards)
    weight_map, total = {}, 0
    for s in range(n_shards):
        part = tensors[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        header, off = {}, 0
        for n, shape in part:
            nb = int(np.prod(shape)) * 4
            header[n] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[n] = fname
        total += off
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for n, shape in part:
                for r0 in range(0, shape[0], 4096):
                    f.write(_fill(n, shape, slice(r0, min(shape[0], r0 + 4096))).tobytes())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    hf_cfg = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "sliding_window": None,
        **c,
    }
    (path / "config.json").write_text(json.dumps(hf_cfg))
    return max(int(np.prod(s)) * 4 for _, s in tensors)


_HWM = (
    "import re;print('VMHWM', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1])"
)


def _peak_kib(code: str) -> int:
    """Peak RSS (VmHWM, KiB) of a fresh Python running ``code``."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run(
        [sys.executable, "-c", f"{code}\n{_HWM}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.split("VMHWM")[-1].split()[0])


@pytest.mark.slow
def test_peak_memory_of_a_multi_gib_conversion(tmp_path):
    try:
        _check_peak_memory(tmp_path)
    finally:  # ~5.5 GiB of files: never leave them behind, even on failure
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_peak_memory(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    largest = _write_synthetic(src, BIG)
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert len(list(src.glob("*.safetensors"))) == 3 and total > 2 * 2**30
    # Baseline: a process that only imports the converter (jax, orbax, tensorstore...).
    base = _peak_kib("import exo2ego_jax.tools.convert") * 1024
    with_backend = _peak_kib("import exo2ego_jax.tools.convert, jax; jax.devices()") * 1024
    t0 = time.time()
    peak = 1024 * _peak_kib(
        "from exo2ego_jax.tools import convert\n"
        f"assert convert.main(['--llm={src}', '--out={out}', '--no_progress']) == 0"
    )
    seconds = time.time() - t0
    mib = 2**20
    report = (
        f"peak RSS {peak / mib:.0f} MiB, baseline {base / mib:.0f} MiB (imports; "
        f"{with_backend / mib:.0f} MiB with the JAX backend started), above baseline "
        f"{(peak - base) / mib:.0f} MiB; largest tensor {largest / mib:.0f} MiB; total "
        f"{total / 2**30:.2f} GiB in {seconds:.0f} s (block {convert.DEFAULT_BLOCK_MIB} MiB)"
    )
    print(report)
    assert peak - base <= 1.5 * largest + 64 * mib, report

    # Every shape as expected; a few tensors bit-exact (whole embed / lm_head, one layer).
    saved, _ = converted.read_metadata(out)
    d, m, v, n = BIG["hidden_size"], BIG["intermediate_size"], BIG["vocab_size"], 3
    kv = d // BIG["num_attention_heads"] * BIG["num_key_value_heads"]
    shapes = {
        "llm/embed_tokens/embedding": (v, d),
        "llm/lm_head/kernel": (d, v),
        "llm/norm/scale": (d,),
        "llm/layers/self_attn/q_proj/kernel": (n, d, d),
        "llm/layers/self_attn/k_proj/kernel": (n, d, kv),
        "llm/layers/self_attn/v_proj/kernel": (n, d, kv),
        "llm/layers/self_attn/o_proj/kernel": (n, d, d),
        "llm/layers/mlp/gate_proj/kernel": (n, d, m),
        "llm/layers/mlp/up_proj/kernel": (n, d, m),
        "llm/layers/mlp/down_proj/kernel": (n, m, d),
        "llm/layers/input_layernorm/scale": (n, d),
        "llm/layers/post_attention_layernorm/scale": (n, d),
    }
    assert {k: s for k, (s, _) in saved.items()} == shapes
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for k, hf_name, transpose in (
        ("llm/embed_tokens/embedding", "model.embed_tokens.weight", False),
        ("llm/lm_head/kernel", "lm_head.weight", True),
        ("llm/layers/input_layernorm/scale", None, False),
    ):
        got = converted.restore_leaves(
            out, {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=one)}
        )[k]
        got = np.asarray(got)
        if hf_name is None:
            for i in range(n):
                name = f"model.layers.{i}.input_layernorm.weight"
                assert np.array_equal(got[i], _fill(name, (d,), slice(0, d))), (k, i)
        else:
            for r0 in range(0, v, 4096):  # compare in blocks: the int math is 8 bytes/elem
                want = _fill(hf_name, (v, d), slice(r0, min(v, r0 + 4096)))
                part = got[:, r0 : r0 + 4096].T if transpose else got[r0 : r0 + 4096]
                assert np.array_equal(part, want), (k, r0)
        del got
    # The last layer of a stacked, transposed kernel, read into 8 shards.
    mesh = sh.make_mesh((1, 8, 1))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", None))
    k = "llm/layers/mlp/down_proj/kernel"
    got = converted.restore_leaves(
        out, {k: jax.ShapeDtypeStruct(shapes[k], jnp.float32, sharding=spec)}
    )[k]
    assert got.sharding == spec
    name = f"model.layers.{n - 1}.mlp.down_proj.weight"
    assert np.array_equal(np.asarray(got[n - 1]), _fill(name, (d, m), slice(0, d)).T)
