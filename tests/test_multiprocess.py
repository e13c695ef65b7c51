"""Two processes × 4 CPU devices give the same MuonBP updates as one process × 8 devices.

The workers (tests/_multiprocess_worker.py) join a `jax.distributed` job on localhost with gloo
CPU collectives; the mesh's 'data' axis runs across the processes, so full steps gather across
them. Both runs are also checked against the float64 NumPy reference.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import muonbp_jax
from tests import _multiprocess_worker as worker
from tests import _reference as ref
from tests import _trajectory

PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 240  # two jax start-ups and a few compilations on 2 busy cores take ~10-60 s
ROOT = Path(__file__).resolve().parents[1]


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


def _run_workers(out: Path, logs: Path) -> None:
    try:
        port = _free_port()
    except OSError as e:
        pytest.skip(f"cannot bind a localhost port for the jax.distributed coordinator: {e}")
    procs = []
    with contextlib.ExitStack() as stack:
        for i in range(PROCESSES):
            log = stack.enter_context(open(logs / f"worker{i}.log", "w"))
            command = [sys.executable, "-m", "tests._multiprocess_worker", "--process-id", str(i)]
            command += ["--num-processes", str(PROCESSES), "--port", str(port)]
            command += ["--local-devices", str(LOCAL_DEVICES), "--out", str(out)]
            procs.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT
                )
            )
            # Registered per process, so that every started one is killed if a later start or
            # the wait below fails.
            stack.callback(_stop, procs[-1])
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # one failed: the other would wait for it until its own timeout
            time.sleep(0.2)
    codes = [p.returncode for p in procs]
    if codes != [0] * PROCESSES:
        tails = "\n".join(
            f"--- worker {i} (exit {c}):\n" + (logs / f"worker{i}.log").read_text()[-3000:]
            for i, c in enumerate(codes)
        )
        pytest.fail(f"workers did not finish cleanly within {TIMEOUT_S} s:\n{tails}")


def test_two_processes_equal_one_process(tmp_path):
    out = tmp_path / "updates.npz"
    _run_workers(out, tmp_path)
    spread = np.load(out)

    mesh = jax.make_mesh(
        worker.MESH_SHAPE, worker.AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2
    )
    grads = [worker.grads(step) for step in range(worker.STEPS)]
    for strategy in muonbp_jax.FULL_STRATEGIES:
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
