"""Orbax checkpoints of parameters and optimizer state, saved in the middle of a period.

* Same mesh: restore and continue gives bit-identical updates and parameters, block and full
  steps alike, and the jitted step does not recompile for the restored state.
* Another mesh (2×4 → 4×2, → 8×1): the restore reshards; the momentum is mesh-independent and
  comes back bit-identical, and the next block steps orthogonalize the NEW mesh's local tiles
  (checked against the float64 reference for the new tiles, and shown to differ from the old).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _fixtures as fx
from tests import _reference as ref
from tests import _trajectory

PERIOD, LR, SAVED_AT, STEPS = 3, 0.05, 4, 7  # updates 0, 3, 6 are full; saved before update 4
SPECS = {
    "tiles": P("data", "model"),
    "cols": P(None, "model"),
    "rows": P("model", None),
    "bias": P("model"),  # 1-D: AdamW
}
SHAPES = {"tiles": (16, 32), "cols": (16, 32), "rows": (32, 16), "bias": (32,)}
MUON = ("tiles", "cols", "rows")


def _parts(mesh_shape: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The grid of device blocks of each Muon leaf on a ('data', 'model') mesh."""
    data, model = mesh_shape
    return {"tiles": (data, model), "cols": (1, model), "rows": (model, 1)}


def _mesh(shape, mode=AxisType.Explicit):
    return fx.make_mesh(mode, shape)


def _grads(step: int) -> dict[str, np.ndarray]:
    return fx.normal_tree(1000 + step, SHAPES)


def _put(tree, mesh):
    return fx.put(tree, mesh, SPECS)


def _train(update, params, state, mesh, steps):
    """Applies `update` for the given update indices; returns the updates (host) and the end."""
    out = []
    for step in steps:
        updates, state = update(_put(_grads(step), mesh), state, params)
        params = optax.apply_updates(params, updates)
        out.append({k: np.asarray(v) for k, v in jax.block_until_ready(updates).items()})
    return out, params, state


def _save(path, params, state) -> None:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), {"params": params, "opt_state": state})
    checkpointer.wait_until_finished()


def _restore(path, params, state):
    """Restores onto the shapes, dtypes and shardings of the given (fresh) trees; NamedTuple
    states come back as NamedTuples only with such a target."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
    restored = ocp.StandardCheckpointer().restore(path.absolute(), target)
    return restored["params"], restored["opt_state"]


def test_resume_mid_period_is_bit_identical(tmp_path):
    mesh = _mesh((2, 4), AxisType.Auto)
    tx = muonbp_jax.muonbp(LR, period=PERIOD, weight_decay=0.1, specs=SPECS, mesh=mesh)
    update = jax.jit(tx.update)
    fresh_params = _put(_grads(-1), mesh)
    fresh_state = tx.init(fresh_params)
    _, params, state = _train(update, fresh_params, fresh_state, mesh, range(SAVED_AT))
    _save(tmp_path / "ckpt", params, state)
    straight, straight_params, _ = _train(update, params, state, mesh, range(SAVED_AT, STEPS))

    params, state = _restore(tmp_path / "ckpt", fresh_params, fresh_state)
    assert int(fx.muon_state(state).count) == SAVED_AT
    resumed, resumed_params, _ = _train(update, params, state, mesh, range(SAVED_AT, STEPS))
    for step, (a, b) in zip(range(SAVED_AT, STEPS), zip(straight, resumed)):
        for name in SHAPES:
            np.testing.assert_array_equal(b[name], a[name], err_msg=f"update {step}, {name}")
    for name in SHAPES:
        np.testing.assert_array_equal(resumed_params[name], straight_params[name], err_msg=name)
    assert update._cache_size() == 1, "the restored state recompiled the step"


@pytest.fixture(scope="module")
def saved_on_2x4(tmp_path_factory):
    """Four updates on an Explicit 2×4 mesh, saved; then the uninterrupted updates 4..6."""
    path = tmp_path_factory.mktemp("reshard") / "ckpt"
    mesh = _mesh((2, 4))
    tx = muonbp_jax.muonbp(LR, period=PERIOD, ns_dtype=np.float32)
    with jax.set_mesh(mesh):
        update = jax.jit(tx.update)
        params = _put(_grads(-1), mesh)
        _, params, state = _train(update, params, jax.jit(tx.init)(params), mesh, range(SAVED_AT))
        _save(path, params, state)
        momentum = {k: np.asarray(v) for k, v in fx.muon_state(state).mu.items()}
        straight, _, _ = _train(update, params, state, mesh, range(SAVED_AT, STEPS))
    return tx, path, momentum, straight


@pytest.mark.parametrize("shape", [(4, 2), (8, 1)], ids=["4x2", "8x1"])
def test_restore_onto_another_mesh_reshards_and_blocks_follow_it(saved_on_2x4, shape):
    tx, path, momentum, straight = saved_on_2x4
    mesh = _mesh(shape)
    with jax.set_mesh(mesh):
        fresh = _put(_grads(-1), mesh)
        params, state = _restore(path, fresh, jax.jit(tx.init)(fresh))
        mu = fx.muon_state(state).mu
        for name in MUON:
            assert mu[name].sharding.mesh.shape == mesh.shape, f"{name} not on the new mesh"
            assert mu[name].sharding.is_equivalent_to(params[name].sharding, 2), name
            np.testing.assert_array_equal(mu[name], momentum[name], err_msg=name)
        resumed, _, _ = _train(jax.jit(tx.update), params, state, mesh, range(SAVED_AT, STEPS))

    grads = [_grads(step) for step in range(SAVED_AT, STEPS)]  # block, block, full
    for name in MUON:
        expect = {}
        for mesh_shape in ((2, 4), shape):
            expect[mesh_shape], _ = _trajectory.updates(
                [g[name] for g in grads],
                _parts(mesh_shape)[name],
                PERIOD,
                learning_rate=LR,
                mu=momentum[name],
                start=SAVED_AT,
            )
        for k, step in enumerate(range(SAVED_AT, STEPS)):
            where = f"update {step} on {shape}, {name}"
            err = ref.relative_error(resumed[k][name], expect[shape][k])
            assert err < 1e-4, f"{where}: relative error {err:.2e} for the new mesh's tiles"
            if step % PERIOD:  # block step: the old tiles give another update
                old = ref.relative_error(resumed[k][name], expect[(2, 4)][k])
                assert old > 0.1, f"{where}: equals the old mesh's block update ({old:.2e})"
            else:  # full step: mesh-independent, equal to the uninterrupted run's
                np.testing.assert_allclose(resumed[k][name], straight[k][name], atol=1e-5)
    # AdamW is elementwise: the same bits on any mesh.
    for k in range(STEPS - SAVED_AT):
        np.testing.assert_array_equal(resumed[k]["bias"], straight[k]["bias"])
