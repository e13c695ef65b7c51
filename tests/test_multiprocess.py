"""Two processes × 4 CPU devices give the same MuonBP updates as one process × 8 devices.

The workers (tests/_multiprocess_worker.py) join a `jax.distributed` job on localhost with gloo
CPU collectives; the mesh's 'data' axis runs across the processes, so full steps gather across
them. Both runs are also checked against the float64 NumPy reference.
"""

from __future__ import annotations

import jax
import numpy as np

from tests import _multiprocess_worker as worker
from tests import _reference as ref
from tests import _trajectory

TIMEOUT_S = 240  # two jax start-ups and a few compilations on 2 busy cores take ~10-60 s


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "updates.npz"
    worker.launch(out, tmp_path, processes=2, local_devices=4, timeout_s=TIMEOUT_S)
    spread = np.load(out)

    mesh = jax.make_mesh(
        worker.MESH_SHAPE, worker.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    grads = [worker.grads(step) for step in range(worker.STEPS)]
    for strategy in worker.STRATEGIES:
        local = worker.run(mesh, strategy)
        for name, (_, _, parts) in worker.LAYOUTS.items():
            expected, _ = _trajectory.updates(
                [g[name] for g in grads], parts, worker.PERIOD, beta=worker.BETA
            )
            for step in range(worker.STEPS):
                where = f"{strategy}, step {step}, {name}"
                np.testing.assert_allclose(
                    spread[f"{strategy}/{step}/{name}"],
                    local[step][name],
                    rtol=1e-6,
                    atol=1e-6,
                    err_msg=where,
                )
                err = ref.relative_error(spread[f"{strategy}/{step}/{name}"], expected[step])
                assert err < 1e-4, f"{where}: relative error {err:.2e} against float64"
        for step in range(worker.STEPS):
            np.testing.assert_allclose(
                spread[f"{strategy}/{step}/bias"], local[step]["bias"], rtol=1e-6, atol=1e-7
            )
