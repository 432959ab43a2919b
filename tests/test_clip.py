"""CLIP vision tower: parity with transformers, checkpoint I/O, features, partitioning."""

from __future__ import annotations

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from exo2ego_jax.models import clip
from exo2ego_jax.sharding import rules_for
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.hf_clip import load_clip_vision, param_mappings, save_clip_vision
from exo2ego_jax.weights.safetensors_format import write_safetensors
from exo2ego_jax.weights.tensors import TensorSource

TOL = 1e-4

# Two shapes where every size differs (grid, patch, width, mlp, heads, head_dim), so a
# wrong transpose or reshape cannot go unnoticed.
HF_CONFIGS = {
    "a": dict(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
    ),
    "b": dict(
        image_size=30,
        patch_size=6,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=3,
        hidden_act="gelu",
    ),
}

# openai/clip-vit-large-patch14-336, config.json → vision_config.
PAPER_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "num_channels": 3,
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves biases at 0 and norms at 1; make every tensor informative."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _hf_vision(name: str, seed: int = 0) -> transformers.CLIPVisionModel:
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_CONFIGS[name]))
    _perturb(model, seed)
    return model.eval()


def _pixels(batch: int, size: int, seed: int = 1) -> np.ndarray:
    """CLIP-normalised-looking pixels, NCHW float32 (HF layout)."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def _nhwc(x: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _hf_forward(model, pixels: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(pixels), output_hidden_states=True)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _assert_outputs_match(out, ref, tag: str, tol: float = TOL) -> dict[str, float]:
    assert len(out.hidden_states) == len(ref.hidden_states)
    diffs = {
        f"hidden_states[{i}]": _max_diff(o, r.numpy())
        for i, (o, r) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True))
    }
    diffs["last_hidden_state"] = _max_diff(out.last_hidden_state, ref.last_hidden_state.numpy())
    diffs["pooler_output"] = _max_diff(out.pooler_output, ref.pooler_output.numpy())
    print(
        f"[{tag}] max abs diff vs transformers: "
        + ", ".join(f"{k}={v:.2e}" for k, v in diffs.items())
    )
    for k, v in diffs.items():
        assert v < tol, f"{tag} {k}: max abs diff {v}"
    return diffs


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Saved tiny HF models: {'a': (model, dir), 'b': ..., 'clip_model': ...}."""
    root = tmp_path_factory.mktemp("hf_clip")
    out = {}
    for name in HF_CONFIGS:
        model = _hf_vision(name, seed=len(out))
        model.save_pretrained(root / name)
        out[name] = (model, root / name)
    torch.manual_seed(7)
    full = transformers.CLIPModel(
        transformers.CLIPConfig(
            vision_config=HF_CONFIGS["a"],
            text_config=dict(
                hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
            ),
            projection_dim=16,
        )
    )
    _perturb(full, 7)
    full.eval().save_pretrained(root / "clip_model")
    out["clip_model"] = (full, root / "clip_model")
    return out


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_parity_with_transformers_clip_vision_model(hf_dirs, name):
    model, path = hf_dirs[name]
    module, params = load_clip_vision(path)
    assert module.config.num_layers == HF_CONFIGS[name]["num_hidden_layers"]
    pixels = _pixels(2, HF_CONFIGS[name]["image_size"])
    out = jax.jit(module.apply)({"params": params}, _nhwc(pixels))
    cfg = module.config
    assert out.last_hidden_state.shape == (2, 1 + cfg.num_patches, cfg.hidden_size)
    assert out.pooler_output.shape == (2, cfg.hidden_size)
    _assert_outputs_match(out, _hf_forward(model, pixels), f"CLIPVisionModel {name}")


def test_parity_from_clip_model_directory(hf_dirs):
    full, path = hf_dirs["clip_model"]
    assert any(n.startswith("text_model.") for n in TensorSource(path).names())
    module, params = load_clip_vision(path)
    assert module.config == clip.CLIPVisionConfig.from_hf_config(
        json.loads((path / "config.json").read_text())
    )
    pixels = _pixels(2, 32, seed=3)
    out = module.apply({"params": params}, _nhwc(pixels))
    _assert_outputs_match(out, _hf_forward(full.vision_model, pixels), "CLIPModel")


def test_clip_features_penultimate_layer_without_cls(hf_dirs):
    model, path = hf_dirs["b"]
    module, params = load_clip_vision(path)
    b, t, size = 2, 3, 30
    pixels = _pixels(b * t, size, seed=4)
    frames = _nhwc(pixels).reshape(b, t, size, size, 3)
    ref = _hf_forward(model, pixels)

    feats = jax.jit(lambda p, f: clip.clip_features(module, p, f))(params, frames)
    n, w = module.config.num_patches, module.config.hidden_size
    assert feats.shape == (b, t, n, w) == (2, 3, 25, 48)
    expected = ref.hidden_states[-2][:, 1:].numpy().reshape(b, t, n, w)
    diff = _max_diff(feats, expected)
    print(f"clip_features vs HF hidden_states[-2][:, 1:]: max abs diff {diff:.2e}")
    assert diff < TOL

    # Other selections: the last layer with CLS, and the embeddings (no layer run).
    last = clip.clip_features(module.config, params, frames, select_layer=-1, drop_cls=False)
    assert last.shape == (b, t, 1 + n, w)
    assert _max_diff(last, ref.last_hidden_state.numpy().reshape(b, t, 1 + n, w)) < TOL
    first = clip.clip_features(module, params, frames, select_layer=0)
    assert _max_diff(first, ref.hidden_states[0][:, 1:].numpy().reshape(b, t, n, w)) < TOL
    with pytest.raises(ValueError, match="select_layer"):
        clip.clip_features(module, params, frames, select_layer=3)


def test_clip_features_skips_the_last_layer(hf_dirs):
    """With select_layer=-2 the last layer's params are never touched."""
    _, path = hf_dirs["a"]
    module, params = load_clip_vision(path)
    frames = jnp.zeros((1, 2, 32, 32, 3))
    cfg, truncated = clip.truncate_layers(module.config, params, 2)
    assert cfg.num_layers == 2
    assert truncated["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape[0] == 2
    jaxpr = jax.make_jaxpr(lambda p, f: clip.clip_features(module, p, f))(params, frames)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert [e.params["length"] for e in scans] == [2]


def test_round_trip_save_load(hf_dirs, tmp_path):
    model, path = hf_dirs["a"]
    module, params = load_clip_vision(path)
    out_dir = save_clip_vision(module, params, tmp_path / "saved")
    saved_cfg = json.loads((out_dir / "config.json").read_text())
    assert saved_cfg["architectures"] == ["CLIPVisionModel"]
    assert saved_cfg["model_type"] == "clip_vision_model"

    reloaded_hf, info = transformers.CLIPVisionModel.from_pretrained(
        out_dir, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels = _pixels(2, 32, seed=5)
    ref, again = _hf_forward(model, pixels), _hf_forward(reloaded_hf.eval(), pixels)
    for r, a in zip(ref.hidden_states, again.hidden_states, strict=True):
        assert torch.equal(r, a)
    assert torch.equal(ref.pooler_output, again.pooler_output)

    module2, params2 = load_clip_vision(out_dir)
    assert module2.config == module.config
    flat1, flat2 = jax.tree.leaves_with_path(params), jax.tree.leaves_with_path(params2)
    assert [p for p, _ in flat1] == [p for p, _ in flat2]
    for (p, a), (_, b) in zip(flat1, flat2, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), jax.tree_util.keystr(p)


def _random_variables(cfg: clip.CLIPVisionConfig, seed: int = 0):
    """Boxed variables shaped like ``init``'s, filled with numpy noise (no init compile)."""
    image = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    boxed = jax.eval_shape(clip.CLIPVisionTower(cfg).init, jax.random.key(0), image)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray((0.1 * rng.normal(size=s.shape)).astype(s.dtype)), boxed
    )


def test_round_trip_from_boxed_bf16_params(tmp_path):
    """Saving boxed (``init``-style), unrolled bf16 params and loading back is lossless."""
    cfg = clip.tiny(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, scan_layers=False)
    variables = _random_variables(cfg)
    assert isinstance(variables["params"]["pre_layrnorm"]["scale"], nn.Partitioned)
    save_clip_vision(cfg, variables, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    _, params = load_clip_vision(tmp_path / "bf16", dtype=jnp.bfloat16, scan_layers=False)
    ref = nn.unbox(variables)["params"]
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(params), strict=True):
        assert b.dtype == jnp.bfloat16 and np.array_equal(np.asarray(a), np.asarray(b))


def test_missing_directory_raises(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_clip_vision(tmp_path / "nope")


def test_wrong_model_type_raises(hf_dirs, tmp_path):
    _, path = hf_dirs["a"]
    bad = shutil.copytree(path, tmp_path / "llama")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_clip_vision(bad)


def test_wrong_tensor_shape_raises(hf_dirs, tmp_path):
    _, path = hf_dirs["a"]
    index = TensorSource(path)
    victim = "encoder.layers.1.mlp.fc1.weight"  # [128, 64] in the config
    tensors = [
        (n, np.asarray(index.get(n))[:100] if n == victim else np.asarray(index.get(n)))
        for n in index.names()
    ]
    bad = write_safetensors(
        tmp_path / "bad_shape", tensors, config=json.loads((path / "config.json").read_text())
    )
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.fc1\.weight") as e:
        load_clip_vision(bad)
    assert "[128, 64]" in str(e.value) and "[100, 64]" in str(e.value)
    print("shape error:", e.value)


def test_missing_tensor_raises(hf_dirs, tmp_path):
    _, path = hf_dirs["a"]
    index = TensorSource(path)
    victim = "encoder.layers.2.self_attn.v_proj.bias"
    tensors = [(n, np.asarray(index.get(n))) for n in index.names() if n != victim]
    bad = write_safetensors(
        tmp_path / "missing", tensors, config=json.loads((path / "config.json").read_text())
    )
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.2\.self_attn\.v_proj\.bias"):
        load_clip_vision(bad)


def test_scan_and_unrolled_layers_agree(hf_dirs):
    """Scanned vs unrolled layers (with and without remat): same function, same numbers."""
    _, path = hf_dirs["a"]
    pixels = _nhwc(_pixels(2, 32, seed=6))
    frames = pixels.reshape(1, 2, 32, 32, 3)
    outs = {}
    for scan, remat in ((True, "none"), (False, "none"), (False, "full")):
        module, params = load_clip_vision(path, scan_layers=scan, remat=remat)
        if not scan:
            assert set(params["encoder"]) == {"layers_0", "layers_1", "layers_2"}
        outs[scan, remat] = jax.jit(
            lambda p, x, f, m=module: (m.apply({"params": p}, x), clip.clip_features(m, p, f))
        )(params, pixels, frames)
    ref = outs[True, "none"]
    diffs = {
        key: max(
            _max_diff(a, b) for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out), strict=True)
        )
        for key, out in outs.items()
    }
    print("variants vs scanned (outputs and clip_features): max abs diff", diffs)
    assert max(diffs.values()) < 1e-6  # measured 0.0 under jit


def test_remat_gradients_match(hf_dirs):
    """Remat policies change memory, not math: gradients agree with the plain model."""
    _, path = hf_dirs["a"]
    x = _nhwc(_pixels(2, 32, seed=8))
    module, params = load_clip_vision(path)

    def loss(p, cfg):
        return jnp.sum(clip.CLIPVisionTower(cfg).apply({"params": p}, x).pooler_output ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref = grad(params, module.config)
    for remat in ("full", "dots"):
        cfg = module.config.replace(remat=remat)
        assert "remat" in str(jax.make_jaxpr(loss, static_argnums=1)(params, cfg))
        diff = max(
            _max_diff(a, b)
            for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(grad(params, cfg)), strict=True)
        )
        print(f"remat={remat}: gradient max abs diff {diff:.2e}")
        assert diff < 1e-5, remat
    assert "remat" not in str(jax.make_jaxpr(loss, static_argnums=1)(params, module.config))


@pytest.mark.parametrize("scan", [True, False])
def test_every_param_has_logical_names(scan):
    cfg = clip.tiny(scan_layers=scan)
    boxed = jax.eval_shape(
        clip.CLIPVisionTower(cfg).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )["params"]
    leaves = jax.tree.leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert len(leaves) == (7 + 16 if scan else 7 + 16 * cfg.num_layers)
    vocab = {"embed", "mlp", "heads", "head_dim", "conv_space", "norm", "layers", None}
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.LogicallyPartitioned), where
        assert len(leaf.names) == leaf.value.ndim, where
        assert set(leaf.names) <= vocab and any(n is not None for n in leaf.names), where
        # Scanned layers get the stacked axis first; nothing else does.
        assert (leaf.names[0] == "layers") == (scan and "encoder" in where), where
    specs = nn.get_partition_spec(boxed)
    assert specs["embeddings"]["patch_embedding"]["kernel"] == jax.sharding.PartitionSpec(
        "conv_space", None, None, "embed"
    )
    # Every spec must map onto the mesh through the project's rules table.
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        nn.logical_to_mesh_axes(tuple(spec), rules_for("fsdp_tp"))
    if scan:
        assert specs["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"] == (
            jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")
        )


def test_paper_preset_param_count_matches_transformers():
    cfg = clip.paper()
    assert clip.CLIPVisionConfig.from_hf_config(PAPER_VISION_CONFIG) == cfg
    assert (
        clip.CLIPVisionConfig.from_hf_config(
            {"model_type": "clip", "vision_config": PAPER_VISION_CONFIG}
        )
        == cfg
    )
    shapes = jax.eval_shape(
        clip.CLIPVisionTower(cfg).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 336, 336, 3), jnp.float32),
    )
    n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**PAPER_VISION_CONFIG))
    n_hf = sum(p.numel() for p in hf.parameters())
    print(f"CLIP ViT-L/14-336 vision tower params: jax {n_jax:,} / transformers {n_hf:,}")
    assert n_jax == n_hf == 303_507_456
    assert len(param_mappings(cfg)) == 7 + 16  # every HF tensor has one mapping entry
    assert sum(1 for _ in hf.state_dict()) == 7 + 16 * cfg.num_layers

    # clip_features at paper size: [B, T, 576, 1024], shapes only.
    feats = jax.eval_shape(
        lambda p, f: clip.clip_features(cfg, p, f),
        nn.unbox(shapes)["params"],
        jax.ShapeDtypeStruct((1, 16, 336, 336, 3), jnp.float32),
    )
    assert feats.shape == (1, 16, 576, 1024)


def test_config_errors():
    with pytest.raises(ValueError, match="model_type"):
        clip.CLIPVisionConfig.from_hf_config({"model_type": "siglip_vision_model"})
    with pytest.raises(ValueError, match="patch_size"):
        clip.tiny(image_size=30)
    with pytest.raises(ValueError, match="remat"):
        clip.tiny(remat="sometimes")
    module = clip.CLIPVisionTower(clip.tiny())
    with pytest.raises(ValueError, match="NHWC"):
        module.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
