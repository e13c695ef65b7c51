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
    return np.linalg.svd(
        x.astype(np.complex128 if np.iscomplexobj(x) else np.float64), compute_uv=False
    )


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
        assert np.all(np.asarray(low) >= s[:, -1] * (1 - 1e-5) - 1e-6)  # float32 floor
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


# ----------------------------------------------------------------------------- through muonbp

import optax

import muonbp_jax

LR, BLOCK_LR = 0.5, 0.25


def _tx(mesh, diagnostics, period=2, **kw):
    return muonbp_jax.muonbp(
        LR,
        block_learning_rate=BLOCK_LR,
        beta=0.0,
        nesterov=False,
        period=period,
        ns_dtype="float32",
        muon_weight_dimension_numbers=DIMS,
        specs=SPECS,
        mesh=mesh,
        diagnostics=diagnostics,
        **kw,
    )


def test_recorded_values_are_those_of_the_update():
    """A full then a block step on every layout: each recorded value recomputed in float64
    from the update the optimizer returned (whole matrices, hand-split device blocks)."""
    mesh = _mesh()
    config = muonbp_jax.Diagnostics(
        every=1, per_leaf=True, iterations=EXACT, whole_norm_on_block_steps=True
    )
    tx = _tx(mesh, config)
    x = _leaves(4)
    params = {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in x.items()}
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update)
    for index, kind in enumerate(("full", "block")):
        updates, state = step(params, state, params)
        got = muonbp_jax.read_diagnostics(state)
        assert float(got["full_step"]) == (kind == "full")
        assert int(got[f"{kind}/step"]) == index
        if kind == "full":  # no block step measured yet
            assert int(got["block/step"]) == -1 and np.isnan(float(got["block/update_rms_mean"]))
        assert float(got["learning_rate"]) == (LR if kind == "full" else BLOCK_LR)
        expected = {}
        for name, (shape, _, parts) in LAYOUTS.items():
            parts = (1, 1) if kind == "full" else parts
            rho = ref.block_factor(shape[-2:], *parts)
            u = -np.asarray(updates[name], np.float64) / (float(got["learning_rate"]) * rho)
            tile_shape = (shape[-2] // parts[0], shape[-1] // parts[1])
            o = u / ref.rms_scale(*tile_shape)
            tiles = np.stack([_svals(t) for t in _tiles(o, parts)])
            expected[name] = {
                "block_factor": rho,
                "update_rms": np.sqrt(np.mean(u**2)),
                "update_spectral": max(_svals(m)[0] for m in _matrices(u)),
                "block_spectral": tiles[:, 0].max() * ref.rms_scale(*tile_shape),
                "ns_sigma_max": tiles[:, 0].max(),
                "ns_sigma_min": tiles[:, -1].min(),
                "momentum_norm": np.linalg.norm(x[name]),
            }
            for field, value in expected[name].items():
                rel = 3e-3 if field == "ns_sigma_min" else 1e-4
                assert float(got[f"{kind}/{name}/{field}"]) == pytest.approx(value, rel=rel), (
                    kind,
                    name,
                    field,
                )
        for field in muonbp_jax.LeafDiagnostics._fields:
            values = [expected[n][field] for n in LAYOUTS]
            rel = 3e-3 if field == "ns_sigma_min" else 1e-4
            for stat, fn in (("mean", np.mean), ("max", np.max), ("min", np.min)):
                assert float(got[f"{kind}/{field}_{stat}"]) == pytest.approx(fn(values), rel=rel)
        assert float(got["learning_rate_min"]) == pytest.approx(
            float(got["learning_rate"]) * min(expected[n]["block_factor"] for n in LAYOUTS)
        )
        if kind == "block":  # blocks of a random matrix: the whole update is larger
            assert float(got["block/update_spectral_max"]) > 1.3 * float(
                got["block/block_spectral_max"]
            )
            assert int(got["full/step"]) == 0  # the full step's record is kept


def _collectives(text: str) -> list[str]:
    import re

    return re.findall(
        r"= (\S+) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)\(", text
    )


def test_block_steps_keep_to_scalar_all_reduces():
    """BlockMuon with diagnostics: only all-reduces of a few floats per leaf (the block
    maxima, the Frobenius norms); asking for the whole norm on block steps adds vector ones."""
    mesh = _mesh()
    params = {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in _leaves(0).items()}

    def compiled(diagnostics):
        tx = _tx(mesh, diagnostics, period=None)
        state = jax.jit(tx.init)(params)
        return jax.jit(tx.update).lower(params, state, params).compile().as_text()

    found = _collectives(compiled(True))
    assert found and {op for _, op in found} == {"all-reduce"}, found
    small = lambda shape: int(
        np.prod([int(d) for d in shape.split("[")[1].split("]")[0].split(",") if d] or [1])
    )
    assert all(small(shape) <= 3 * len(LAYOUTS) for shape, _ in found), found
    vectors = _collectives(compiled(muonbp_jax.Diagnostics(whole_norm_on_block_steps=True)))
    assert len(vectors) > len(found)


def test_off_by_default_and_bad_options():
    mesh = _mesh()
    params = {n: jax.device_put(v, NamedSharding(mesh, SPECS[n])) for n, v in _leaves(0).items()}
    off = jax.eval_shape(_tx(mesh, False).init, params)
    assert optax.tree.get(off, "diagnostics") is None
    assert all(
        s.learning_rate is None for s in _states(off, muonbp_jax.ScaleByStepLearningRateState)
    )
    on = jax.eval_shape(_tx(mesh, True).init, params)
    assert isinstance(optax.tree.get(on, "diagnostics"), muonbp_jax.MuonBPDiagnostics)
    # Only the diagnostics are added: the rest of the state is leaf for leaf the same.
    # kind, ρ stats, two records of (step, 3 x 7 stats); the rate in the step-size state.
    assert len(jax.tree.leaves(on)) == len(jax.tree.leaves(off)) + 2 + 2 * (1 + 21) + 1
    for bad in (
        "yes",
        muonbp_jax.Diagnostics(iterations=0),
        muonbp_jax.Diagnostics(every=0),
        muonbp_jax.Diagnostics(every=2.5),
    ):
        with pytest.raises(ValueError, match="iterations|every|diagnostics must be"):
            _tx(mesh, bad)


def _states(tree, cls):
    return [
        s for s in jax.tree.leaves(tree, is_leaf=lambda s: isinstance(s, cls)) if isinstance(s, cls)
    ]


def test_inject_hyperparams_multisteps_nnx_and_orbax(tmp_path):
    import orbax.checkpoint as ocp
    from flax import nnx

    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)}

    tx = optax.inject_hyperparams(muonbp_jax.muonbp)(learning_rate=0.1, diagnostics=True, period=2)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(grads, state, params)
    got = muonbp_jax.read_diagnostics(state)
    assert float(got["learning_rate"]) == pytest.approx(0.1) and float(got["full_step"]) == 1

    multi = optax.MultiSteps(muonbp_jax.muonbp(0.1, diagnostics=True, period=2), every_k_schedule=2)
    mstate = multi.init(params)
    step = jax.jit(multi.update)
    kinds = []
    for _ in range(4):
        _, mstate = step(grads, mstate, params)
        kinds.append(float(muonbp_jax.read_diagnostics(mstate)["full_step"]))
    assert kinds == [0.0, 1.0, 1.0, 0.0]  # zeros before the first applied update; full, block
    got = muonbp_jax.read_diagnostics(mstate)
    assert (int(got["full/step"]), int(got["block/step"])) == (0, 1)

    ckpt = ocp.StandardCheckpointer()
    path = (tmp_path / "ckpt").resolve()
    ckpt.save(path, mstate)
    ckpt.wait_until_finished()
    restored = ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, mstate))
    assert jax.tree.structure(restored) == jax.tree.structure(mstate)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(mstate)):
        np.testing.assert_array_equal(a, b)

    model = nnx.Linear(8, 16, use_bias=False, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, muonbp_jax.muonbp(0.1, diagnostics="per_leaf"), wrt=nnx.Param)

    @nnx.jit
    def train(model, opt, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        opt.update(model, grads)

    train(model, opt, jnp.ones((4, 8)))
    got = muonbp_jax.read_diagnostics(opt.opt_state)  # NamedTuples of nnx.OptState variables
    assert float(got["full_step"]) == 1 and float(got["full/update_spectral_max"]) > 0
    assert any(k.startswith("full/") and k.endswith("/update_rms") for k in got), list(got)


def _expected_records(period, every, updates):
    """Per update t, the index of the last measured full and block step after t: each window
    of `every` updates measures the first update of each kind in it (-1: none yet)."""
    last, seen, out = {True: -1, False: -1}, set(), []
    for t in range(updates):
        full = period == 1 or (period is not None and t % period == 0)
        if (full, t // every) not in seen:
            seen.add((full, t // every))
            last[full] = t
        out.append((last[True], last[False]))
    return out


@pytest.mark.parametrize(
    "period, adaptive",
    [(2, False), (None, True), (1, False)],
    ids=["P2", "blockmuon_adaptive", "P1"],
)
def test_every_measures_the_first_full_and_block_step_of_each_window(period, adaptive):
    """With every=3 the other updates carry the record of their kind unchanged (a periodic
    MuonBP skips inside its step switch, a fixed kind with a lax.cond of its own), and a
    measured record equals what every=1 records for the same update. With `adaptive` the
    recorded update RMS is that of the update returned (its ⟨M, O⟩ factor included)."""
    params = {"w": jnp.asarray(np.random.default_rng(6).standard_normal((8, 16)), jnp.float32)}
    grads = [
        {"w": jnp.asarray(np.random.default_rng(10 + t).standard_normal((8, 16)), jnp.float32)}
        for t in range(8)
    ]
    lr = 0.1

    def run(every):
        tx = muonbp_jax.muonbp(
            lr,
            period=period,
            adaptive=adaptive,
            weight_decay=0.0,
            diagnostics=muonbp_jax.Diagnostics(every=every),
        )
        state, step, seen, rms = tx.init(params), jax.jit(tx.update), [], []
        for g in grads:
            u, state = step(g, state, params)
            seen.append({k: float(v) for k, v in muonbp_jax.read_diagnostics(state).items()})
            rms.append(float(np.sqrt(np.mean(np.asarray(u["w"], np.float64) ** 2))))
        return seen, rms

    (every1, rms), (every3, _) = run(1), run(3)
    for t, (full_rec, block_rec) in enumerate(_expected_records(period, 3, len(grads))):
        got = (int(every3[t]["full/step"]), int(every3[t]["block/step"]))
        assert got == (full_rec, block_rec), t
        for kind, m in (("full", full_rec), ("block", block_rec)):
            if m < 0:
                assert np.isnan(every3[t][f"{kind}/update_rms_mean"])
                continue
            for key in (f"{kind}/update_rms_mean", f"{kind}/momentum_norm_max"):
                assert every3[t][key] == pytest.approx(every1[m][key], rel=1e-6), (kind, t, key)
    for t, s in enumerate(every1):  # one leaf: the record of update t is its update's
        kind = "full" if s["full_step"] == 1.0 else "block"
        assert int(s[f"{kind}/step"]) == t
        moved = s["learning_rate"] * s[f"{kind}/block_factor_mean"] * s[f"{kind}/update_rms_mean"]
        assert moved == pytest.approx(rms[t], rel=1e-4), t
