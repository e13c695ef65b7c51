"""The MuonBP run of tests/test_multiprocess.py, for one process or for one of several.

Imported by the test, `run` gives the updates on the 8 devices of the test process. Started as
`python -m tests._multiprocess_worker --process-id I ...`, it joins a `jax.distributed` job of
several CPU processes (gloo collectives over localhost), runs the same steps on the global mesh
and process 0 writes the gathered updates to `--out` (.npz).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax

MESH_SHAPE, AXES = (2, 4), ("data", "model")
PERIOD, STEPS, BETA = 2, 4, 0.9  # updates 0, 2 are full steps, 1, 3 block steps
# name: (shape, spec, (row parts, col parts) of one device's block on the 2x4 mesh). On two
# processes of 4 devices, 'data' runs across the processes and 'model' within each.
LAYOUTS = {
    "tiles": ((16, 32), P("data", "model"), (2, 4)),
    "rows8": ((32, 16), P(("data", "model"), None), (8, 1)),
    "cols_data": ((16, 32), P(None, "data"), (1, 2)),
    "rows": ((32, 16), P("model", None), (4, 1)),
    "replicated": ((16, 32), P(), (1, 1)),
}
ADAM = {"bias": ((32,), P("model"))}  # a 1-D leaf: goes to AdamW
SPECS = {name: spec for name, (_, spec, *_) in {**LAYOUTS, **ADAM}.items()}


def grads(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    shapes = {name: shape for name, (shape, *_) in {**LAYOUTS, **ADAM}.items()}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _global(tree: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Global arrays; each process supplies only the shards of its own devices."""
    return {
        k: jax.make_array_from_callback(v.shape, NamedSharding(mesh, SPECS[k]), v.__getitem__)
        for k, v in tree.items()
    }


def _to_host(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in tree.items()}
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def run(mesh, strategy: str) -> list[dict[str, np.ndarray]]:
    """STEPS updates of `muonbp` (float32 Newton–Schulz, so that a float64 reference can be
    close) on the global mesh, gathered to host memory."""
    tx = muonbp_jax.muonbp(
        1.0,
        beta=BETA,
        period=PERIOD,
        ns_dtype=np.float32,
        specs=SPECS,
        mesh=mesh,
        full_strategy=strategy,
    )
    params = _global(grads(-1), mesh)
    state = jax.jit(tx.init)(params)
    update = jax.jit(tx.update)
    out = []
    for step in range(STEPS):
        updates, state = update(_global(grads(step), mesh), state, params)
        out.append(_to_host(jax.block_until_ready(updates)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--local-devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    # gloo is the default on jax 0.10; named so that a changed default cannot drop it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    assert jax.device_count() == args.num_processes * args.local_devices
    mesh = jax.make_mesh(MESH_SHAPE, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    results = {}
    for strategy in muonbp_jax.FULL_STRATEGIES:
        for step, updates in enumerate(run(mesh, strategy)):
            results.update({f"{strategy}/{step}/{k}": v for k, v in updates.items()})
    if args.process_id == 0:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
