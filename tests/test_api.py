"""The optimizer as users compose it: the step schedule, learning rates, inject_hyperparams,
chains and the errors bad input gets.

Block steps are made different from full steps without a mesh by `block_grid=(1, 4)`: a 16×32
matrix is then orthogonalized as four 16×8 tiles, like 4-way column sharding.
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
from tests import _fixtures as fx
from tests import _reference as ref

GRID = (1, 4)
# beta=0 without Nesterov: the momentum is the gradient, so each update is its orthogonalization.
PLAIN = {"beta": 0.0, "nesterov": False, "ns_dtype": "float32", "block_grid": GRID}


def _grad(seed: int, shape=(16, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _expected(g: np.ndarray, full: bool) -> np.ndarray:
    return ref.full_update(g) if full else ref.block_update(g, *GRID)


def _assert_close(actual, expected, what: str, tolerance: float = 1e-4) -> None:
    err = ref.relative_error(actual, expected)
    assert err < tolerance, f"{what}: relative error {err:.2e}"


# ----------------------------------------------------------------------------- schedule


def test_full_iff_count_mod_period_is_zero_with_both_learning_rates_scheduled():
    decay = 0.1
    tx = muonbp_jax.muonbp(
        lambda t: 1.0 + t,
        period=3,
        block_learning_rate=lambda t: 10.0 + t,
        weight_decay=decay,
        **PLAIN,
    )
    w = _grad(99)
    params = {"w": jnp.asarray(w)}
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(7):
        g = _grad(t)
        updates, state = update({"w": g}, state, params)
        full = t % 3 == 0
        rate = 1.0 + t if full else 10.0 + t  # weight decay, too, takes the step's rate
        expected = -rate * (_expected(g, full) + decay * w)
        _assert_close(updates["w"], expected, f"t={t}, full={full}")
    assert update._cache_size() == 1


def test_scale_by_muonbp_has_no_learning_rate():
    tx = muonbp_jax.scale_by_muonbp(
        beta=0.0, nesterov=False, period=None, ns_dtype="float32", block_grid=GRID
    )
    g = _grad(0)
    updates, state = tx.update({"w": g}, tx.init({"w": g}))
    assert isinstance(state, muonbp_jax.MuonBPState) and int(state.count) == 1
    _assert_close(updates["w"], _expected(g, full=False), "block step")


def test_period_none_never_takes_a_full_step():
    tx = muonbp_jax.muonbp(1.0, period=None, **PLAIN)
    params = {"w": jnp.zeros((16, 32))}
    state = tx.init(params)
    for t in range(2):
        g = _grad(t)
        updates, state = tx.update({"w": g}, state, params)
        _assert_close(updates["w"], -_expected(g, full=False), f"t={t}")


def test_consistent_rms_none_uses_the_width_rule_of_what_was_orthogonalized():
    tx = muonbp_jax.muonbp(1.0, period=2, consistent_rms=None, **PLAIN)
    params = {"w": jnp.zeros((16, 32))}
    state = tx.init(params)
    for t, scale in enumerate([np.sqrt(32 / 16), 1.0]):  # 16×32, then 16×8 tiles
        g = _grad(t)
        updates, state = tx.update({"w": g}, state, params)
        parts = (1, 1) if t == 0 else GRID
        expected = -ref.block_update(g, *parts, consistent_rms=None)
        assert ref.rms_scale(*np.shape(ref.split(g, *parts)[0][0]), None) == scale
        _assert_close(updates["w"], expected, f"t={t}")


# ----------------------------------------------------------------------------- inject_hyperparams


def test_inject_hyperparams_schedules_both_learning_rates():
    tx = optax.inject_hyperparams(muonbp_jax.muonbp)(
        learning_rate=1.0, block_learning_rate=0.5, period=2, **PLAIN
    )
    params = {"w": jnp.zeros((16, 32))}
    state, update = tx.init(params), jax.jit(tx.update)
    rates = {0: 1.0, 1: 0.5, 2: 3.0, 3: 0.25}
    for t, rate in rates.items():
        if t == 2:
            hp = state.hyperparams
            hp["learning_rate"] = jnp.asarray(3.0, hp["learning_rate"].dtype)
            hp["block_learning_rate"] = jnp.asarray(0.25, hp["block_learning_rate"].dtype)
        g = _grad(t)
        updates, state = update({"w": g}, state, params)
        _assert_close(updates["w"], -rate * _expected(g, full=t % 2 == 0), f"t={t}")
    assert update._cache_size() == 1


def test_inject_hyperparams_explains_a_dtype_taken_for_a_schedule():
    tx = optax.inject_hyperparams(muonbp_jax.muonbp)(learning_rate=1.0, ns_dtype=jnp.float32)
    with pytest.raises(TypeError, match="ns_dtype='float32'"):
        tx.init({"w": jnp.zeros((16, 32))})


# ----------------------------------------------------------------------------- chains


def test_chain_with_clip_by_global_norm_on_a_sharded_auto_mesh():
    mesh = fx.make_mesh()
    spec = {"w": P(None, "model")}
    params = {"w": jax.device_put(jnp.zeros((16, 32)), NamedSharding(mesh, spec["w"]))}
    assert muonbp_jax.partition_specs(params) == spec
    beta = 0.5
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        muonbp_jax.muonbp(
            1.0,
            beta=beta,
            nesterov=False,
            period=2,
            ns_dtype="float32",
            specs=lambda params: spec,  # a callable params -> specs
            mesh=mesh,
        ),
    )
    state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
    # A large first gradient is clipped hard, a small second one not: the momentum direction
    # depends on the clipping.
    mu = np.zeros((16, 32))
    for t, size in enumerate([100.0, 0.01]):
        g = _grad(t) * size
        clipped = g * min(1.0, 1.0 / np.linalg.norm(g))
        mu = beta * mu + (1 - beta) * clipped
        g_dev = jax.device_put(g, NamedSharding(mesh, spec["w"]))
        updates, state = update({"w": g_dev}, state, params)
        parts = (1, 1) if t == 0 else (1, 4)  # 4-way column sharding on block steps
        expected = -ref.block_update(mu / (1 - beta ** (t + 1)), *parts)
        _assert_close(updates["w"], expected, f"t={t}")


def test_apply_if_finite_skips_a_step_without_advancing_the_schedule():
    tx = optax.apply_if_finite(muonbp_jax.muonbp(1.0, period=2, **PLAIN), 3)
    params = {"w": jnp.zeros((16, 32))}
    state, update = tx.init(params), jax.jit(tx.update)
    g0, g2 = _grad(0), _grad(2)
    updates, state = update({"w": g0}, state, params)
    _assert_close(updates["w"], -_expected(g0, full=True), "t=0")
    bad = _grad(1)
    bad[3, 5] = np.nan
    updates, state = update({"w": bad}, state, params)
    assert not np.any(np.asarray(updates["w"])), "a non-finite step must not move the params"
    updates, state = update({"w": g2}, state, params)
    # The skipped step did not count: this is the update with index 1, a block step.
    _assert_close(updates["w"], -_expected(g2, full=False), "after the skipped step")


# ----------------------------------------------------------------------------- errors
# (Bad periods: tests/test_bad_config.py; compiling once over two periods:
# tests/test_determinism.py.)


def _sharded_params(mesh):
    shapes = {"attn": {"q": (16, 32), "o": (32, 16)}}
    specs = {"attn": {"q": P(None, "model"), "o": P("model", None)}}
    return jax.tree.map(
        lambda s, p: jax.device_put(jnp.zeros(s), NamedSharding(mesh, p)),
        shapes,
        specs,
        is_leaf=lambda s: isinstance(s, tuple),
    )


@pytest.mark.parametrize(
    ("specs", "leaf"),
    [
        ({"attn": {"q": P(None, "model")}}, "attn/o"),  # a leaf left out
        ({"attn": {"o": P("model", None), "qq": P(None, "model")}}, "attn/q"),  # misspelled
    ],
    ids=["missing", "misspelled"],
)
def test_spec_tree_that_does_not_match_names_the_leaf(specs, leaf):
    mesh = fx.make_mesh()
    tx = muonbp_jax.muonbp(0.1, specs=specs, mesh=mesh)
    with pytest.raises(ValueError, match=f"'{leaf}'"):
        tx.init(_sharded_params(mesh))


def test_auto_mode_without_specs_asks_for_them():
    tx = muonbp_jax.muonbp(0.1)
    with pytest.raises(ValueError, match="specs="):
        tx.init(_sharded_params(fx.make_mesh()))


def test_partition_specs_refuses_traced_auto_arrays():
    mesh = fx.make_mesh()
    params = _sharded_params(mesh)
    assert muonbp_jax.partition_specs(params) == {
        "attn": {"q": P(None, "model"), "o": P("model", None)}
    }
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(muonbp_jax.partition_specs)(params)


def test_auto_mode_under_jit_without_specs_asks_for_them():
    # Traced leaves show no sharding in Auto mode; under a context mesh of several devices they
    # must not be taken for unsharded ones (every block step would silently be a full step).
    mesh = fx.make_mesh()
    tx = muonbp_jax.muonbp(0.1, period=None)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="specs="):
        jax.jit(tx.init)(_sharded_params(mesh))
