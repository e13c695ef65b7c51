"""Where the block/full switch's time goes: a profiler trace of bench_period's loops, read back
with `jax.profiler.ProfileData`, summarized per update as wall time, device busy time (the
union of the kernels' intervals), idle time, kernel count and the largest idle gaps with the
kernels on either side.

    python benchmarks/switch_profile.py               # 4-layer 1.2 B-shaped tree (GPU)
    python benchmarks/switch_profile.py --small       # tiny tree (CPU: host events only)

Updates compared, each waited for: block steps inside the period-5 loop (one `lax.cond`),
block steps of the block-only update (no conditional), and full steps of both.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import bench_step

import muonbp_jax

GAP_NS = 5_000  # idle stretches shorter than this are not listed


def _device_events(profile: Any) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, name) of every kernel or copy on the accelerator's planes."""
    events = []
    for plane in profile.planes:
        if not plane.name.startswith("/device:") or "CPU" in plane.name:
            continue
        for line in plane.lines:
            # The stream lines hold kernels; "XLA Ops"/"XLA Modules"/"Steps" lines are
            # summaries drawn over the same intervals.
            if line.name.startswith(("XLA", "Steps", "Framework", "Source")):
                continue
            for e in line.events:
                events.append((e.start_ns, e.end_ns, e.name))
    return sorted(events)


def _host_windows(profile: Any, prefix: str) -> list[tuple[int, int, str]]:
    windows = []
    for plane in profile.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            for e in line.events:
                if e.name.startswith(prefix):
                    windows.append((e.start_ns, e.end_ns, e.name[len(prefix) :]))
    return sorted(windows)


def _host_events(profile: Any) -> list[tuple[int, int, str]]:
    return sorted(
        (e.start_ns, e.end_ns, e.name)
        for plane in profile.planes
        if plane.name.startswith("/host:")
        for line in plane.lines
        for e in line.events
        if not e.name.startswith("update:")
    )


def device_idle(
    start: int, end: int, inside: list[tuple[int, int, str]]
) -> tuple[int, list[tuple[int, str, str]]]:
    """(busy ns, idle stretches) of the sorted kernels `inside` a window [start, end].

    Busy time is the union of the kernels' intervals (kernels of one CUDA graph may overlap);
    each idle stretch is (ns, kernel before, kernel after), measured from the latest end so
    far. With any kernel, the first stretch is the one before it ("(start of update)") and the
    last the one after the last to end ("(end of update)").
    """
    busy, gaps, cursor, before = 0, [], None, "(start of update)"
    for s, t, name in inside:
        if cursor is None:
            gaps.append((s - start, before, name))
            cursor = s
        elif s > cursor:
            gaps.append((s - cursor, before, name))
        busy += max(0, t - max(s, cursor))
        if t > cursor:
            cursor, before = t, name
    if cursor is not None:
        gaps.append((end - cursor, before, "(end of update)"))
    return busy, gaps


def summarize(
    window: tuple[int, int, str],
    events: list[tuple[int, int, str]],
    host: list[tuple[int, int, str]] = (),
) -> dict[str, Any]:
    start, end, _ = window
    longest = sorted(((t - s, n) for s, t, n in host if s >= start and t <= end), reverse=True)[:8]
    inside = [e for e in events if e[0] >= start and e[1] <= end]
    busy, gaps = device_idle(start, end, inside)
    gaps = sorted((g for g in gaps if g[0] >= GAP_NS), reverse=True)
    return {
        "wall_us": (end - start) / 1e3,
        "busy_us": busy / 1e3,
        "kernels": len(inside),
        "gaps": [(round(g / 1e3, 1), a[:60], b[:60]) for g, a, b in gaps[:6]],
        "host": [(round(d / 1e3, 1), n[:70]) for d, n in longest],
        "kernel_list": [(round((t - s) / 1e3, 2), n[:90]) for s, t, n in inside],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--period", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the summary to this JSON file")
    parser.add_argument("--hlo", default=None, help="write the compiled programs here")
    args = parser.parse_args(argv)
    model = bench_step.SMALL if args.small else bench_step.Model(2048, 8192, args.layers, 32000)
    params = bench_step.random_tree(model, seed=0, scale=0.02)
    grads = bench_step.random_tree(model, seed=1, scale=1e-3)
    common = {"muon_weight_dimension_numbers": bench_step.routing(model), "block_grid": (1, 8)}
    p = args.period
    loops = {}
    for name, kind in ((f"P={p}", p), ("block alone", None), ("full alone", 1)):
        tx = muonbp_jax.muonbp(1e-3, period=kind, **common)
        state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
        for _ in range(p):  # compile and warm up; leaves the counter at a period boundary
            out, state = step(grads, state, params)
        jax.block_until_ready(out)
        loops[name] = (step, state)
        if args.hlo:
            Path(args.hlo).mkdir(parents=True, exist_ok=True)
            text = step.lower(grads, state, params).compile().as_text()
            Path(args.hlo, f"{name.replace(' ', '_').replace('=', '')}.hlo.txt").write_text(text)
    trace_dir = tempfile.mkdtemp(prefix="switch_profile_")
    with jax.profiler.trace(trace_dir):
        for name, (step, state) in loops.items():
            for i in range(2 * p):
                kind = (
                    "full"
                    if (name == "full alone" or (name == f"P={p}" and i % p == 0))
                    else "block"
                )
                with jax.profiler.TraceAnnotation(f"update:{name}:{kind}:{i}"):
                    out, state = step(grads, state, params)
                    jax.block_until_ready(out)
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(files[0])
    print("planes:", [pl.name for pl in profile.planes])
    events, host = _device_events(profile), _host_events(profile)
    rows, detail = [], {}
    for window in _host_windows(profile, "update:"):
        name, kind, i = window[2].split(":")
        if int(i) == 0 and name != "full alone":
            continue  # the first update after tracing starts carries the profiler's start-up
        detail.setdefault((name, kind), []).append(summarize(window, events, host))
    for (name, kind), items in detail.items():
        med = lambda k, items=items: statistics.median(x[k] for x in items)
        rows.append(
            {
                "loop": name,
                "step": kind,
                "n": len(items),
                "wall us": med("wall_us"),
                "device busy us": med("busy_us"),
                "idle us": med("wall_us") - med("busy_us"),
                "kernels": med("kernels"),
            }
        )
    print(_timing.table(rows, list(rows[0]), f"{_timing.environment()}  {model}"))
    for (name, kind), items in detail.items():
        print(f"\n{name} / {kind}: largest idle gaps (us, after, before) of one update")
        for gap in items[len(items) // 2]["gaps"]:
            print("  ", gap)
        print("  longest host events (us, name):")
        for event in items[len(items) // 2]["host"]:
            print("  ", event)
    payload = {
        "environment": _timing.environment(),
        "rows": rows,
        "gaps": {f"{n}/{k}": v[len(v) // 2]["gaps"] for (n, k), v in detail.items()},
        "host": {f"{n}/{k}": v[len(v) // 2]["host"] for (n, k), v in detail.items()},
        "kernels": {f"{n}/{k}": v[len(v) // 2]["kernel_list"] for (n, k), v in detail.items()},
    }
    _timing.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
