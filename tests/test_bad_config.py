"""Bad configurations fail at construction or at `init` with a message that names what is wrong
(the leaf path, the axis, the size) and what to do, never a hang or a silent wrong answer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _fixtures as fx


@pytest.mark.parametrize("period", [0, -1, 2.5, 2.0, "5", True, [5], (3,)])
@pytest.mark.parametrize(
    "build",
    [
        lambda period: muonbp_jax.muonbp(1e-3, period=period),
        lambda period: muonbp_jax.scale_by_muonbp(period=period),
        lambda period: muonbp_jax.scale_by_step_learning_rate(1e-3, period=period),
    ],
    ids=["muonbp", "scale_by_muonbp", "scale_by_step_learning_rate"],
)
def test_period_must_be_a_positive_int_or_none(build, period):
    with pytest.raises(ValueError, match=r"period must be .*>= 1.*None"):
        build(period)


@pytest.mark.parametrize("period", [1, 5, None, np.int64(3)])
def test_valid_periods_construct(period):
    muonbp_jax.muonbp(1e-3, period=period)


@pytest.mark.parametrize(
    "build", [lambda **kw: muonbp_jax.muonbp(1e-3, **kw), muonbp_jax.scale_by_muonbp]
)
def test_unknown_preconditioning_fails_at_construction(build):
    with pytest.raises(ValueError, match=r"preconditioning must be one of \('frobenius', "):
        build(preconditioning="newton")


def _params(mesh, specs: dict, shape=(16, 32)) -> dict:
    return {"layer": fx.put({k: np.ones(shape, np.float32) for k in specs}, mesh, specs)}


LAYOUT = {"w": P(None, "model"), "x": P("data", None)}


def _nested(specs: dict) -> dict:
    return {"layer": specs}


# id: (muonbp keywords given the mesh, parameter specs, parameter shape, error, message)
CASES = {
    "spec tree lacks a leaf": (
        lambda m: {"specs": _nested({"w": P(None, "model")}), "mesh": m},
        LAYOUT,
        ValueError,
        r"specs has no entry for parameter 'layer/x'.*must follow the parameter tree",
    ),
    "spec tree has a typo": (
        lambda m: {"specs": _nested({"w": P(None, "model"), "xx": P("data", None)}), "mesh": m},
        LAYOUT,
        ValueError,
        r"specs has an entry 'layer/xx' that matches no parameter; parameters without an "
        + r"entry: 'layer/x'",
    ),
    "spec is not a PartitionSpec": (
        lambda m: {"specs": _nested({"w": "model", "x": P()}), "mesh": m},
        LAYOUT,
        TypeError,
        r"specs: entry 'layer/w' is 'model'",
    ),
    "axis the mesh lacks": (
        lambda m: {"specs": _nested({"w": P(None, "tensor"), "x": P()}), "mesh": m},
        LAYOUT,
        ValueError,
        r"'layer/w' names mesh axis 'tensor', but the mesh has axes \('data', 'model'\)",
    ),
    "spec longer than the rank": (
        lambda m: {"specs": _nested({"w": P(None, "model", None), "x": P()}), "mesh": m},
        LAYOUT,
        ValueError,
        r"P\(None, 'model', None\) for 'layer/w' has more entries than the parameter's rank 2",
    ),
    "dimension not divisible": (
        lambda m: {"specs": _nested({"w": P(None, "model"), "x": P()}), "mesh": m},
        {"w": P(), "x": P()},
        ValueError,
        (
            r"Dimension 1 of 'layer/w' \(size 30\) is not divisible by mesh axes model of "
            r"total size 4; pad the parameter or shard it differently"
        ),
    ),
    "spec disagrees with the array": (
        lambda m: {"specs": _nested({"w": P("model", None), "x": P("data", None)}), "mesh": m},
        LAYOUT,
        ValueError,
        (
            r"specs gives 'layer/w' the sharding P\('model', None\), but the array is sharded "
            r"as P\(None, 'model'\).*partition_specs"
        ),
    ),
    "auto mode without specs": (
        lambda m: {},
        LAYOUT,
        ValueError,
        r"'layer/w' is sharded as P\(None, 'model'\).*Auto axes.*specs=.*get_partition_spec",
    ),
    "specs without a mesh": (
        lambda m: {"specs": _nested(LAYOUT)},
        LAYOUT,
        ValueError,
        r"specs gives 'layer/w' the sharding .* no mesh is known: pass mesh=",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_errors_name_the_leaf_and_the_fix(mesh, case):
    keywords, specs, error, message = CASES[case]
    shape = (16, 30) if case == "dimension not divisible" else (16, 32)
    tx = muonbp_jax.muonbp(1e-3, **keywords(mesh))
    with pytest.raises(error, match=message):
        tx.init(_params(mesh, specs, shape))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("build", [muonbp_jax.muonbp, muonbp_jax.scale_by_muonbp])
def test_non_float_matrices_routed_to_muon_are_refused(dtype, build):
    # Complex matrices are trained (tests/test_complex.py).
    tx = build(1e-3) if build is muonbp_jax.muonbp else build()
    with pytest.raises(TypeError, match=rf"'w' has dtype {jnp.dtype(dtype)}.*floating-point"):
        tx.init({"w": jnp.ones((8, 16), dtype)})


def test_non_float_leaves_kept_away_from_muon_are_fine():
    """The fix the message proposes works: the integer leaf takes no Muon update."""
    params = {"w": jnp.ones((8, 16)), "table": jnp.ones((8, 16), jnp.int32)}
    tx = muonbp_jax.scale_by_muonbp()
    masked = optax.masked(tx, {"w": True, "table": False})
    updates, _ = masked.update(params, masked.init(params))
    assert np.isfinite(np.asarray(updates["w"])).all()
    np.testing.assert_array_equal(updates["table"], params["table"])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_float_dtypes_train(dtype):
    params = {"w": jnp.ones((8, 16), dtype)}
    grads = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), dtype)}
    tx = muonbp_jax.muonbp(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert updates["w"].dtype == dtype
    assert np.isfinite(np.asarray(updates["w"], np.float32)).all()
    assert np.asarray(updates["w"], np.float32).any()


def test_vector_routed_to_muon_is_refused():
    tx = muonbp_jax.muonbp(
        1e-3, muon_weight_dimension_numbers={"b": muonbp_jax.MuonDimensionNumbers()}
    )
    with pytest.raises(ValueError, match=r"'b' has shape \(16,\): Muon needs matrices"):
        tx.init({"b": jnp.ones((16,))})
