"""Determinism: the same inputs give the same bits in another process, and a jitted training
step compiles once over two periods (block and full steps alike)."""

from __future__ import annotations

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
from tests import _multiprocess_worker as worker


def test_same_inputs_give_the_same_bits_in_a_fresh_process(tmp_path):
    """The sharded run of test_multiprocess (two periods, default bfloat16 Newton–Schulz) in
    this process and in a new one, compiled separately."""
    out, strategies = tmp_path / "updates.npz", ("gather",)
    worker.launch(
        out,
        tmp_path,
        processes=1,
        local_devices=8,
        timeout_s=240,
        ns_dtype="bfloat16",
        strategies=strategies,
    )
    fresh = np.load(out)
    mesh = jax.make_mesh(worker.MESH_SHAPE, worker.AXES, axis_types=(AxisType.Auto,) * 2)
    for strategy in strategies:
        here = worker.run(mesh, strategy, "bfloat16")
        for step, updates in enumerate(here):
            for name, u in updates.items():
                key = f"{strategy}/{step}/{name}"
                np.testing.assert_array_equal(fresh[key], u, err_msg=key)


# Specs whose last entry is sharded: jit returns shardings as P('x') in Auto mode and as
# P('x', None) in Explicit mode, so parameters spelled the other way would recompile the step
# for a reason that has nothing to do with the optimizer.
SPECS = {
    "cols": P(None, "model"),
    "tiles": P("data", "model"),
    "stacked": P(None, None, "model"),
    "bias": P("model"),
}
SHAPES = {"cols": (16, 32), "tiles": (16, 32), "stacked": (2, 16, 32), "bias": (32,)}


@pytest.mark.parametrize("init", ["eager", "jit"])
@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_training_step_compiles_once_over_two_periods(mode, init):
    mesh = fx.make_mesh(mode)
    kw = {"specs": SPECS, "mesh": mesh} if mode == AxisType.Auto else {}
    dims = {"stacked": muonbp_jax.MuonDimensionNumbers(1, 2)}
    tx = muonbp_jax.muonbp(
        0.02, period=3, weight_decay=0.1, muon_weight_dimension_numbers=dims, **kw
    )
    chex.clear_trace_counter()  # counted per function code, shared by the parametrizations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x):
        loss = lambda p: sum(jnp.sum(jnp.tanh(v * x) ** 2) for v in p.values())
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(0)
    with jax.set_mesh(mesh):
        params = fx.put(
            {k: rng.standard_normal(s) for k, s in SHAPES.items()}, mesh, SPECS, np.float32
        )
        state = tx.init(params) if init == "eager" else jax.jit(tx.init)(params)
        for t in range(6):  # full, block, block, full, block, block
            params, state = jax.block_until_ready(step(params, state, jnp.float32(1 + t)))
    assert all(np.isfinite(np.asarray(v)).all() for v in params.values())
    assert step._cache_size() == 1, f"compiled {step._cache_size()} times"
    for k, x in params.items():
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, SPECS[k]), x.ndim), k
