"""Where one update's time goes, kernel by kernel: a profiler trace of bench_step's updates on
the 1.2 B tree, each kernel's device time summed by kind (matmuls against everything else) and
by name.

    python benchmarks/update_profile.py --out profile.json     # GPU, whole tree
    python benchmarks/update_profile.py --small                # tiny tree (CPU: host events)

Updates: `muonbp(period=1)` and `muonbp(period=None, block_grid=(1, 8))` at the defaults, and
the elementwise yardstick of bench_step (momentum SGD + AdamW from optax), 3 traced updates
each after warm-up (`--runs` picks others of bench_step's updates); the figures are of the
median one. Idle device time (wall time less the union of the kernels' intervals) is split
into the gaps between kernels and the time before the first kernel and after the last.
`--top N` also lists the N longest kernels and gaps; `--hlo DIR` writes each update's compiled
HLO, whose fusion names are the kernels' names.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import bench_step
from switch_profile import _device_events, _host_windows, device_idle

MATMUL = re.compile(r"gemm|xmma|cutlass|cublas|sm90|sm80|matmul|dot", re.IGNORECASE)
RUNS = ("muonbp P=1 defaults", "muonbp block (1,8) defaults")
FLOOR = "momentum SGD + AdamW (the elementwise passes, no Newton-Schulz)"


def family(name: str) -> str:
    """A kernel's name without its numeric suffixes (loop_fusion_12 → loop_fusion)."""
    return re.sub(r"(_\d+)+$", "", re.sub(r"\.\d+", "", name))[:70]


def breakdown(window, events, top: int = 0) -> dict[str, Any]:
    start, end, _ = window
    inside = [e for e in events if e[0] >= start and e[1] <= end]
    # The longest single kernels and the longest idle stretches (with the kernels around them).
    kernels = sorted(((round((t - s) / 1e3, 1), name) for s, t, name in inside), reverse=True)
    busy, idle = device_idle(start, end, inside)
    head, tail = (idle[0][0], idle[-1][0]) if idle else (0, 0)
    gaps = idle[1:-1]  # between kernels
    by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    matmul = other = 0.0
    for s, t, name in inside:
        us = (t - s) / 1e3
        key = family(name)
        by_name[key][0] += us
        by_name[key][1] += 1
        if MATMUL.search(name):
            matmul += us
        else:
            other += us
    return {
        "wall_us": (end - start) / 1e3,
        "kernels": len(inside),
        "matmul_us": matmul,
        "other_us": other,
        "by_name": sorted(((round(v[0], 1), v[1], k) for k, v in by_name.items()), reverse=True),
        "kernels_top": kernels[:top],
        "gaps_top": [(round(g / 1e3, 1), a, b) for g, a, b in sorted(gaps, reverse=True)[:top]],
        "gaps_us": sum(g[0] for g in gaps) / 1e3,
        "busy_us": busy / 1e3,
        "before_first_us": head / 1e3,
        "after_last_us": tail / 1e3,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--runs", default=";".join((*RUNS, FLOOR)), help="';'-separated")
    parser.add_argument(
        "--hlo", default=None, help="folder: write each update's compiled HLO there (gzip)"
    )
    args = parser.parse_args(argv)
    model = bench_step.SMALL if args.small else bench_step.FULL
    params = bench_step.random_tree(model, seed=0, scale=0.02)
    grads = bench_step.random_tree(model, seed=1, scale=1e-3)
    runs = bench_step.optimizers(model)
    steps = {}
    for name in args.runs.split(";"):
        tx = runs[name].make()
        state, step = jax.jit(tx.init)(params), jax.jit(tx.update)
        if args.hlo:
            Path(args.hlo).mkdir(parents=True, exist_ok=True)
            text = step.lower(grads, state, params).compile().as_text()
            slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:60]
            with gzip.open(Path(args.hlo) / f"{slug}.hlo.txt.gz", "wt") as f:
                f.write(text)
        for _ in range(3):
            out, state = step(grads, state, params)
        jax.block_until_ready(out)
        steps[name] = (step, state)
    trace_dir = tempfile.mkdtemp(prefix="update_profile_")
    with jax.profiler.trace(trace_dir):
        for name, (step, state) in steps.items():
            for i in range(4):
                with jax.profiler.TraceAnnotation(f"update:{name}:{i}"):
                    out, _ = step(grads, state, params)
                    jax.block_until_ready(out)
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    profile = jax.profiler.ProfileData.from_file(files[0])
    events = _device_events(profile)
    per_run: dict[str, list[dict]] = collections.defaultdict(list)
    for window in _host_windows(profile, "update:"):
        name, i = window[2].rsplit(":", 1)
        if int(i) > 0:  # the first traced update carries the profiler's start-up
            per_run[name].append(breakdown(window, events, args.top))
    rows, detail = [], {}
    for name, items in per_run.items():
        items.sort(key=lambda x: x["wall_us"])
        mid = items[len(items) // 2]
        detail[name] = {k: mid[k] for k in ("by_name", "kernels_top", "gaps_top")}
        rows.append(
            {
                "update": name[:40],
                "wall ms": mid["wall_us"] / 1e3,
                "matmul kernels ms": mid["matmul_us"] / 1e3,
                "other kernels ms": mid["other_us"] / 1e3,
                # Idle: wall time less the union of the kernels' intervals (the kernel sums
                # above count overlapping kernels in full).
                "idle ms": (mid["wall_us"] - mid["busy_us"]) / 1e3,
                "kernels": mid["kernels"],
                "gaps ms": mid["gaps_us"] / 1e3,
                "before first ms": mid["before_first_us"] / 1e3,
                "after last ms": mid["after_last_us"] / 1e3,
            }
        )
    print(_timing.table(rows, list(rows[0]), f"{_timing.environment()}  {model}"))
    for name, d in detail.items():
        print(f"\n{name}: kernels by total time (us, count, name)")
        for row in d["by_name"][: args.top]:
            print("  ", row)
        print(f"{name}: longest kernels (us, name)")
        for row in d["kernels_top"]:
            print("  ", row)
        print(f"{name}: longest idle gaps between kernels (us, before, after)")
        for row in d["gaps_top"]:
            print("  ", row)
    payload = {"environment": _timing.environment(), "rows": rows, "by_name": detail}
    _timing.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
