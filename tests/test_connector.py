"""STC connector: parity with a PyTorch reference, mm_projector I/O, paper-size shapes."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from hf_helpers import perturb_params
from reference.stc_connector_torch import STCConnector as TorchSTC

from exo2ego_jax.models import connector as connector_lib
from exo2ego_jax.models.connector import STCConnector
from exo2ego_jax.sharding import make_mesh, rules_for
from exo2ego_jax.weights.errors import CheckpointError
from exo2ego_jax.weights.mm_projector import (
    convert_state_dict,
    load_mm_projector,
    param_mappings,
    save_mm_projector,
)

TP_RULES = rules_for("fsdp_tp")

TOL = 1e-4
PAPER_PARAMS = 489_188_608  # s1 153.4M + sampler 134.2M + s2 168.0M + readout 33.6M


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights everywhere, norm scales / biases included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("bn.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise * 1.5 / math.sqrt(p[0].numel()))
    return model.eval()


def _torch_model(in_chs=32, hidden=64, depth=2, seed=0, **kw) -> TorchSTC:
    return _randomize(TorchSTC(in_chs, hidden, depth=depth, **kw), seed)


def _run_torch(model: TorchSTC, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _run_jax(module: STCConnector, params, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x)))


def _input(shape, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize(
    "shape, torch_kw, tokens",
    [
        ((2, 4, 36, 32), {}, 3 * 4 * 4),  # [B,T,N,C]: 4 frames of 6×6
        ((1, 5, 8, 8, 32), {}, 3 * 5 * 5),  # [B,T,h,w,C], odd frame count
        ((1, 8, 64, 32), {}, 5 * 5 * 5),  # 8 frames of 8×8
        # non-default timm block settings: bottleneck 0.5, grouped 3×3, no SE, 3-layer readout
        (
            (1, 4, 25, 32),
            {"bottle_ratio": 0.5, "group_size": 8, "se_ratio": 0.0, "depth": 1, "mlp_depth": 3},
            3 * 3 * 3,
        ),
    ],
)
def test_parity_with_torch_reference(shape, torch_kw, tokens):
    model = _torch_model(**{"depth": 2, **torch_kw})
    x = _input(shape, seed=sum(shape))  # distinct data per case
    ref = _run_torch(model, x)
    module, params = convert_state_dict(model.state_dict())
    out = _run_jax(module, params, x)
    diff = float(np.abs(out - ref).max())
    print(f"parity {shape} {torch_kw}: max|diff| = {diff:.2e} (max|ref| = {np.abs(ref).max():.2f})")
    assert out.shape == ref.shape == (shape[0], tokens, 64)
    assert np.abs(ref).max() > 0.1 and ref.std() > 0.05  # the comparison is not vacuous
    assert diff <= TOL


def test_inferred_config_and_tree_match_module_init():
    model = _torch_model(bottle_ratio=0.5, group_size=8, mlp_depth=3)
    module, params = convert_state_dict(model.state_dict())
    cfg = module.config
    assert (cfg.in_channels, cfg.hidden_size, cfg.out_size) == (32, 64, 64)
    assert (cfg.depth, cfg.mlp_depth, cfg.downsample) == (2, 3, (2, 2, 2))
    assert (cfg.bottle_ratio, cfg.group_size, cfg.se_ratio) == (0.5, 8, 0.25)
    # Same tree, same shapes as the module's own init: the mapping is one to one.
    init = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), _input((1, 4, 36, 32))))
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), init["params"])
    assert got == want
    assert len(jax.tree.leaves(params)) == len(model.state_dict())
    # The one setting weights cannot tell (VideoLLaMA2's STCConnectorV35 uses padding 0).
    v35, _ = convert_state_dict(model.state_dict(), sampler_padding=0)
    out = jax.eval_shape(v35.apply, {"params": params}, _input((1, 4, 36, 32)))
    assert out.shape == (1, 2 * 3 * 3, 64)


def test_timm_block_semantics():
    """Group size 1 (depthwise), SE width round(0.25 · block input), shortcut only in b1."""
    cfg = connector_lib.paper()
    keys = {m.hf_names[0]: (m.hf_shape, m.path) for m in param_mappings(cfg)}
    assert keys["s1.b1.conv2.conv.weight"][0] == (4096, 1, 3, 3)
    assert keys["s1.b1.se.fc1.weight"][0] == (256, 4096, 1, 1)  # round(1024 · 0.25)
    assert keys["s1.b2.se.fc1.weight"][0] == (1024, 4096, 1, 1)  # round(4096 · 0.25)
    assert keys["s2.b1.se.fc1.weight"][0] == (1024, 4096, 1, 1)
    assert [k for k in keys if "downsample" in k] == [
        "s1.b1.downsample.conv.weight",
        "s1.b1.downsample.bn.weight",
        "s1.b1.downsample.bn.bias",
    ]
    assert keys["sampler.0.weight"][0] == (4096, 4096, 2, 2, 2)
    assert keys["readout.2.weight"][1] == ("readout_2", "kernel")


@pytest.fixture(scope="module")
def reference():
    model = _torch_model(seed=3)
    x = _input((2, 4, 36, 32), seed=4)
    return model, x, _run_torch(model, x)


def _check_loaded(loaded, x, ref, what):
    module, params = loaded
    diff = float(np.abs(_run_jax(module, params, x) - ref).max())
    print(f"{what}: max|diff| = {diff:.2e}")
    assert module.config.depth == 2 and module.config.in_channels == 32
    assert diff <= TOL


def test_load_torch_bin(reference, tmp_path):
    model, x, ref = reference
    torch.save(model.state_dict(), tmp_path / "mm_projector.bin")
    _check_loaded(load_mm_projector(tmp_path / "mm_projector.bin"), x, ref, "mm_projector.bin")
    _check_loaded(load_mm_projector(tmp_path), x, ref, "dir with mm_projector.bin")


def test_load_prefixed_bin_ignores_other_model_tensors(reference, tmp_path):
    model, x, ref = reference
    state = {f"model.mm_projector.{k}": v for k, v in model.state_dict().items()}
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "full.bin")
    _check_loaded(load_mm_projector(tmp_path / "full.bin"), x, ref, "model.mm_projector. prefix")


def test_load_safetensors_file_and_dir(reference, tmp_path):
    model, x, ref = reference
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(sd, tmp_path / "mm_projector.safetensors")
    _check_loaded(load_mm_projector(tmp_path / "mm_projector.safetensors"), x, ref, "safetensors")
    full = tmp_path / "videollama2"
    full.mkdir()
    prefixed = {f"model.mm_projector.{k}": v for k, v in sd.items()}
    prefixed["lm_head.weight"] = torch.zeros(3, 2)
    safetensors.torch.save_file(prefixed, full / "model.safetensors")
    _check_loaded(load_mm_projector(full), x, ref, "full-model safetensors dir")


def test_load_bf16_bin(reference, tmp_path):
    model, _, _ = reference
    torch.save({k: v.bfloat16() for k, v in model.state_dict().items()}, tmp_path / "bf16.bin")
    module, params = load_mm_projector(tmp_path / "bf16.bin", dtype=jnp.bfloat16)
    assert module.config.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = model.state_dict()["readout.2.weight"].bfloat16().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["readout_2"]["kernel"], np.float32), want)


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def test_save_roundtrip_into_torch(tmp_path):
    cfg = connector_lib.tiny()
    module = STCConnector(cfg)
    x = _input((1, 4, 36, 32), seed=7)
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]  # boxed: saver must unbox
    # Flax initialises every norm scale to 1 and bias to 0: perturb them (each tensor its own
    # values) so a saver writing one block's norm under another's name cannot pass.
    noise = perturb_params(nn.meta.unbox(params), seed=7)
    params = jax.tree.map(lambda box, v: box.replace_boxed(v), params, noise, is_leaf=_is_box)
    out = _run_jax(module, nn.meta.unbox(params), x)
    file = save_mm_projector(cfg, params, tmp_path)
    assert file.name == "mm_projector.safetensors"
    model = TorchSTC(32, 64, depth=2).eval()
    model.load_state_dict(safetensors.torch.load_file(file), strict=True)
    diff = float(np.abs(_run_torch(model, x) - out).max())
    print(f"flax -> safetensors -> torch: max|diff| = {diff:.2e}")
    assert diff <= TOL
    # ... and back through the loader, with VideoLLaMA2's full-model prefix.
    file2 = save_mm_projector(cfg, params, tmp_path / "p.safetensors", prefix="model.mm_projector.")
    module2, params2 = load_mm_projector(file2)
    assert module2.config == cfg
    assert jax.tree.all(jax.tree.map(np.array_equal, params2, nn.meta.unbox(params)))


def test_paper_shapes_and_param_count():
    cfg = connector_lib.paper()
    module = STCConnector(cfg)
    x16 = jax.ShapeDtypeStruct((2, 16, 576, 1024), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x16)
    params = nn.meta.unbox(variables["params"])
    out16 = jax.eval_shape(module.apply, {"params": params}, x16)
    out8 = jax.eval_shape(
        module.apply, {"params": params}, jax.ShapeDtypeStruct((2, 8, 24, 24, 1024), jnp.float32)
    )
    assert out16.shape == (2, 1521, 4096) and cfg.num_tokens(16, 24) == 9 * 13 * 13
    assert out8.shape == (2, 845, 4096) and cfg.num_tokens(8, 24) == 5 * 13 * 13
    n_flax = sum(math.prod(a.shape) for a in jax.tree.leaves(params))
    with torch.device("meta"):
        n_torch = sum(p.numel() for p in TorchSTC(1024, 4096).parameters())
    print(f"paper STC connector parameters: flax {n_flax:,}  torch {n_torch:,}")
    assert n_flax == n_torch == PAPER_PARAMS
    assert sum(math.prod(m.hf_shape) for m in param_mappings(cfg)) == PAPER_PARAMS


def test_logical_axes_and_sharded_apply():
    cfg = connector_lib.tiny()
    module = STCConnector(cfg)
    x = _input((4, 4, 36, 32), seed=5)
    boxed = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    vocab = {name for name, _ in TP_RULES}
    leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert leaves and all(isinstance(a, nn.Partitioned) for a in leaves)
    for a in leaves:
        assert len(a.names) == a.value.ndim and set(a.names) - {None} <= vocab, a.names

    mesh = make_mesh((2, 2, 2))
    params = jax.jit(module.init)(jax.random.key(0), x)["params"]
    want = _run_jax(module, nn.meta.unbox(params), x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, TP_RULES)
    sharded = jax.device_put(nn.meta.unbox(params), nn.meta.unbox(shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(TP_RULES):
        got = jax.jit(module.apply)({"params": sharded}, jnp.asarray(x))
    assert got.sharding.spec[0] == ("data", "fsdp")
    assert float(np.abs(np.asarray(got) - want).max()) <= TOL


def _state(seed=0, **kw) -> dict[str, torch.Tensor]:
    return dict(_torch_model(seed=seed, **kw).state_dict())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.pop("s2.b1.conv2.bn.bias"), "'s2.b1.conv2.bn.bias' missing"),
        (lambda s: s.pop("sampler.0.weight"), "'sampler.0.weight' missing"),
        (
            lambda s: s.__setitem__("s1.b2.se.fc1.weight", torch.zeros(8, 64, 1, 1)),
            r"'s1.b2.se.fc1.weight' has shape \[8, 64, 1, 1\], expected \[16, 64, 1, 1\]",
        ),
        (
            lambda s: s.__setitem__("readout.2.weight", torch.zeros(64, 32)),
            r"'readout.2.weight' has shape \[64, 32\]",
        ),
        (
            lambda s: s.__setitem__("s1.b1.extra.weight", torch.zeros(1)),
            "unexpected tensor 's1.b1.extra.weight'",
        ),
        (lambda s: s.__setitem__("s2.b3.conv1.conv.weight", torch.zeros(1)), "'s2.b3.conv1"),
        (lambda s: s.__setitem__("readout.1.weight", torch.zeros(1)), "'readout.1.weight'"),
    ],
)
def test_checkpoint_errors_name_the_key(edit, match, tmp_path):
    state = _state()
    edit(state)
    with pytest.raises(CheckpointError, match=match):
        convert_state_dict(state)
    # the same through a file, with the prefix kept in the message
    torch.save({f"model.mm_projector.{k}": v for k, v in state.items()}, tmp_path / "p.bin")
    with pytest.raises(CheckpointError, match=match.replace("'", "'model.mm_projector.", 1)):
        load_mm_projector(tmp_path / "p.bin")


def test_other_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_mm_projector(tmp_path / "nope.bin")
    mlp = {"0.weight": torch.zeros(8, 4), "0.bias": torch.zeros(8), "2.weight": torch.zeros(8, 8)}
    with pytest.raises(CheckpointError, match="mlp2x_gelu"):
        convert_state_dict(mlp)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="junk.bin: cannot read"):
        load_mm_projector(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="params have no s1/b1/conv1/conv/kernel"):
        save_mm_projector(connector_lib.tiny(), {"s1": {}}, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_input_validation():
    module = STCConnector(connector_lib.tiny())
    with pytest.raises(ValueError, match="not a square grid"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4, 35, 32)))
    with pytest.raises(ValueError, match="32"):
        jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 4, 36, 16)))
