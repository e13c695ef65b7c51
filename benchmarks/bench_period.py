"""What the block/full switch costs: per-update times of a period-P MuonBP loop against the
same updates compiled alone (period=None for block steps, period=1 for full steps).

The loop threads the optimizer state, so the jitted update sees its counter advance and
`lax.cond` takes both branches in turn; each update is waited for. On one device a block step is
emulated with `block_grid`. Everything runs at the library's defaults.

    python benchmarks/bench_period.py                 # 1.2 B-shaped tree cut to 4 layers (GPU)
    python benchmarks/bench_period.py --small         # tiny tree (CPU check)
    python benchmarks/bench_period.py --hlo out/      # also write the compiled P-loop program
    python benchmarks/bench_period.py --layers 16     # the whole 1.2 B-shaped tree
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import bench_step

import muonbp_jax


def loop_times(step, state, params, grads, updates: int) -> list[float]:
    """Wall ms of each of `updates` consecutive calls of the jitted `step`, state threaded."""
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        out, state = step(grads, state, params)
        jax.block_until_ready(out)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _progress(name: str, times: list[float], period: int) -> None:
    """Each loop's figures as soon as they exist: a run cut short still reports them."""
    rest = times[period:]
    print(
        f"{name}: mean {statistics.mean(rest):.2f} ms, median {statistics.median(rest):.2f} ms "
        f"over {len(rest)} updates after the first period",
        flush=True,
    )


def measure(
    small: bool = False,
    period: int = 5,
    periods: int = 6,
    grid: tuple[int, int] = (1, 8),
    hlo_dir: str | None = None,
    layers: int = 4,
    with_diagnostics: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Times a period-`period` loop, block and full steps alone, and their difference;
    `options` go to `muonbp` (default: the library's defaults).

    Two more loops locate the switch's cost: the same period-`period` optimizer with the step
    kind chosen on the host (`full_step=`, static: two compiled programs, no `lax.cond`), and
    the block-only update wrapped in a `lax.cond` whose two branches are that same update (the
    conditional's own cost, with no second branch)."""
    model = bench_step.SMALL if small else bench_step.Model(2048, 8192, layers, 32000)
    params = bench_step.random_tree(model, seed=0, scale=0.02)
    grads = bench_step.random_tree(model, seed=1, scale=1e-3)
    common = {
        "muon_weight_dimension_numbers": bench_step.routing(model),
        "block_grid": grid,
        **options,
    }
    p, n = period, period * (periods + 1)
    runs = {}
    loops = [(f"P={p}", p), ("block alone", None), ("full alone", 1)]
    if with_diagnostics:
        loops.append((f"P={p} diagnostics", p))
    for name, kind in loops:
        extra = {"diagnostics": True} if name.endswith("diagnostics") else {}
        tx = muonbp_jax.muonbp(1e-3, period=kind, **common, **extra)
        state = jax.jit(tx.init)(params)
        step = jax.jit(tx.update)
        if hlo_dir and kind == p:
            Path(hlo_dir).mkdir(parents=True, exist_ok=True)
            text = step.lower(grads, state, params).compile().as_text()
            Path(hlo_dir, f"period{p}_update.hlo.txt").write_text(text)
        runs[name] = loop_times(step, state, params, grads, n)
        _progress(name, runs[name], p)
        if kind is None:
            block_tx, state0 = tx, state
        if name == f"P={p}":
            host_tx, host_state = tx, state
    # The host switch: the same period-p optimizer, the kind passed as `full_step` (static):
    # two compiled programs, no conditional.
    by_host = jax.jit(host_tx.update, static_argnames="full_step")
    state, times = host_state, []
    for i in range(n):
        start = time.perf_counter()
        out, state = by_host(grads, state, params, full_step=muonbp_jax.is_full_step(i, p))
        jax.block_until_ready(out)
        times.append(1e3 * (time.perf_counter() - start))
    runs["host switch"] = times
    _progress("host switch", times, p)
    same = lambda g, s, q, pred: jax.lax.cond(pred, block_tx.update, block_tx.update, g, s, q)
    wrapped = jax.jit(same)
    flips = itertools.cycle([True, False])  # a traced predicate that takes both branches
    runs["block in cond"] = loop_times(
        lambda g, s, q: wrapped(g, s, q, jnp.asarray(next(flips))), state0, params, grads, n
    )
    timed = {k: v[p:] for k, v in runs.items()}  # the first period absorbs compilation
    loop = timed[f"P={p}"]
    full_in_loop = statistics.median(loop[0::p])
    block_in_loop = statistics.median([t for i, t in enumerate(loop) if i % p])
    block, full = statistics.median(timed["block alone"]), statistics.median(timed["full alone"])
    alone_mean = ((p - 1) * block + full) / p
    rows = [
        {
            "update": "block step",
            "alone ms": block,
            "in P loop ms": block_in_loop,
            "overhead ms": block_in_loop - block,
        },
        {
            "update": "full step",
            "alone ms": full,
            "in P loop ms": full_in_loop,
            "overhead ms": full_in_loop - full,
        },
        {
            "update": f"mean of P={p}",
            "alone ms": alone_mean,
            "in P loop ms": statistics.mean(loop),
            "overhead ms": statistics.mean(loop) - alone_mean,
        },
        {
            "update": f"mean of P={p}, full_step= from the host",
            "alone ms": alone_mean,
            "in P loop ms": statistics.mean(timed["host switch"]),
            "overhead ms": statistics.mean(timed["host switch"]) - alone_mean,
        },
        {
            "update": "block step in a lax.cond of itself",
            "alone ms": block,
            "in P loop ms": statistics.median(timed["block in cond"]),
            "overhead ms": statistics.median(timed["block in cond"]) - block,
        },
    ]
    if with_diagnostics:  # every=100: no timed update is measured (while n <= 100)
        with_diag = statistics.mean(timed[f"P={p} diagnostics"])
        rows.append(
            {
                "update": f"mean of P={p}, diagnostics=True (not measured)",
                "alone ms": statistics.mean(loop),
                "in P loop ms": with_diag,
                "overhead ms": with_diag - statistics.mean(loop),
            }
        )
    title = f"{jax.devices()[0].device_kind}, block_grid {grid}, {model}"
    print(_timing.table(rows, ["update", "alone ms", "in P loop ms", "overhead ms"], title))
    return {"environment": _timing.environment(), "rows": rows, "raw_ms": timed}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny tree, for a CPU check")
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--periods", type=int, default=6, help="timed periods")
    parser.add_argument("--layers", type=int, default=4, help="layers of the tree (16: 1.2B)")
    parser.add_argument(
        "--diagnostics", action="store_true", help="also the P loop with diagnostics=True"
    )
    parser.add_argument("--block-grid", default="1,8", help="r,c tiles emulating TP blocks")
    parser.add_argument("--hlo", default=None, help="write the compiled P-loop update here")
    parser.add_argument("--ns-method", default=None, help="muonbp's ns_method (default: its)")
    parser.add_argument("--ns-coeffs", default=None, help="muonbp's ns_coeffs (default: its)")
    parser.add_argument("--ns-product", default=None, help="muonbp's ns_product (default: its)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    grid = tuple(int(v) for v in args.block_grid.split(","))
    options = {
        k: v
        for k, v in (
            ("ns_method", args.ns_method),
            ("ns_coeffs", args.ns_coeffs),
            ("ns_product", args.ns_product),
        )
        if v
    }
    payload = measure(
        args.small,
        args.period,
        args.periods,
        grid,
        args.hlo,
        args.layers,
        args.diagnostics,
        **options,
    )
    payload["options"] = options
    _timing.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
