"""Repeated runs against the XLA:CPU collective deadlock of 8 fake devices on few cores.

jaxlib 0.10 launches every fake device's program from one pool of max(cores, devices) threads;
when Python dispatches far ahead, the pool can fill with launch tasks while devices that did
start wait forever inside a collective, and after 40 s the process aborts (exit 134). Each run
starts fresh processes, WITHOUT `PJRT_NPROC` in their environment, so that what is tested is
the configuration the project applies itself:

* `tests`   — pytest on the sharded test files (tests/conftest.py sets PJRT_NPROC=16 in
              os.environ before jax is imported);
* `loop`    — LOOP_STEPS sharded MuonBP updates dispatched without waiting (the pattern that
              deadlocked every time), with PJRT_NPROC=16 set in os.environ the way conftest
              does;
* `example` — examples/train_lm.py with its defaults (its CPU setup sets PJRT_NPROC and
              waits for every step);
* `control` — the `loop` without PJRT_NPROC, to show that the workload does hang without it.

    python tools/soak.py                         # 10 runs of tests, loop and example
    python tools/soak.py --runs 3 --only loop,control
    python tools/soak.py --example-args "--steps 100 --compare muonbp"
    python tools/soak.py --pools   # thread pools: PJRT_NPROC unset / os.environ / env

It runs the code of the checkout it lies in; to soak one commit while the working tree
changes, run it from a clone (its package then comes first on PYTHONPATH).

Prints one line per process and a table of outcomes; writes them to --out (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

# Imports no jax: each child process sets its devices up before it imports jax.
from lm import devices

LOOP_STEPS = 400
SHARDED_TESTS = (
    "tests/test_layouts.py",
    "tests/test_strategies.py",
    "tests/test_checkpoint.py",
    "tests/test_degenerate.py",
)
KINDS = ("tests", "loop", "example", "control")


def _loop_child(steps: int, nproc: str) -> None:
    """Many small sharded MuonBP updates, dispatched without waiting for any of them."""
    # As tests/conftest.py does, before jax is imported; "none" leaves PJRT_NPROC unset.
    devices.use_cpu_devices(8, force=True, pjrt_nproc=False if nproc == "none" else int(nproc))
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import muonbp_jax

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"q": P(None, "model"), "o": P("model", None), "w": P("data", "model")}
    rng = np.random.default_rng(0)
    put = lambda a, s: jax.device_put(a.astype(np.float32), NamedSharding(mesh, s))
    params = {k: put(rng.standard_normal((32, 64)), s) for k, s in specs.items()}
    tx = muonbp_jax.muonbp(1e-3, period=5, specs=specs, mesh=mesh)
    update = jax.jit(tx.update)
    state = tx.init(params)
    began = time.perf_counter()
    for _ in range(steps):
        updates, state = update(params, state, params)
    jax.block_until_ready((updates, state))
    print(f"{steps} steps in {time.perf_counter() - began:.1f} s", flush=True)


def _pool_child(where: str) -> None:
    """Thread counts by name of a process that ran one sharded computation (Linux /proc)."""
    # "os.environ": set here before jax is imported, as tests/conftest.py does; "environment":
    # inherited from the parent; "unset": neither.
    devices.use_cpu_devices(8, force=True, pjrt_nproc=16 if where == "os.environ" else False)
    import collections

    import jax
    import jax.numpy as jnp

    mesh = jax.make_mesh((8,), ("d",))
    x = jax.device_put(
        jnp.ones((8, 8)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    )
    jax.block_until_ready(jax.jit(jnp.sum)(x))
    tasks = Path("/proc/self/task")
    names = collections.Counter((t / "comm").read_text().strip() for t in tasks.iterdir())
    print(json.dumps({"threads": sum(names.values()), **dict(sorted(names.items()))}))


def _pools() -> None:
    """Whether PJRT_NPROC set in os.environ before jax is imported sizes the CPU client's
    thread pools like PJRT_NPROC in the process environment."""
    for where in ("unset", "os.environ", "environment"):
        env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
        if where == "environment":
            env["PJRT_NPROC"] = "16"
        command = [sys.executable, __file__, "--pool-child", where]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        label = "PJRT_NPROC unset" if where == "unset" else f"PJRT_NPROC=16 in {where}"
        print(f"{label:30s} {done.stdout.strip()}")


def _command(kind: str, args: argparse.Namespace, scratch: Path) -> list[str]:
    python = sys.executable
    if kind == "tests":
        return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.tests]
    if kind in ("loop", "control"):
        nproc = "16" if kind == "loop" else "none"
        return [python, __file__, "--loop-child", str(args.loop_steps), "--nproc", nproc]
    extra = shlex.split(args.example_args)
    return [python, "examples/train_lm.py", "--no-progress", "--out", str(scratch), *extra]


def _run(kind: str, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        command = _command(kind, args, Path(scratch))
        began = time.perf_counter()
        try:
            done = subprocess.run(
                command,
                check=False,
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            code, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:  # subprocess.run kills the child
            code, output = "timeout", str(e.stdout or "")
    seconds = time.perf_counter() - began
    lines = output.strip().splitlines() or [""]
    # SIGABRT: -6 from subprocess, 134 from a shell; the rendezvous says why it gave up.
    said = [line for line in lines if "consistent program state" in line]
    return {
        "kind": kind,
        "exit": code,
        "aborted": code in (134, -6) or bool(said),
        "seconds": round(seconds, 1),
        "last_line": (said or lines)[-1].strip()[:300],
        "failed": [line for line in lines if line.startswith("FAILED")][:5],
    }


def _summary(results: list[dict]) -> list[dict]:
    rows = []
    for kind in KINDS:
        runs = [r for r in results if r["kind"] == kind]
        if runs:
            rows.append(
                {
                    "kind": kind,
                    "runs": len(runs),
                    "clean": sum(r["exit"] == 0 for r in runs),
                    "aborted (134)": sum(r["aborted"] for r in runs),
                    "timed out": sum(r["exit"] == "timeout" for r in runs),
                    "other failures": sum(
                        r["exit"] not in (0, "timeout") and not r["aborted"] for r in runs
                    ),
                    "median s": round(statistics.median(r["seconds"] for r in runs), 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of tests, loop and example")
    parser.add_argument("--control-runs", type=int, default=3, help="runs without PJRT_NPROC")
    parser.add_argument("--only", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
    parser.add_argument("--tests", nargs="+", default=list(SHARDED_TESTS))
    parser.add_argument("--loop-steps", type=int, default=LOOP_STEPS)
    parser.add_argument("--example-args", default="", help="extra train_lm.py arguments")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--out", default="soak.json", help="results (JSON)")
    parser.add_argument(
        "--pools", action="store_true", help="only compare the thread pools PJRT_NPROC gives"
    )
    parser.add_argument("--pool-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loop-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nproc", default="16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_child is not None:
        return _loop_child(args.loop_child, args.nproc)
    if args.pool_child is not None:
        return _pool_child(args.pool_child)
    if args.pools:
        return _pools()

    kinds = [k for k in args.only.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown --only entries {sorted(unknown)}; choose from {KINDS}")
    if "example" in kinds and not (ROOT / "examples" / "train_lm.py").exists():
        parser.error("examples/train_lm.py does not exist yet; leave 'example' out of --only")
    plan = [(i, k) for i in range(args.runs) for k in kinds if k != "control"]
    plan += [(i, "control") for i in range(args.control_runs) if "control" in kinds]
    results = []
    for i, kind in plan:
        results.append(_run(kind, args))
        r = results[-1]
        print(
            f"run {i + 1:2d} {kind:8s} exit {r['exit']!s:8s} {r['seconds']:7.1f} s  "
            f"{r['last_line'][:90]}",
            flush=True,
        )

    rows = _summary(results)
    print()
    print(" | ".join(rows[0]))
    for row in rows:
        print(" | ".join(str(v) for v in row.values()))
    import jax  # only now: the parent process runs no device code
    import jaxlib

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "date": datetime.date.today().isoformat(),
        "summary": rows,
        "runs": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
