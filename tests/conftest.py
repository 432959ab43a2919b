"""Shared pytest setup.

Eight fake CPU devices are requested before JAX is imported anywhere, so sharding tests can
build real meshes; single-device tests simply use ``jax.devices()[0]``.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep HF/transformers strictly offline: nothing may be downloaded at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same programs (a train step before and after a restart, the same tiny
# model in several files): a persistent compilation cache makes the repeats cheap.
_CACHE = os.environ.get("EXO2EGO_TEST_JAX_CACHE", "/tmp/exo2ego-jax-test-cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------- shared data

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny demo world (8 takes), generated once per test session (per xdist worker)."""
    from input_pipeline.synthetic import generate_world  # noqa: PLC0415

    root = tmp_path_factory.getbasetemp() / "demo_world_8"
    if not (root / "world.json").is_file():
        generate_world(root, seed=0, num_takes=8, progress=False)
    return root


@pytest.fixture(scope="session")
def prepared(world, tmp_path_factory):
    """``world``'s datasets and demo tokenizer (``input_pipeline.prepare``)."""
    from input_pipeline.prepare import prepare  # noqa: PLC0415

    out = tmp_path_factory.getbasetemp() / "prepared_8"
    prepare(world, out, progress=False)  # keeps what exists: free the second time
    return out
