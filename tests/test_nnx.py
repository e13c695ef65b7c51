"""MuonBP under nnx.Optimizer: a small tensor-parallel MLP on a 2x4 mesh trains in Auto mode
(specs from nnx.get_partition_spec) and in Explicit mode (specs from the types)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax
from tests import _fixtures as fx

STEPS = 10


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            16,
            32,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            32, 16, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
        )

    def __call__(self, x):
        # Explicit mode asks where a product over a sharded contracting axis goes: replicated.
        return self.down(jax.nn.gelu(self.up(x)), out_sharding=P())


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@pytest.mark.parametrize("mode", [AxisType.Auto, AxisType.Explicit], ids=["auto", "explicit"])
def test_nnx_optimizer_trains_a_sharded_model(mode):
    mesh = fx.make_mesh(mode)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((16, 16))).astype(np.float32)
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
        assert model.up.kernel[...].sharding.is_equivalent_to(
            NamedSharding(mesh, P(None, "model")), 2
        ), "the model is not sharded: the test would not exercise block steps"
        if mode == AxisType.Auto:
            specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
            tx = muonbp_jax.muonbp(0.05, period=3, specs=specs)
        else:
            tx = muonbp_jax.muonbp(0.05, period=3)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        batch = fx.put({"x": x, "y": y}, mesh, {"x": P(), "y": P()})
        x, y = batch["x"], batch["y"]
        losses = [
            float(jax.block_until_ready(train_step(model, optimizer, x, y))) for _ in range(STEPS)
        ]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.down.kernel[...].sharding.is_equivalent_to(
        NamedSharding(mesh, P("model", None)), 2
    )
