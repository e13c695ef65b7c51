"""The contract every optax optimizer keeps, checked over several muonbp configurations (after
the shape of optax's own `contrib/_common_test.py`): `inject_hyperparams` with the learning rate
as a hyperparameter, updates in the parameters' dtype, `optax.MultiSteps`, one trace of a
jitted step over block and full steps, and optimizer state whose shardings do not move.

Each configuration is small: two matrices and a bias; block steps differ from full ones through
`block_grid` on one device or through the 2×4 mesh.
"""

from __future__ import annotations

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _fixtures as fx

# One tree in both dtypes (b and b16 go to AdamW): a single compilation covers float32 and
# bfloat16 parameters.
SHAPES = {"w": (8, 32), "v": (32, 8), "b": (32,), "w16": (8, 32), "b16": (32,)}
DTYPES = {k: np.float32 if not k.endswith("16") else jnp.bfloat16 for k in SHAPES}
# The spelling jit gives back: Auto mode drops trailing Nones, Explicit mode keeps them.
_COLS, _BIAS = P(None, "model"), P("model")
SPECS = {
    AxisType.Auto: {"w": _COLS, "v": P("model"), "b": _BIAS},
    AxisType.Explicit: {"w": _COLS, "v": P("model", None), "b": _BIAS},
}
SPECS = {mode: specs | {"w16": _COLS, "b16": _BIAS} for mode, specs in SPECS.items()}
# Two Newton–Schulz iterations: the contract does not depend on their number, and the compiled
# programs (every test compiles a full and a block step) stay small.
FEW = {"ns_steps": 2}
CONFIGS = {
    "muon_p1": {"period": 1, **FEW},
    "p3_grid": {"period": 3, "block_grid": (1, 2), **FEW},
    "blockmuon": {"period": None, "block_grid": (2, 1), **FEW},
    "gram": {"period": 2, "ns_method": "gram", "ns_coeffs": "polar_express", "block_grid": (1, 2)},
    "auto_mesh": {"period": 3, "mesh": AxisType.Auto, **FEW},
}
# Explicit axes (specs read from the types) for the sharding test.
MESH_CONFIGS = {
    "auto_mesh": CONFIGS["auto_mesh"],
    "explicit_mesh": {"period": 3, "mesh": AxisType.Explicit},
}


class Setup:
    """A configuration's muonbp keywords, where its trees live and the context to run it in;
    its optimizer's jitted init and update are shared by the tests (one compilation)."""

    def __init__(self, config: dict):
        kw = dict(config)
        self.mode = kw.pop("mesh", None)
        self.period = kw["period"]
        self.mesh = None if self.mode is None else fx.make_mesh(self.mode)
        if self.mode == AxisType.Auto:
            kw |= {"specs": SPECS[self.mode], "mesh": self.mesh}
        self.kw = kw
        self.plain = self.tx()
        # One jitted update for every test of the configuration: traced and compiled once
        # over all of them (both step kinds, fresh and continued states; checked below).
        chex.clear_trace_counter()
        self.init = jax.jit(self.plain.init)
        self.update = jax.jit(chex.assert_max_traces(self.plain.update, n=1))

    def context(self):
        # Explicit mode reads the specs from the types, under the mesh context.
        if self.mode == AxisType.Explicit:
            return jax.set_mesh(self.mesh)
        return contextlib.nullcontext()

    def put(self, tree):
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return fx.put(tree, self.mesh, SPECS[self.mode])

    def steps(self) -> int:
        """Enough updates for both kinds of step (two periods)."""
        return 3 if self.period is None else 2 * self.period

    def tx(self, learning_rate=0.1, **kw):
        return muonbp_jax.muonbp(learning_rate, **self.kw, **kw)


def _grads(seed: int):
    return {k: v.astype(DTYPES[k]) for k, v in fx.normal_tree(seed, SHAPES).items()}


def f32(tree: dict) -> dict:
    return {k: v for k, v in tree.items() if DTYPES[k] == np.float32}


@functools.cache
def _setup(name: str) -> Setup:
    """One Setup per configuration name for the whole module: a configuration used by several
    tests (auto_mesh) compiles its init and update once."""
    return Setup((CONFIGS | MESH_CONFIGS)[name])


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request) -> Setup:
    return _setup(request.param)


def test_learning_rate_is_an_injectable_hyperparameter(setup):
    """The injected optimizer gives the plain one's updates; halving its learning_rate in the
    state halves every update from then on (both branches: the state does not depend on it)."""
    # ns_steps and a mesh are not hyperparameters (README: "With other optax tools").
    static = tuple(k for k in ("ns_steps", "mesh") if k in setup.kw)
    injected = optax.inject_hyperparams(muonbp_jax.muonbp, static_args=static)(0.1, **setup.kw)
    with setup.context():
        params = setup.put(_grads(0))
        state, plain_state = injected.init(params), setup.init(params)
        update = jax.jit(injected.update)
        half = setup.steps() // 2
        for t in range(setup.steps()):
            grads = setup.put(_grads(1 + t))
            if t == half:
                # lr / 2 keeps the array's dtype and weak type, as a user's schedule would.
                state.hyperparams["learning_rate"] = state.hyperparams["learning_rate"] / 2
            updates, state = update(grads, state, params)
            expected, plain_state = setup.update(grads, plain_state, params)
            factor = 1.0 if t < half else 0.5
            expected = jax.tree.map(lambda u, f=factor: (f * u).astype(u.dtype), expected)
            # The float32 leaves, as optax's own test does: on this mixed-dtype tree
            # inject_hyperparams stores the hyperparameters in float32, which rounds bfloat16
            # leaves differently (and optax.adamw then returns float32 updates for them; dtypes
            # are checked without injection below).
            chex.assert_trees_all_close(f32(updates), f32(expected), rtol=1e-5, atol=1e-7)


# MultiSteps wraps the whole update in its own conditional and sees only what it returns, so
# two configurations cover it: a block step (blockmuon) and a full step inside muonbp's
# conditional on a sharded 2x4 mesh (auto_mesh). Each check compiles a third program per
# configuration (after the plain and the injected ones); the other three add no case to it.
MULTI_STEPS_CONFIGS = ["blockmuon", "auto_mesh"]


@pytest.mark.parametrize("name", MULTI_STEPS_CONFIGS)
def test_multi_steps_accumulates_then_applies_the_mean(name):
    """optax.MultiSteps(tx, 2): the first micro-step gives zeros, the second the plain
    optimizer's first update of the mean gradient, in the parameters' dtypes."""
    setup = _setup(name)
    tx = optax.MultiSteps(setup.plain, every_k_schedule=2)
    with setup.context():
        params = setup.put(_grads(0))
        state = tx.init(params)
        update = jax.jit(tx.update)
        micro = [_grads(1), _grads(2)]
        updates, state = update(setup.put(micro[0]), state, params)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
        updates, state = update(setup.put(micro[1]), state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
        mean = jax.tree.map(lambda a, b: ((a + b) / 2).astype(a.dtype), *micro)
        expected, _ = setup.update(setup.put(mean), setup.init(params), params)
        # The float32 leaves: the mean in bfloat16 depends on the order of rounding.
        chex.assert_trees_all_close(f32(updates), f32(expected), rtol=1e-5, atol=1e-6)


def test_update_traces_once_and_keeps_dtypes(setup):
    """Over two periods (full and block steps) the jitted update keeps the dtypes (float32 and
    bfloat16) of the updates, parameters and state, and it was traced and compiled once for all
    the tests of this configuration (chex.assert_max_traces in `Setup`)."""
    with setup.context():
        params = setup.put(_grads(0))
        state, initial, first = setup.init(params), setup.init(params), params
        for t in range(setup.steps()):
            updates, state = jax.block_until_ready(
                setup.update(setup.put(_grads(1 + t)), state, params)
            )
            chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
            assert all(
                np.isfinite(np.asarray(u, np.float32)).all() for u in jax.tree.leaves(updates)
            )
            assert np.asarray(updates["w"], np.float32).any()
            params = optax.apply_updates(params, updates)
            chex.assert_trees_all_equal_shapes_and_dtypes(params, first)
    assert setup.update._cache_size() == 1


@pytest.mark.parametrize("name", list(MESH_CONFIGS))
def test_state_shardings_after_updates_equal_those_after_init(name):
    """The whole optimizer state (momentum, AdamW moments, counters) keeps the placement that
    init gave it, and that placement is the parameters' (not replicated) for every moment."""
    setup = _setup(name)
    with setup.context():
        params = setup.put(_grads(0))
        state = setup.init(params)
        after_init = [x.sharding for x in jax.tree.leaves(state)]
        # Every array of the state with a shape is a moment of one parameter (MuonBP's
        # momentum of the matrices, AdamW's two moments of the biases); its key path ends with
        # that name.
        moments = [
            (path[-1].key, x) for path, x in jax.tree_util.tree_leaves_with_path(state) if x.ndim
        ]
        assert {n for n, _ in moments} == set(SHAPES) and len(moments) == 7, moments
        for n, m in moments:
            assert m.sharding.is_equivalent_to(params[n].sharding, m.ndim), n
            assert not m.sharding.is_fully_replicated, n
        for t in range(setup.steps()):
            _, state = setup.update(setup.put(_grads(1 + t)), state, params)
            for before, x in zip(after_init, jax.tree.leaves(state)):
                assert x.sharding.is_equivalent_to(before, x.ndim), (t, x.sharding, before)
