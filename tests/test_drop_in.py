"""Drop-in parity and bad input (issue 12): what users of optax and flax hand the optimizer is
either accepted as they mean it or refused with a message naming the leaf and the fix."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _fixtures as fx

LAYOUT = {"w": P(None, "model"), "x": P("data", None)}


def _mesh(axis_type):
    return fx.make_mesh(axis_type)


def _params(mesh, specs=LAYOUT, shape=(16, 32)):
    rng = np.random.default_rng(0)
    put = lambda s: jax.device_put(
        jnp.asarray(rng.standard_normal(shape), jnp.float32), NamedSharding(mesh, s)
    )
    return {"layer": {k: put(s) for k, s in specs.items()}}


# ----------------------------------------------------------------------------- NamedSharding specs


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_tree_of_named_shardings_is_accepted_as_specs(jit):
    mesh = _mesh(AxisType.Auto)
    params = _params(mesh)
    grads = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
    shardings = jax.tree.map(lambda x: x.sharding, params)
    reference = muonbp_jax.muonbp(1e-2, specs=muonbp_jax.partition_specs(params), mesh=mesh)
    tx = muonbp_jax.muonbp(1e-2, specs=shardings)  # no mesh=: taken from the shardings
    wrap = jax.jit if jit else (lambda f: f)
    state, ref_state = wrap(tx.init)(params), reference.init(params)
    ref_update = jax.jit(reference.update)  # the reference need not run eagerly too
    for _ in range(2):  # a full step, then a block step
        updates, state = wrap(tx.update)(grads, state, params)
        expected, ref_state = ref_update(grads, ref_state, params)
        chex.assert_trees_all_close(updates, expected, rtol=1e-5, atol=1e-7)
    assert state.inner_states["muon"].inner_state[0].mu["layer"]["w"].sharding.spec == P(
        None, "model"
    )


def test_named_shardings_also_work_for_scale_by_muonbp():
    mesh = _mesh(AxisType.Auto)
    params = _params(mesh)
    tx = muonbp_jax.scale_by_muonbp(specs=jax.tree.map(lambda x: x.sharding, params))
    updates, _ = jax.jit(tx.update)(params, jax.jit(tx.init)(params))
    assert np.isfinite(np.asarray(updates["layer"]["w"])).all()


@pytest.mark.parametrize(
    "build",
    [lambda **kw: muonbp_jax.muonbp(1e-3, **kw), muonbp_jax.scale_by_muonbp],
    ids=["muonbp", "scale"],
)
@pytest.mark.parametrize("bad", ["model", ("model", None), 3])
def test_a_wrong_spec_type_names_what_is_expected(build, bad):
    mesh = _mesh(AxisType.Auto)
    tx = build(specs={"layer": {"w": bad, "x": P()}}, mesh=mesh)
    with pytest.raises(
        TypeError, match=r"'layer/w.*PartitionSpec or a NamedSharding.*get_partition_spec"
    ):
        tx.init(_params(mesh))


# ----------------------------------------------------------------------------- misspelled keys

DIMS = muonbp_jax.MuonDimensionNumbers()


@pytest.mark.parametrize(
    "keywords, name",
    [
        ({"block_grid": {"layer": {"ww": (1, 2)}}}, "block_grid"),
        (
            {"muon_weight_dimension_numbers": {"layer": {"w": DIMS, "xx": DIMS}}},
            "muon_weight_dimension_numbers",
        ),
    ],
    ids=["block_grid", "dimension_numbers"],
)
def test_muonbp_refuses_option_keys_that_match_no_parameter(keywords, name):
    tx = muonbp_jax.muonbp(1e-3, **keywords)
    params = {"layer": {"w": jnp.ones((8, 16)), "x": jnp.ones((8, 16))}}
    with pytest.raises(ValueError, match=rf"{name} has an entry 'layer/(ww|xx)' that matches no "):
        tx.init(params)


@pytest.mark.parametrize(
    "keywords, name",
    [
        ({"block_grid": {"layer": {"ww": (1, 2)}}}, "block_grid"),
        (
            {"weight_dimension_numbers": {"layer": {"w": DIMS, "xx": DIMS}}},
            "weight_dimension_numbers",
        ),
    ],
    ids=["block_grid", "dimension_numbers"],
)
def test_scale_by_muonbp_refuses_option_keys_that_match_no_parameter(keywords, name):
    tx = muonbp_jax.scale_by_muonbp(**keywords)
    params = {"layer": {"w": jnp.ones((8, 16)), "x": jnp.ones((8, 16))}}
    with pytest.raises(ValueError, match=rf"{name} has an entry 'layer/(ww|xx)' that matches no "):
        jax.jit(tx.init)(params)


def test_correctly_spelled_prefix_options_still_work():
    params = {"layer": {"w": jnp.ones((8, 16)), "x": jnp.ones((8, 16))}}
    tx = muonbp_jax.muonbp(
        1e-3,
        block_grid={"layer": (1, 2)},
        muon_weight_dimension_numbers={"layer": {"w": DIMS, "x": None}},
    )
    updates, _ = tx.update(params, tx.init(params), params)
    assert np.isfinite(np.asarray(updates["layer"]["w"])).all()


# ----------------------------------------------------------------------------- types


def test_muonbp_returns_extra_args_transformation_like_optax():
    assert isinstance(optax.contrib.muon(1e-3), optax.GradientTransformationExtraArgs)
    tx = muonbp_jax.muonbp(1e-3)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = {"w": jnp.ones((8, 16)), "b": jnp.ones((16,))}
    # Extra keyword arguments (as optax.chain passes them, e.g. value=) are accepted.
    updates, _ = tx.update(params, tx.init(params), params, value=jnp.float32(1.0))
    assert set(updates) == {"w", "b"}


def test_public_signatures_resolve_and_show_schedules():
    for fn in (muonbp_jax.muonbp, muonbp_jax.scale_by_step_learning_rate):
        signature = inspect.signature(fn, eval_str=True)
        assert signature.parameters["learning_rate"].annotation == optax.ScalarOrSchedule
        block = signature.parameters["block_learning_rate"].annotation
        assert block == optax.ScalarOrSchedule | None
    inspect.signature(muonbp_jax.scale_by_muonbp, eval_str=True)


# ----------------------------------------------------------------------------- Auto mode, jit


@pytest.mark.parametrize("what", ["init", "update"])
def test_auto_mode_under_jit_without_specs_or_mesh_context_is_refused(what):
    mesh = _mesh(AxisType.Auto)
    params = _params(mesh)
    tx = muonbp_jax.muonbp(1e-3)
    message = r"'layer/w' is traced .*Auto axes.*specs="
    if what == "init":
        with pytest.raises(ValueError, match=message):
            jax.jit(tx.init)(params)
    else:
        state = muonbp_jax.muonbp(1e-3, specs=muonbp_jax.partition_specs(params), mesh=mesh).init(
            params
        )
        with pytest.raises(ValueError, match=message):
            jax.jit(tx.update)(params, state, params)


def test_auto_mode_single_device_params_under_jit_still_work():
    params = {"w": jnp.ones((8, 16))}
    tx = muonbp_jax.muonbp(1e-3)
    updates, _ = jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)
    assert np.isfinite(np.asarray(updates["w"])).all()


# ----------------------------------------------------------------------------- wrong specs


WRONG = {"layer": {"w": P("model", None), "x": P("data", None)}}


def test_explicit_mode_wrong_spec_is_refused_under_jit():
    mesh = _mesh(AxisType.Explicit)
    with jax.set_mesh(mesh):
        params = _params(mesh)
        tx = muonbp_jax.muonbp(1e-3, specs=WRONG)
        with pytest.raises(ValueError, match=r"specs gives 'layer/w' the sharding P\('model'"):
            jax.jit(tx.init)(params)


def test_wrong_spec_is_refused_by_eager_update():
    mesh = _mesh(AxisType.Auto)
    params = _params(mesh)
    good = muonbp_jax.muonbp(1e-3, specs=muonbp_jax.partition_specs(params), mesh=mesh)
    tx = muonbp_jax.muonbp(1e-3, specs=WRONG, mesh=mesh)
    with pytest.raises(ValueError, match=r"specs gives 'layer/w' the sharding P\('model'"):
        tx.update(params, good.init(params), params)


def test_state_dtypes_survive_injected_hyperparameters():
    """inject_hyperparams hands beta in as a float32 array: bfloat16 momenta must stay bfloat16
    (a dtype change would also recompile the next update)."""
    params = {"w16": jnp.ones((8, 16), jnp.bfloat16), "w32": jnp.ones((8, 16), jnp.float32)}
    tx = optax.inject_hyperparams(muonbp_jax.muonbp, static_args=("ns_steps",))(
        learning_rate=0.1, beta=0.9
    )
    state = tx.init(params)
    _, new_state = jax.jit(tx.update)(params, state, params)
    before = [x.dtype for x in jax.tree.leaves(state)]
    after = [x.dtype for x in jax.tree.leaves(new_state)]
    assert after == before
    assert jnp.bfloat16 in before
