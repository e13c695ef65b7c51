"""A/B timing of a few of bench_step's updates on the 1.2 B tree: each call waited for (as
bench_step) and pipelined (10 updates threading the state, dispatched without waiting, then
one wait: what a training loop sees, with the host's dispatch overlapped).

    python benchmarks/ab_update.py --label NAME [--runs "muonbp P=1 defaults;..."] [--donate]

`--donate` also times the update as a training loop runs it: compiled with the optimizer state
donated and threaded from call to call, each call waited for. This is meant to let the state's
buffers keep their addresses from call to call, so that XLA:GPU need not update the program's
CUDA graph before launching it; whether it does was not checked (it measured no faster on one
H200: benchmarks/RESULTS.md, "Speed, fourth pass").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import bench_step

DEFAULT_RUNS = "optax.adamw;muonbp P=1 defaults;muonbp block (1,8) defaults"


def pipelined_ms(step, grads, state, params, n: int = 10, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        jax.block_until_ready(state)
        start = time.perf_counter()
        s = state
        for _ in range(n):
            _, s = step(grads, s, params)
        jax.block_until_ready(s)
        best = min(best, (time.perf_counter() - start) * 1e3 / n)
    return best


def donated_ms(update, grads, state, params, iters: int = 10) -> float:
    """Median wall time of waited calls of `update` jitted with its state donated and
    threaded (a fresh copy of `state` is consumed)."""
    s = jax.tree.map(lambda x: x.copy(), state)
    step = jax.jit(update, donate_argnums=(1,)).lower(grads, s, params).compile()
    for _ in range(3):
        out, s = step(grads, s, params)
    jax.block_until_ready(s)
    del out
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        out, s = step(grads, s, params)
        jax.block_until_ready((out, s))
        times.append(time.perf_counter() - start)
        del out
    return 1e3 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="tiny tree (a CPU try-out)")
    parser.add_argument("--donate", action="store_true", help="also time donated calls")
    args = parser.parse_args(argv)
    # Which copy of the package runs: A/B variants are copies put first on PYTHONPATH (printed
    # first, so that a run cut short still says it).
    print(f"muonbp_jax from {Path(bench_step.muonbp_jax.__file__).parent}", flush=True)
    model = bench_step.SMALL if args.small else bench_step.FULL
    params = bench_step.random_tree(model, seed=0, scale=0.02)
    grads = bench_step.random_tree(model, seed=1, scale=1e-3)
    runs = bench_step.optimizers(model)
    rows = []
    for name in args.runs.split(";"):
        tx = runs[name].make()
        state = jax.jit(tx.init)(params)
        step = jax.jit(tx.update).lower(grads, state, params).compile()
        waited = _timing.median_ms(step, grads, state, params, iters=args.iters)
        rows.append(
            {
                "variant": args.label,
                "update": name,
                "waited ms": waited,
                "pipelined ms": pipelined_ms(step, grads, state, params),
            }
        )
        if args.donate:
            rows[-1]["donated ms"] = donated_ms(tx.update, grads, state, params, args.iters)
        print(_timing.table(rows[-1:], list(rows[-1])), flush=True)
        del state, step
    print(_timing.table(rows, list(rows[0]), f"{_timing.environment()} {args.label}"))


if __name__ == "__main__":
    main()
