"""Meshes, placement, random trees, layouts and state lookups shared by the test files.

Only setup lives here; every expected value comes from tests/_reference.py (float64 NumPy) or
from optax, never from muonbp_jax.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers as Dims

AXES = ("data", "model")
MESH_SHAPE = (2, 4)  # data=2, model=4 on the 8 fake devices of tests/conftest.py


class Layout(NamedTuple):
    """A parameter's shape, its PartitionSpec on the 2×4 mesh, its Muon dimension numbers and,
    where a test needs it, the (row parts, col parts) of one device's block of each matrix."""

    shape: tuple[int, ...]
    spec: P
    dims: Dims
    parts: tuple[int, int] | None = None


# The core layouts, on which tests/test_layouts.py checks block and full steps and
# tests/test_strategies.py the full-step strategies; each file adds its own on top.
LAYOUTS = {
    "cols": Layout((16, 32), P(None, "model"), Dims(), (1, 4)),
    "rows": Layout((32, 16), P("model", None), Dims(), (4, 1)),
    "tiles": Layout((16, 32), P("data", "model"), Dims(), (2, 4)),
    "rows8": Layout((32, 16), P(("data", "model"), None), Dims(), (8, 1)),
    "replicated": Layout((16, 32), P(), Dims(), (1, 1)),
    "stacked": Layout((2, 16, 32), P(None, None, "model"), Dims(1, 2), (1, 4)),
}


def make_mesh(mode: AxisType = AxisType.Auto, shape=MESH_SHAPE) -> jax.sharding.Mesh:
    """A ('data', 'model') mesh with both axes of one type."""
    return jax.make_mesh(shape, AXES, axis_types=(mode,) * len(shape))


def put(tree: Mapping, mesh, specs: Mapping, dtype=None) -> dict:
    """Each entry of a flat dict placed on `mesh` as `specs[key]` says (optionally cast)."""
    cast = (lambda v: v) if dtype is None else (lambda v: np.asarray(v).astype(dtype))
    return {k: jax.device_put(cast(v), NamedSharding(mesh, specs[k])) for k, v in tree.items()}


def normal_tree(seed: int, shapes: Mapping, dtype=np.float32) -> dict[str, np.ndarray]:
    """A flat dict of standard normal arrays of the given shapes, drawn in key order."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def muon_state(state) -> muonbp_jax.MuonBPState:
    """The one MuonBPState inside an optimizer state (e.g. muonbp's optax.partition state)."""
    is_state = lambda s: isinstance(s, muonbp_jax.MuonBPState)
    (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]
    return found
