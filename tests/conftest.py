"""Test setup: 8 fake CPU devices, configured before anything imports jax."""

import importlib.util
from pathlib import Path

# The one fake-device helper of the project (examples/lm/devices.py imports no jax), loaded by
# path so that the tests do not put examples/ on sys.path.
_path = Path(__file__).resolve().parents[1] / "examples" / "lm" / "devices.py"
_spec = importlib.util.spec_from_file_location("_fake_devices", _path)
_devices = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_devices)
# jaxlib 0.10's CPU client launches all device programs from one pool of max(cores, devices)
# threads; with 8 fake devices on 2 cores, collectives can deadlock when dispatch runs ahead.
# A pool of at least twice the device count (PJRT_NPROC=16, which the helper sets unless it is
# set already) was seen to prevent it (25 of 25 runs clean in this project's soak test,
# tools/soak.py). On CPU even where a GPU or TPU is installed: force=True.
_devices.use_cpu_devices(8, force=True)

import jax

assert jax.device_count() == 8, "tests expect 8 fake CPU devices; import jax only after conftest"

import pytest

from tests import _fixtures


@pytest.fixture(scope="session")
def mesh():
    """The 2×4 ('data', 'model') mesh with Auto axes (tests/_fixtures.py: make_mesh)."""
    return _fixtures.make_mesh()
