"""The MuonBP run of tests/test_multiprocess.py and tests/test_determinism.py.

Imported by a test, `run` gives the updates on the 8 devices of the test process. Started as
`python -m tests._multiprocess_worker --process-id I ...`, it runs the same steps in a fresh
process; with `--num-processes` > 1 it first joins a `jax.distributed` job of several CPU
processes (gloo collectives over localhost) and runs on the global mesh. Process 0 writes the
gathered updates of every full-step strategy to `--out` (.npz).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import muonbp_jax

ROOT = Path(__file__).resolve().parents[1]
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
# "auto" only chooses between the others, per group of matrices.
STRATEGIES = tuple(s for s in muonbp_jax.FULL_STRATEGIES if s != "auto")


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


def run(mesh, strategy: str, ns_dtype: str = "float32") -> list[dict[str, np.ndarray]]:
    """STEPS updates of `muonbp` on the global mesh, gathered to host memory (float32
    Newton–Schulz by default, so that a float64 reference can be close)."""
    tx = muonbp_jax.muonbp(
        1.0,
        beta=BETA,
        period=PERIOD,
        ns_dtype=jnp.dtype(ns_dtype),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    # The test process forces 8 host devices through XLA_FLAGS; each worker sets its own count.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def launch(
    out: Path,
    logs: Path,
    *,
    processes: int,
    local_devices: int,
    timeout_s: float,
    ns_dtype: str = "float32",
    strategies: tuple[str, ...] = STRATEGIES,
) -> None:
    """Runs `main` in `processes` fresh processes (killed on failure or after timeout_s);
    fails the calling test with the workers' logs unless all exit cleanly."""
    try:
        port = _free_port()
    except OSError as e:
        pytest.skip(f"cannot bind a localhost port for the jax.distributed coordinator: {e}")
    procs = []
    with contextlib.ExitStack() as stack:
        for i in range(processes):
            log = stack.enter_context(open(logs / f"worker{i}.log", "w"))
            command = [sys.executable, "-m", "tests._multiprocess_worker", "--process-id", str(i)]
            command += ["--num-processes", str(processes), "--port", str(port)]
            command += ["--local-devices", str(local_devices), "--out", str(out)]
            command += ["--ns-dtype", ns_dtype, "--strategies", ",".join(strategies)]
            procs.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT
                )
            )
            # Registered per process, so that every started one is killed if a later start or
            # the wait below fails.
            stack.callback(_stop, procs[-1])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its own timeout
            time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if codes != [0] * processes:
        tails = "\n".join(
            f"--- worker {i} (exit {c}):\n" + (logs / f"worker{i}.log").read_text()[-3000:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"workers did not finish cleanly within {timeout_s} s:\n{tails}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (several processes)")
    parser.add_argument("--local-devices", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ns-dtype", default="float32")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    args = parser.parse_args()

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.local_devices)
    # gloo is the default on jax 0.10; named so that a changed default cannot drop it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if args.num_processes > 1:
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    assert jax.device_count() == args.num_processes * args.local_devices
    mesh = jax.make_mesh(MESH_SHAPE, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    results = {}
    for strategy in args.strategies.split(","):
        for step, updates in enumerate(run(mesh, strategy, args.ns_dtype)):
            results.update({f"{strategy}/{step}/{k}": v for k, v in updates.items()})
    if args.process_id == 0:
        np.savez(args.out, **results)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
