"""The per-leaf block step size (`block_lr_rule`), against hand computations.

Each case writes down by hand how the layout cuts the matrix, the factor ρ that the default
"spectral" rule gives it (full shape scale over block shape scale over √blocks, with the shape
scale 0.2·sqrt(max(rows, cols))) and checks one real block step on the 2×4 mesh against float64
Newton–Schulz of hand-sliced tiles, times the tile's shape scale, times ρ.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from muonbp_jax import MuonDimensionNumbers
from tests import _reference as ref

# beta=0 without Nesterov: the momentum is the gradient; period=None: every step a block step.
BLOCK_ONLY = {"beta": 0.0, "nesterov": False, "ns_dtype": "float32", "period": None}
S = math.sqrt

# name: (shape, spec, block_grid, tiles (rows, cols) cut by hand, ρ by hand)
CASES = {
    # 16×32 split 4 ways on columns: 16×8 tiles; ρ = √32 / (√16 · √4).
    "tp_columns": ((16, 32), P(None, "model"), None, (1, 4), S(32) / (S(16) * 2)),
    # 64×16 split 4 ways on rows: 16×16 tiles; ρ = √64 / (√16 · 2) = 1.
    "tp_rows": ((64, 16), P("model", None), None, (4, 1), 1.0),
    # 64×16 split 4 ways on columns: tall 64×4 tiles; ρ = √64 / (√64 · 2) = 1/2.
    "tp_columns_tall": ((64, 16), P(None, "model"), None, (1, 4), 0.5),
    # FSDP: rows split over 'data' (2): 8×32 tiles; ρ = √32 / (√32 · √2).
    "fsdp": ((16, 32), P("data", None), None, (2, 1), 1 / S(2)),
    # 2-D tiles: 32×32 over (data, model) = 2×4: 16×8 tiles; ρ = √32 / (√16 · √8).
    "tiles_2d": ((32, 32), P("data", "model"), None, (2, 4), S(32) / (S(16) * S(8))),
    # block_grid (1, 2) on top of 4 column shards: 8 tiles of 16×4; ρ = √32 / (√16 · √8).
    "tp_columns_grid": ((16, 32), P(None, "model"), (1, 2), (1, 8), S(32) / (S(16) * S(8))),
    # Replicated: one block, the whole matrix; ρ = 1 exactly.
    "replicated": ((16, 32), P(), None, (1, 1), 1.0),
}


def _grad(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _block_step(tx, g: np.ndarray, spec, mesh):
    x = jax.device_put(jnp.asarray(g), NamedSharding(mesh, spec))
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)({"w": x})
        updates, _ = jax.jit(tx.update)({"w": x}, state)
    return np.asarray(updates["w"], np.float64)


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_step_takes_the_hand_computed_factor(name, mesh):
    shape, spec, grid, (r, c), rho = CASES[name]
    tx = muonbp_jax.scale_by_muonbp(specs={"w": spec}, mesh=mesh, block_grid=grid, **BLOCK_ONLY)
    g = _grad(shape)
    tiles = ref.split(g, r, c)
    expected = rho * np.block([[ref.full_update(t) for t in row] for row in tiles])
    actual = _block_step(tx, g, spec, mesh)
    assert ref.relative_error(actual, expected) < 1e-4
    assert muonbp_jax.block_lr_factor(shape, (shape[0] // r, shape[1] // c)) == pytest.approx(rho)


def test_stacked_layers_cut_per_layer_and_batch_sharding_keeps_one_block(mesh):
    dims = MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    g = _grad((4, 16, 32))
    # Layers split 4 ways on columns: each 16×32 layer in 16×8 tiles, ρ = √32 / (√16 · 2).
    spec = P(None, None, "model")
    tx = muonbp_jax.scale_by_muonbp(
        specs={"w": spec}, mesh=mesh, weight_dimension_numbers=dims, **BLOCK_ONLY
    )
    rho = S(32) / (S(16) * 2)
    expected = np.stack([rho * ref.block_update(layer, 1, 4, rule="none") for layer in g])
    assert ref.relative_error(_block_step(tx, g, spec, mesh), expected) < 1e-4
    # The layer (batch) axis sharded: every device holds whole matrices, ρ = 1.
    spec = P("model", None, None)
    tx = muonbp_jax.scale_by_muonbp(
        specs={"w": spec}, mesh=mesh, weight_dimension_numbers=dims, **BLOCK_ONLY
    )
    expected = np.stack([ref.full_update(layer) for layer in g])
    assert ref.relative_error(_block_step(tx, g, spec, mesh), expected) < 1e-4


def test_full_steps_take_no_factor(mesh):
    tx = muonbp_jax.scale_by_muonbp(
        specs={"w": P(None, "model")}, mesh=mesh, **{**BLOCK_ONLY, "period": 1}
    )
    g = _grad((16, 32))
    actual = _block_step(tx, g, P(None, "model"), mesh)
    assert ref.relative_error(actual, ref.full_update(g)) < 1e-4


@pytest.mark.parametrize(
    "rule, rho",
    [
        ("spectral", S(32) / (S(16) * 2)),
        ("sqrt_blocks", 1 / 2),
        ("quarter", 4**-0.25),
        ("none", 1.0),
    ],
)
def test_each_rule_on_tp_columns(rule, rho, mesh):
    spec = P(None, "model")
    tx = muonbp_jax.scale_by_muonbp(specs={"w": spec}, mesh=mesh, block_lr_rule=rule, **BLOCK_ONLY)
    g = _grad((16, 32))
    expected = rho * ref.block_update(g, 1, 4, rule="none")
    assert ref.relative_error(_block_step(tx, g, spec, mesh), expected) < 1e-4


def test_width_rule_factor():
    # consistent_rms=None: s = sqrt(max(1, cols/rows)); 16×32 in 16×8 tiles: √2 / (1 · 2).
    assert muonbp_jax.block_lr_factor((16, 32), (16, 8), "spectral", None) == pytest.approx(
        S(2) / 2
    )


def test_block_learning_rate_multiplies_the_rule_under_inject_hyperparams_and_schedules(mesh):
    spec = P(None, "model")
    tx = optax.inject_hyperparams(muonbp_jax.muonbp)(
        learning_rate=lambda t: 1.0 + t,
        block_learning_rate=lambda t: 10.0 + t,
        period=2,
        specs={"w": spec},  # the mesh comes from jax.set_mesh (mesh= would need static_args)
        beta=0.0,
        nesterov=False,
        ns_dtype="float32",
    )
    x = jax.device_put(jnp.zeros((16, 32)), NamedSharding(mesh, spec))
    rho = S(32) / (S(16) * 2)
    with jax.set_mesh(mesh):
        state = jax.jit(tx.init)({"w": x})
        update = jax.jit(tx.update)
        for t in range(4):
            g = _grad((16, 32), seed=t)
            updates, state = update({"w": jax.device_put(g, x.sharding)}, state, {"w": x})
            if t % 2 == 0:
                expected = -(1.0 + t) * ref.full_update(g)
            else:
                expected = -(10.0 + t) * rho * ref.block_update(g, 1, 4, rule="none")
            assert ref.relative_error(updates["w"], expected) < 1e-4, t
    assert update._cache_size() == 1


def test_unknown_rule_is_refused_at_construction():
    with pytest.raises(ValueError, match="block_lr_rule must be one of"):
        muonbp_jax.muonbp(1e-2, block_lr_rule="sqrt")


def test_explicit_mesh_reads_the_blocks_from_the_types():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    shape, spec, _, (r, c), rho = CASES["tiles_2d"]
    tx = muonbp_jax.scale_by_muonbp(**BLOCK_ONLY)  # no specs: the types carry them
    g = _grad(shape)
    tiles = ref.split(g, r, c)
    expected = rho * np.block([[ref.full_update(t) for t in row] for row in tiles])
    assert ref.relative_error(_block_step(tx, g, spec, mesh), expected) < 1e-4


def test_a_mesh_axis_of_size_one_gives_one_block_and_the_full_rate():
    mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = P(None, "model")  # 'model' has size 1: the whole matrix is one block
    tx = muonbp_jax.scale_by_muonbp(specs={"w": spec}, mesh=mesh, **BLOCK_ONLY)
    g = _grad((16, 32))
    assert ref.relative_error(_block_step(tx, g, spec, mesh), ref.full_update(g)) < 1e-4


def test_shape_scale_by_hand():
    # consistent_rms · sqrt(max(rows, cols)); None: optax's width rule sqrt(max(1, cols/rows)).
    assert muonbp_jax.shape_scale(16, 32, 0.2) == pytest.approx(0.2 * S(32))
    assert muonbp_jax.shape_scale(64, 16, 0.2) == pytest.approx(0.2 * 8)
    assert muonbp_jax.shape_scale(16, 32, None) == pytest.approx(S(2))
    assert muonbp_jax.shape_scale(32, 16, None) == 1.0
