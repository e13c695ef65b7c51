"""MuonBP on a tensor-parallel flax nnx model, in one file to copy.

On a machine without GPUs, ask jax for 8 fake CPU devices before it starts (PJRT_NPROC keeps
jaxlib 0.10's CPU collectives from deadlocking with many fake devices on few cores):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 PJRT_NPROC=16 \
        python examples/minimal_tp.py

The mesh is ('data', 'model') = (devices / m, m) with m = gcd(devices, 4): 2x4 on 8 devices.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax


class MLP(nnx.Module):
    """Megatron layout: `up` split on its output columns, `down` on its input rows."""

    def __init__(self, d: int, hidden: int, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            d,
            hidden,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            hidden, d, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
        )

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def main(steps: int = 10) -> tuple[list[float], MLP]:
    n = jax.device_count()
    m = math.gcd(n, 4)
    mesh = jax.make_mesh((n // m, m), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((32, 32))).astype(np.float32)
    with jax.set_mesh(mesh):
        model = MLP(32, 128, nnx.Rngs(0))  # parameters are created sharded on the mesh
        # Auto-axis mesh: tell MuonBP each parameter's PartitionSpec (read from the model).
        specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
        tx = muonbp_jax.muonbp(0.02, period=5, specs=specs)  # a full step every 5th update
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        batch = NamedSharding(mesh, P("data"))
        x, y = jax.device_put(x, batch), jax.device_put(y, batch)
        losses = []
        for step in range(steps):
            losses.append(float(train_step(model, optimizer, x, y)))
            print(f"step {step}: loss {losses[-1]:.4f}")
    return losses, model


if __name__ == "__main__":
    main()
