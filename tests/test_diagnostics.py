"""Diagnostics (issue 13): singular-value estimates against float64 NumPy SVDs of whole
matrices and of hand-split blocks, on sharded and unsharded leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from muonbp_jax import MuonDimensionNumbers, _diagnostics, _layout
from tests import _reference as ref

# name: (shape, spec on a 2x4 ('data', 'model') mesh, (row parts, col parts) of a device block)
LAYOUTS = {
    "cols": ((8, 16), P(None, "model"), (1, 4)),
    "rows": ((16, 8), P("model", None), (4, 1)),
    "tiles": ((8, 16), P("data", "model"), (2, 4)),
    "rows8": ((32, 8), P(("data", "model"), None), (8, 1)),
    "replicated": ((8, 16), P(), (1, 1)),
    "experts": ((4, 8, 16), P("model", None, None), (1, 1)),
    "stacked_tp": ((2, 8, 16), P("data", None, "model"), (1, 4)),
}
SPECS = {name: spec for name, (_, spec, _) in LAYOUTS.items()}
DIMS = {
    name: MuonDimensionNumbers(1, 2) if len(shape) == 3 else MuonDimensionNumbers()
    for name, (shape, _, _) in LAYOUTS.items()
}
EXACT = 8  # Lanczos iterations that span the smaller side (8) of every matrix here


def _svals(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return np.linalg.svd(x.astype(np.complex128 if np.iscomplexobj(x) else np.float64), compute_uv=False)


def _matrices(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, *x.shape[-2:])


def _tiles(x: np.ndarray, parts: tuple[int, int]) -> list[np.ndarray]:
    return [t for m in _matrices(x) for row in ref.split(m, *parts) for t in row]


def test_lanczos_spanning_the_small_side_is_exact():
    rng = np.random.default_rng(0)
    for shape in [(3, 12, 20), (2, 20, 12), (1, 8, 8)]:
        m = rng.standard_normal(shape).astype(np.float32)
        low, high = _diagnostics.piece_extremes(jnp.asarray(m), iterations=min(shape[1:]))
        s = np.stack([_svals(x) for x in m])
        np.testing.assert_allclose(high, s[:, 0], rtol=1e-4)
        np.testing.assert_allclose(low, s[:, -1], rtol=1e-3)


def test_few_iterations_stay_inside_the_spectrum_and_find_sigma_max():
    """Ritz values bracket the spectrum from inside; on Newton–Schulz outputs (clustered
    singular values) and on four equal orthogonalized blocks side by side (a block update of
    a gradient whose blocks share their singular vectors: every singular value doubles),
    five iterations find σ_max within 2%."""
    rng = np.random.default_rng(1)
    ns = np.stack([ref.newton_schulz(rng.standard_normal((64, 96))) for _ in range(3)])
    u = rng.standard_normal((64, 1))
    low_rank = u @ rng.standard_normal((1, 24)) + 0.1 * rng.standard_normal((64, 24))
    shared = ref.newton_schulz(low_rank)
    blocks = np.concatenate([shared, shared, shared, shared], axis=1)[None]  # 64×96
    for m in (ns, blocks):
        low, high = _diagnostics.piece_extremes(jnp.asarray(m, jnp.float32), iterations=5)
        s = np.stack([_svals(x) for x in m])
        assert np.all(np.asarray(high) <= s[:, 0] * (1 + 1e-5))
        assert np.all(np.asarray(low) >= s[:, -1] * (1 - 1e-5))
        np.testing.assert_allclose(high, s[:, 0], rtol=2e-2)
    assert _svals(blocks[0])[0] > 1.9  # twice the block's, which is near 1


def test_orthogonal_zero_and_complex_matrices():
    rng = np.random.default_rng(2)
    q = np.linalg.qr(rng.standard_normal((24, 24)))[0][:16]  # 16×24, orthonormal rows
    low, high = _diagnostics.piece_extremes(jnp.asarray(q[None], jnp.float32), iterations=5)
    np.testing.assert_allclose([float(low[0]), float(high[0])], [1.0, 1.0], atol=1e-5)
    low, high = _diagnostics.piece_extremes(jnp.zeros((2, 4, 6)), iterations=5)
    assert np.all(np.asarray(low) == 0) and np.all(np.asarray(high) == 0)
    z = rng.standard_normal((6, 10)) + 1j * rng.standard_normal((6, 10))
    low, high = _diagnostics.piece_extremes(jnp.asarray(z[None], jnp.complex64), iterations=12)
    np.testing.assert_allclose([float(low[0]), float(high[0])], _svals(z)[[-1, 0]], rtol=1e-3)


def _mesh(mode=AxisType.Auto):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)


def _leaves(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, (s, _, _) in LAYOUTS.items()}


def _sigmas(tree, mesh, specs, full, **config):
    the_mesh, layouts = _layout.plan(
        tree, specs=specs, mesh=mesh, dimension_numbers=DIMS, block_grid=None
    )
    cfg = _diagnostics.Diagnostics(iterations=EXACT, **config)
    fn = lambda xs: _diagnostics._sigmas(xs, layouts, the_mesh, cfg, full)
    out = jax.jit(fn)(jax.tree.leaves(tree))
    names = [lay.path[0] for lay in layouts]
    return {n: {k: float(v[i]) for k, v in out._asdict().items()} for i, n in enumerate(names)}


@pytest.mark.parametrize("sharded", [True, False], ids=["mesh", "one_device"])
def test_whole_and_block_singular_values_match_numpy(sharded):
    """Full steps: σ of the whole matrices; block steps: σ of each device block (hand-split
    here), and the whole matrix's σ_max where allowed: always for leaves whose matrix axes
    no mesh axis cuts, for cut leaves only with whole_norm_on_block_steps."""
    x = _leaves(3)
    mesh = _mesh()
    if sharded:
        tree = {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in x.items()}
        specs = SPECS
    else:
        tree, specs, mesh = {n: jnp.asarray(v) for n, v in x.items()}, None, None
    full = _sigmas(tree, mesh, specs, True)
    block = _sigmas(tree, mesh, specs, False)
    block_whole = _sigmas(tree, mesh, specs, False, whole_norm_on_block_steps=True)
    for name, (_, _, parts) in LAYOUTS.items():
        whole = np.stack([_svals(m) for m in _matrices(x[name])])
        assert full[name]["whole_max"] == pytest.approx(whole[:, 0].max(), rel=1e-4), name
        assert full[name]["piece_max"] == pytest.approx(whole[:, 0].max(), rel=1e-4), name
        assert full[name]["piece_min"] == pytest.approx(whole[:, -1].min(), rel=2e-3), name
        parts = parts if sharded else (1, 1)
        tiles = np.stack([_svals(t) for t in _tiles(x[name], parts)])
        assert block[name]["piece_max"] == pytest.approx(tiles[:, 0].max(), rel=1e-4), name
        assert block[name]["piece_min"] == pytest.approx(tiles[:, -1].min(), rel=2e-3), name
        assert block_whole[name]["whole_max"] == pytest.approx(whole[:, 0].max(), rel=1e-4)
        if parts == (1, 1):
            assert block[name]["whole_max"] == pytest.approx(whole[:, 0].max(), rel=1e-4)
        else:
            assert np.isnan(block[name]["whole_max"]), name
