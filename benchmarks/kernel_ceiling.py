"""The matmul ceiling two ways: wall time per call (how bench_step times everything, dispatch
and the wait included) and the device time of the kernels alone (a profiler trace), for the
large batched matmuls of bench_step's ceiling. The second is the hardware's yardstick for
kernel-level figures such as update_profile's matmul time.

    python benchmarks/kernel_ceiling.py --out ceiling.json     # GPU
"""

from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
from bench_step import CEILING_SHAPES
from switch_profile import _device_events, _host_windows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    shapes = ((2, 256, 256, 256),) if args.small else CEILING_SHAPES
    mm = jax.jit(jnp.matmul)
    cases = []
    for name, dtype in (("bf16", jnp.bfloat16), ("f16", jnp.float16)):
        for batch, m, k, n in shapes:
            a = jax.random.normal(jax.random.key(1), (batch, m, k), dtype)
            b = jax.random.normal(jax.random.key(2), (batch, k, n), dtype)
            wall = _timing.median_ms(mm, a, b, iters=args.iters)
            cases.append((f"{name} {batch}x{m}x{k}x{n}", 2 * batch * m * k * n, a, b, wall))
    trace_dir = tempfile.mkdtemp(prefix="kernel_ceiling_")
    with jax.profiler.trace(trace_dir):
        for label, _, a, b, _ in cases:
            for i in range(args.iters + 1):
                with jax.profiler.TraceAnnotation(f"call:{label}:{i}"):
                    jax.block_until_ready(mm(a, b))
    profile = jax.profiler.ProfileData.from_file(
        glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
    )
    events = _device_events(profile)
    kernel_us: dict[str, list[float]] = {}
    for start, end, name in _host_windows(profile, "call:"):
        label, i = name.rsplit(":", 1)
        if int(i) > 0:
            inside = [(t - s) / 1e3 for s, t, _ in events if s >= start and t <= end]
            kernel_us.setdefault(label, []).append(sum(inside))
    rows = []
    for label, flops, _, _, wall in cases:
        k = statistics.median(kernel_us.get(label, [float("nan")]))
        rows.append(
            {
                "matmul": label,
                "wall ms": wall,
                "TFLOP/s by wall time": flops / wall / 1e9,
                "kernel ms": k / 1e3 if k else None,  # no device plane on CPU
                "TFLOP/s by kernel time": flops / k / 1e6 if k else None,
            }
        )
    print(_timing.table(rows, list(rows[0]), str(_timing.environment())))
    _timing.write_json(args.out, {"environment": _timing.environment(), "rows": rows})


if __name__ == "__main__":
    main()
