"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
# jaxlib 0.10's CPU client launches all device programs from one pool of max(cores, devices)
# threads; with 8 fake devices on 2 cores, collectives can deadlock when dispatch runs ahead.
# A pool of at least twice the device count was seen to prevent it (25 of 25 runs clean in
# this project's soak test, benchmarks/soak.py).
os.environ.setdefault("PJRT_NPROC", "16")

import jax

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; import jax only after conftest"
