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
