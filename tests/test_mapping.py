"""Mapping networks F / G: shapes, PyTorch CycleGAN parity, paper-size parameter count, grads."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from flax.traverse_util import flatten_dict, unflatten_dict

from exo2ego_jax.models import mapping as mapping_lib
from exo2ego_jax.models.mapping import MappingConfig, MappingNetwork
from exo2ego_jax.sharding import make_mesh, rules_for

TP_RULES = rules_for("fsdp_tp")

D = 12  # tiny model width


@pytest.fixture(autouse=True, scope="module")
def _fast_cpu_compiles():
    """XLA's CPU optimisation passes dominate these tiny tests (~4x compile time); the
    numerics checked here do not depend on them. Restored after the module."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


def _init(cfg: MappingConfig, tokens: jax.Array, grid, d: int = D, seed: int = 0):
    """(model, params, apply) with ``apply(params, tokens)`` jitted for this ``grid``.

    Params are drawn with numpy at the shapes ``jax.eval_shape`` reports (fan-in scaled),
    because compiling threefry-based initialisers costs seconds per config on CPU; the real
    ``init`` is exercised in ``test_logical_names_and_sharded_apply``.
    """
    model = MappingNetwork(cfg, features=d)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, grid), tokens)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        elif name == "bias":
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        return jnp.asarray(value, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(shapes["params"]))
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, grid))
    return model, params, apply


def _tokens(b: int, grid, d: int = D, seed: int = 0) -> jax.Array:
    t, h, w = grid
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t * h * w, d)), jnp.float32)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("grid", [(1, 13, 13), (2, 6, 6), (2, 7, 5), (1, 1, 1)])
@pytest.mark.parametrize(
    "cfg",
    [
        mapping_lib.tiny(ngf=4, n_blocks=1, norm="instance"),
        mapping_lib.tiny(ngf=4, n_blocks=1, norm="layer", padding="zero", align_pad="zero"),
        mapping_lib.tiny(kind="mlp", mlp_hidden=16, mlp_layers=3),
    ],
    ids=["resnet-instance", "resnet-layer", "mlp"],
)
def test_output_shape_equals_input_shape(cfg, grid):
    tokens = _tokens(2, grid)
    _, params, apply = _init(cfg, tokens, grid)
    out = apply(params, tokens)
    assert out.shape == tokens.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    if cfg.kind == "resnet" and cfg.norm == "instance" and grid[1:] == (1, 1):
        # Documented degeneracy: a 1x1 grid edge-padded to 4x4 is spatially constant, so
        # the first instance norm outputs zeros and the output ignores the input.
        other = apply(params, tokens + 1.0)
        np.testing.assert_array_equal(np.asarray(other), np.asarray(out))
    else:
        assert float(jnp.std(out)) > 1e-3  # not a constant map


def test_bad_inputs_raise_clear_errors():
    cfg = mapping_lib.tiny(ngf=4, n_blocks=1)
    tokens = _tokens(1, (2, 3, 3))
    model = MappingNetwork(cfg, features=D)
    with pytest.raises(ValueError, match=r"18 tokens do not match grid .*=\(2, 3, 4\)"):
        model.init(jax.random.key(0), tokens, (2, 3, 4))
    with pytest.raises(ValueError, match="built for D=8 but tokens have D=12"):
        MappingNetwork(cfg, features=8).init(jax.random.key(0), tokens, (2, 3, 3))
    with pytest.raises(ValueError, match="three static ints"):
        model.init(jax.random.key(0), tokens, (18, 1))
    with pytest.raises(ValueError, match="MappingConfig.norm='batch'"):
        MappingConfig(norm="batch")


# ----------------------------------------------------------------------------- torch parity


class _ChannelLayerNorm(torch.nn.Module):
    """LayerNorm over C of an NCHW tensor (the channels-last ``nn.LayerNorm`` of the JAX side)."""

    def __init__(self, c: int):
        super().__init__()
        self.ln = torch.nn.LayerNorm(c, eps=1e-5)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _TorchResnetBlock(torch.nn.Module):
    def __init__(self, c, pad, norm, bias):
        super().__init__()
        self.block = torch.nn.Sequential(
            pad(1), torch.nn.Conv2d(c, c, 3, bias=bias), norm(c), torch.nn.ReLU(True),
            pad(1), torch.nn.Conv2d(c, c, 3, bias=bias), norm(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.block(x)


class TorchResnetGenerator(torch.nn.Module):
    """CycleGAN ``ResnetGenerator`` (junyanz/pytorch-CycleGAN-and-pix2pix) without the tanh."""

    def __init__(
        self, d, ngf, n_blocks, norm="instance", padding="reflect", affine=False, bias=True
    ):
        super().__init__()
        if norm == "instance":
            norm_layer = lambda c: torch.nn.InstanceNorm2d(c, affine=affine)
        else:
            norm_layer = _ChannelLayerNorm
        pad = torch.nn.ReflectionPad2d if padding == "reflect" else torch.nn.ZeroPad2d
        relu = lambda: torch.nn.ReLU(True)
        layers = [pad(3), torch.nn.Conv2d(d, ngf, 7, bias=bias), norm_layer(ngf), relu()]
        for i in range(2):
            c = ngf * 2**i
            layers += [torch.nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias)]
            layers += [norm_layer(2 * c), relu()]
        layers += [_TorchResnetBlock(4 * ngf, pad, norm_layer, bias) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            layers += [
                torch.nn.ConvTranspose2d(c, c // 2, 3, 2, padding=1, output_padding=1, bias=bias)
            ]
            layers += [norm_layer(c // 2), relu()]
        layers += [pad(3), torch.nn.Conv2d(ngf, d, 7)]  # no tanh: features are unbounded
        self.model = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


def _flax_names(n_blocks: int) -> list[str]:
    """Flax module paths in the order the torch ``Sequential`` holds convs / norms."""
    names = ["stem", "down_0", "down_1"]
    names += [f"block_{i}/{j}" for i in range(n_blocks) for j in ("conv1", "conv2")]
    return names + ["up_0", "up_1", "head"]


def _torch_to_flax(ref: TorchResnetGenerator, n_blocks: int) -> dict:
    """Copies the torch generator's weights into a flax ``params`` tree."""
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    norms = [
        m for m in ref.modules()
        if isinstance(m, torch.nn.InstanceNorm2d | torch.nn.LayerNorm) and m.weight is not None
    ]  # fmt: skip
    names = _flax_names(n_blocks)
    assert len(convs) == len(names)
    flat = {}
    for name, conv in zip(names, convs, strict=True):
        prefix = ("resnet", *name.split("/")) + (() if name == "head" else ("conv",))
        w = conv.weight.detach().numpy()
        # Conv2d [out, in, kh, kw] / ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out]
        perm = (2, 3, 0, 1) if isinstance(conv, torch.nn.ConvTranspose2d) else (2, 3, 1, 0)
        flat[(*prefix, "kernel")] = jnp.asarray(w.transpose(perm))
        if conv.bias is not None:
            flat[(*prefix, "bias")] = jnp.asarray(conv.bias.detach().numpy())
    if norms:
        assert len(norms) == len(names) - 1
        for name, norm in zip(names[:-1], norms, strict=True):
            prefix = ("resnet", *name.split("/"), "norm")
            flat[(*prefix, "scale")] = jnp.asarray(norm.weight.detach().numpy())
            flat[(*prefix, "bias")] = jnp.asarray(norm.bias.detach().numpy())
    return unflatten_dict(flat)


def _randomise_norm_affines(ref: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in ref.modules():
        if isinstance(m, torch.nn.InstanceNorm2d | torch.nn.LayerNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize(
    "norm, padding, align_pad, affine, grid",
    [
        ("instance", "reflect", "edge", False, (2, 7, 6)),
        ("instance", "reflect", "edge", True, (1, 8, 8)),
        ("layer", "zero", "zero", False, (2, 5, 9)),
    ],
)
def test_resnet_matches_torch_cyclegan_generator(norm, padding, align_pad, affine, grid):
    ngf, n_blocks, b = 4, 2, 2
    cfg = mapping_lib.tiny(
        ngf=ngf, n_blocks=n_blocks, norm=norm, padding=padding, align_pad=align_pad,
        instance_affine=affine,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = TorchResnetGenerator(D, ngf, n_blocks, norm, padding, affine).eval()
    _randomise_norm_affines(ref)

    tokens = _tokens(b, grid, seed=3)
    _, params, apply = _init(cfg, tokens, grid)
    ported = _torch_to_flax(ref, n_blocks)
    assert jax.tree.map(jnp.shape, ported) == jax.tree.map(jnp.shape, params)
    out = np.asarray(apply(ported, tokens))

    # Reference: same fold / align-pad / crop around the torch generator, NCHW.
    t, h, w = grid
    x = torch.from_numpy(np.array(tokens)).reshape(b * t, h, w, D).permute(0, 3, 1, 2)
    x = TF.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate" if align_pad == "edge" else "constant")
    with torch.no_grad():
        y = ref(x)[:, :, :h, :w]
    expected = y.permute(0, 2, 3, 1).reshape(b, t * h * w, D).numpy()

    diff = float(np.max(np.abs(out - expected)))
    print(f"torch parity {norm}/{padding}/{align_pad}/affine={affine}: max|diff| = {diff:.2e}")
    assert float(np.std(expected)) > 0.05
    assert diff <= 1e-4


# ----------------------------------------------------------------------------- sizes


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_paper_size_param_count_matches_torch_reference():
    d, grid = 4096, (9, 13, 13)
    cfg = mapping_lib.paper()
    spec = jax.ShapeDtypeStruct((1, math.prod(grid), d), jnp.float32)
    shapes = jax.eval_shape(
        lambda k, x: MappingNetwork(cfg, features=d).init(k, x, grid), jax.random.key(0), spec
    )
    n_jax = _count(shapes["params"])
    with torch.device("meta"):
        ref = TorchResnetGenerator(d, 256, 9)
    n_torch = sum(p.numel() for p in ref.parameters())

    ngf = 256
    convs = 49 * d * ngf + 9 * ngf * 2 * ngf + 9 * 2 * ngf * 4 * ngf  # stem + 2 down
    convs += 18 * 9 * (4 * ngf) ** 2 + 9 * 4 * ngf * 2 * ngf + 9 * 2 * ngf * ngf  # blocks + up
    convs += 49 * ngf * d
    biases = ngf + 2 * ngf + 4 * ngf + 18 * 4 * ngf + 2 * ngf + ngf + d
    print(f"paper F params: jax {n_jax:,} torch {n_torch:,}; F+G {2 * n_jax:,}")
    assert n_jax == n_torch == convs + biases == 284_451_328

    fc = mapping_lib.paper_fc()
    fc_shapes = jax.eval_shape(
        lambda k, x: MappingNetwork(fc, features=d).init(k, x, grid), jax.random.key(0), spec
    )
    assert _count(fc_shapes["params"]) == 2 * (d * d + d)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("norm", ["instance", "layer"])
def test_gradient_reaches_every_param(norm):
    cfg = mapping_lib.tiny(ngf=4, n_blocks=1, norm=norm, instance_affine=True)
    grid = (2, 6, 5)
    tokens = _tokens(2, grid, seed=1)
    target = _tokens(2, grid, seed=2)
    _, params, apply = _init(cfg, tokens, grid)

    def loss(p):
        return jnp.mean((apply(p, tokens) - target) ** 2)

    grads = flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
    scale = max(float(jnp.max(jnp.abs(g))) for g in grads.values())
    for path, g in grads.items():
        size = float(jnp.max(jnp.abs(g)))
        assert np.isfinite(size), path
        # A conv bias directly followed by instance norm is cancelled by the mean
        # subtraction: its gradient is zero up to rounding (documented in mapping.py).
        dead = norm == "instance" and path.endswith("conv/bias")
        if dead:
            assert size <= 1e-5 * scale, (path, size)
        else:
            assert size > 1e-4 * scale, (path, size)
    n_dead = sum(norm == "instance" and p.endswith("conv/bias") for p in grads)
    assert n_dead == (3 + 2 * 1 + 2 if norm == "instance" else 0)
    assert len(grads) == 2 * (3 + 2 + 2) * 2 + 2  # conv k/b + norm scale/bias, head k/b


def test_mlp_gradient_and_no_spatial_mixing():
    cfg = mapping_lib.tiny(kind="mlp", mlp_hidden=16, mlp_layers=2)
    grid = (1, 3, 3)
    tokens = _tokens(1, grid)
    _, params, apply = _init(cfg, tokens, grid)
    out = apply(params, tokens)
    # Changing one token changes only that token's output.
    out2 = apply(params, tokens.at[0, 4].add(1.0))
    changed = np.any(np.asarray(out2 != out), axis=-1)[0]
    assert changed.tolist() == [i == 4 for i in range(9)]
    grads = jax.grad(lambda p: jnp.sum(apply(p, tokens) ** 2))(params)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


# ----------------------------------------------------------------------------- sharding


def test_logical_names_and_sharded_apply():
    cfg = mapping_lib.tiny(ngf=4, n_blocks=1, instance_affine=True)
    grid = (1, 5, 5)
    tokens = _tokens(4, grid)
    model = MappingNetwork(cfg, features=D)
    # rbg keys: threefry initialisers take seconds to compile on CPU.
    init = jax.jit(lambda k, x: model.init(k, x, grid))
    boxed = init(jax.random.key(0, impl="rbg"), tokens)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    vocab = {"conv_space", "mapping_embed", "mapping_mlp", "norm", None}
    assert all(set(x.names) <= vocab and len(x.names) == x.value.ndim for x in leaves)

    mesh = make_mesh((2, 2, 2))
    specs = nn.get_partition_spec(boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, TP_RULES)
    params = jax.device_put(nn.meta.unbox(boxed), shardings)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, grid))
    with nn.logical_axis_rules(TP_RULES), jax.set_mesh(mesh):
        out = apply(params, tokens)
    assert out.sharding.spec[0] == ("data", "fsdp")  # the batch constraint took effect
    expected = apply(nn.meta.unbox(boxed), tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
