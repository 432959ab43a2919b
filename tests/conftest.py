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
