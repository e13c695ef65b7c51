"""Device setup that must happen before jax is imported (this module never imports jax)."""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import sys

ACCELERATOR_PLATFORMS = ("cuda", "gpu", "rocm", "tpu")
DEFAULT_CPU_DEVICES = 8
_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def accelerator_requested() -> bool:
    """Whether jax will look for a GPU or TPU: JAX_PLATFORMS names one, or (unset) a PJRT
    plugin for one is installed (jax[cuda*], jax[rocm], jax[tpu])."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(p in platforms for p in ACCELERATOR_PLATFORMS)
    if importlib.util.find_spec("libtpu") is not None:
        return True
    spec = importlib.util.find_spec("jax_plugins")  # namespace package of PJRT plugins
    locations = spec.submodule_search_locations if spec is not None else None
    return bool(locations) and any(pkgutil.iter_modules(list(locations)))


def use_cpu_devices(
    count: int | None = None, *, force: bool = False, pjrt_nproc: int | bool = True
) -> bool:
    """Makes jax present `count` fake CPU devices unless a GPU/TPU is requested (or `force`);
    returns whether it did. Must run before jax is imported. `count=None` keeps a count
    already set in XLA_FLAGS, else uses DEFAULT_CPU_DEVICES; other XLA flags are kept.

    `PJRT_NPROC` (≥ twice the device count) keeps jaxlib 0.10's CPU collectives from
    deadlocking on machines with few cores (see tests/conftest.py). `pjrt_nproc=True` sets it
    to max(16, 2·count) unless it is set already, an int sets it to that, `False` leaves the
    environment as it is (tools/soak.py's control runs, which show the deadlock).
    """
    if not force and accelerator_requested():
        return False
    if "jax" in sys.modules:
        raise RuntimeError("use_cpu_devices() must run before jax is imported.")
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    found = _COUNT_FLAG.search(flags)
    if count is None:
        count = int(found.group(1)) if found else DEFAULT_CPU_DEVICES
    flags = _COUNT_FLAG.sub("", flags).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if pjrt_nproc is True:
        os.environ.setdefault("PJRT_NPROC", str(max(16, 2 * count)))
    elif pjrt_nproc is not False:
        os.environ["PJRT_NPROC"] = str(int(pjrt_nproc))
    return True
