"""Test-wide settings: 8 simulated CPU devices so mesh tests run in-process.

Must run before JAX is imported anywhere. Single-device tests place arrays on jax.devices()[0]
(JAX's default) and are unaffected.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
