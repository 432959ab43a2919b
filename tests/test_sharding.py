"""Mesh construction from the config's shape."""

import jax
import pytest

from exo2ego_jax.sharding import MESH_AXES, make_mesh


def test_fill_and_names():
    assert len(jax.devices()) == 8  # conftest fakes eight CPU devices
    mesh = make_mesh((-1, 2, 2))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh((1, -1, 1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    single = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert single.size == 1


@pytest.mark.parametrize(
    "shape, message",
    [
        ((3, -1, 1), "not divisible by 3"),
        ((2, 2, 1), "needs 4 devices but 8"),
        ((-1, -1, 1), "at most one"),
        ((8, 1), "must have 3 entries"),
    ],
)
def test_bad_mesh_shapes_are_named(shape, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(shape)
