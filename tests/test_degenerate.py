"""Degenerate gradients: zero, tiny, huge and non-finite values, and optax's step-skipping
wrappers, on a 2×4 mesh with sharded leaves.

Three Muon leaves share the global shape 16×32, so the full step orthogonalizes them in one
batched call, and two of them share the local block shape, so the block step does too: a NaN
batched with clean matrices must stay in its own matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _reference as ref
from tests import _trajectory

PERIOD, LR = 2, 0.1
# name: (shape, spec, (row parts, col parts) of one device's block on the 2x4 mesh)
MUON = {
    "a": ((16, 32), P(None, "model"), (1, 4)),
    "b": ((16, 32), P(None, "model"), (1, 4)),
    "c": ((16, 32), P("data", "model"), (2, 4)),
}
SPECS = {"bias": P("model"), **{name: spec for name, (_, spec, _) in MUON.items()}}
SHAPES = {"bias": (32,), **{name: shape for name, (shape, _, _) in MUON.items()}}
# Relative error against float64 allowed for the default bfloat16 Newton–Schulz (Polar Express,
# whose first step multiplies by up to 23 and amplifies bfloat16 rounding: 0.100-0.102 measured
# here): a block update differs from a full one by > 40%, and a zero update by 100%.
TOLERANCE = 0.15


def _grads(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) * scale for k, s in SHAPES.items()}


def _put(tree, mesh, dtype=jnp.float32):
    return {
        k: jax.device_put(jnp.asarray(v, dtype), NamedSharding(mesh, SPECS[k]))
        for k, v in tree.items()
    }


def _run(tx, grads, mesh, dtype=jnp.float32, update=None):
    """The updates of `tx` for a list of gradient trees, as float64 NumPy."""
    params = _put(jax.tree.map(np.zeros_like, grads[0]), mesh, dtype)
    state = tx.init(params)
    update = update or jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(_put(g, mesh, dtype), state, params)
        out.append({k: np.asarray(v, np.float64) for k, v in jax.block_until_ready(u).items()})
    return out


def _expected_muon(grads, name: str, start: int = 0) -> list[np.ndarray]:
    expected, _ = _trajectory.updates(
        [g[name] for g in grads], MUON[name][2], PERIOD, learning_rate=LR, start=start
    )
    return expected


@pytest.fixture(scope="module")
def alias(mesh):
    """muonbp with its defaults (bfloat16 Newton–Schulz) and one jitted update per dtype."""
    tx = muonbp_jax.muonbp(LR, period=PERIOD, specs=SPECS, mesh=mesh)
    return tx, jax.jit(tx.update)


@pytest.fixture(scope="module")
def alias_f32(mesh):
    """float32 Newton–Schulz: a rounding that crossed from one matrix to another would show."""
    tx = muonbp_jax.muonbp(LR, period=PERIOD, ns_dtype="float32", specs=SPECS, mesh=mesh)
    return tx, jax.jit(tx.update)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_zero_tiny_and_huge_gradients_give_finite_updates(alias, mesh, dtype):
    tx, update = alias
    unit = [_grads(s) for s in range(3)]  # updates 0, 2 full, 1 block
    for scale in (0.0, 1e-30, 1e30):
        grads = [{k: v * scale for k, v in g.items()} for g in unit]
        updates = _run(tx, grads, mesh, dtype, update)
        for step, u in enumerate(updates):
            for name, v in u.items():
                assert np.isfinite(v).all(), f"scale {scale}, step {step}, {name}: not finite"
        if scale == 0.0:
            assert all(not v.any() for u in updates for v in u.values()), "zero grads moved"
        elif scale == 1e30:
            # Newton–Schulz forgets the scale: a 1e30 gradient gives the unit one's update
            # (before the fix of its normalization, the squares overflowed and it gave zero).
            for name in MUON:
                for step, e in enumerate(_expected_muon(unit, name)):
                    err = ref.relative_error(updates[step][name], e)
                    assert err < TOLERANCE, f"1e30, step {step}, {name}: rel. error {err:.2e}"
        else:
            # Below eps the normalizer is eps, as in optax: the update shrinks with the gradient.
            assert max(np.abs(u[name]).max() for u in updates for name in MUON) < 1e-15


@pytest.mark.parametrize("ns_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_muon_branch_takes_gradients_up_to_1e38(mesh, dtype, ns_dtype):
    """Entries near the top of the float32/bfloat16 range (3.4e38) together with tiny and
    subnormal ones; optax's own Nesterov order overflowed above ~1.7e37."""
    unit = [{k: v / np.abs(v).max() for k, v in _grads(s).items() if k in MUON} for s in range(3)]
    for g in unit:
        g["a"][0, :3] = [1.0 / 1e38, 1.2e-38 / 1e38, 0.0]  # smallest normal and below, scaled
    grads = [{k: v * 1e38 for k, v in g.items()} for g in unit]
    tx = muonbp_jax.scale_by_muonbp(
        period=PERIOD, ns_dtype=ns_dtype, specs={k: SPECS[k] for k in MUON}, mesh=mesh
    )
    params = _put(jax.tree.map(np.zeros_like, grads[0]), mesh, dtype)
    state = tx.init(params)
    update = jax.jit(tx.update)
    expected = {k: _trajectory.updates([g[k] for g in unit], MUON[k][2], PERIOD)[0] for k in MUON}
    for step, g in enumerate(grads):
        u, state = update(_put(g, mesh, dtype), state)
        for name in MUON:
            err = ref.relative_error(np.asarray(u[name], np.float64), -expected[name][step])
            assert err < TOLERANCE, f"step {step}, {name}: relative error {err:.2e}"


@pytest.mark.parametrize("ns_dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("scale", [3.4e38, 1e30, 1e-30, 1e-38])
def test_orthogonalize_forgets_the_scale(scale, ns_dtype):
    x = np.random.default_rng(0).standard_normal((2, 8, 16))
    x /= np.abs(x).max(axis=(1, 2), keepdims=True)
    y = np.asarray(muonbp_jax.orthogonalize(jnp.asarray(x * scale, jnp.float32), dtype=ns_dtype))
    assert np.isfinite(y).all()
    if scale > 1:
        for got, m in zip(y, x):
            assert ref.relative_error(got, ref.newton_schulz(m)) < TOLERANCE


@pytest.mark.parametrize("bad", ["a", "c", "bias"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_leaf_does_not_spread(alias_f32, mesh, bad, value):
    tx, update = alias_f32
    clean = [_grads(s) for s in range(4)]  # full, block, full, block
    dirty = [dict(g) for g in clean]
    dirty[0][bad] = dirty[0][bad].copy()
    dirty[0][bad].flat[5] = value
    expected, got = _run(tx, clean, mesh, update=update), _run(tx, dirty, mesh, update=update)
    for step, (e, u) in enumerate(zip(expected, got)):
        assert not np.isfinite(u[bad]).all(), f"step {step}: the bad leaf {bad} looks finite"
        for name in SHAPES:
            if name != bad:
                # To the bit: each matrix of a batch is normalized and iterated on its own, so
                # nothing of the bad one, not even a rounding, reaches the others.
                np.testing.assert_array_equal(u[name], e[name], err_msg=f"step {step}, {name}")


def _bad_at(grads, step: int):
    grads = [dict(g) for g in grads]
    grads[step]["a"] = np.full_like(grads[step]["a"], np.nan)
    return grads


def test_apply_if_finite_skips_without_advancing_the_period(mesh):
    """A skipped step leaves the whole inner state alone, its update count included: the next
    good gradient gets the step kind the skipped one would have had."""
    good = [_grads(10 + s) for s in range(5)]
    grads = good[:2] + _bad_at(good[:1], 0) + good[2:]
    inner = muonbp_jax.muonbp(LR, period=PERIOD, specs=SPECS, mesh=mesh)
    updates = _run(optax.apply_if_finite(inner, max_consecutive_errors=3), grads, mesh)
    assert all(not v.any() for v in updates[2].values()), "the skipped step moved"
    kept = updates[:2] + updates[3:]
    for name in MUON:
        for step, e in enumerate(_expected_muon(good, name)):
            err = ref.relative_error(kept[step][name], e)
            assert err < TOLERANCE, f"inner update {step}, {name}: relative error {err:.2e}"


def test_multi_steps_counts_the_period_in_optimizer_updates(mesh):
    """With gradient accumulation over k micro-batches, the period counts applied updates."""
    micro = [_grads(20 + s) for s in range(6)]
    tx = optax.MultiSteps(muonbp_jax.muonbp(LR, period=PERIOD, specs=SPECS, mesh=mesh), 2)
    updates = _run(tx, micro, mesh)
    for step in (0, 2, 4):
        assert all(not v.any() for v in updates[step].values()), f"micro-step {step} moved"
    means = [jax.tree.map(lambda a, b: (a + b) / 2, micro[i], micro[i + 1]) for i in (0, 2, 4)]
    for name in MUON:
        for k, e in enumerate(_expected_muon(means, name)):  # full, block, full
            err = ref.relative_error(updates[2 * k + 1][name], e)
            assert err < TOLERANCE, f"update {k}, {name}: relative error {err:.2e}"
