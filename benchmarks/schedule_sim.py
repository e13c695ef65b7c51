"""Newton–Schulz schedules in exact arithmetic: each singular value of bench_step's three test
spectra (2048×8192 by default) pushed through the scalar polynomials in float64, after the
Frobenius normalization, in float64 instead of half precision. Rounding moved the GPU's figures
for these matrices by about 1% either way (bench_step's quality table), far less than the gaps
between the schedules here; so a schedule that misses optax's orthogonality here by more than
that misses it on these matrices in any implementation.

    python benchmarks/schedule_sim.py                  # CPU, about a minute
    python benchmarks/schedule_sim.py --shape 256,2048

Columns: σ_min, σ_max, and |UUᵀ − I|_F / √m = RMS(σ² − 1), as in bench_step's quality table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
import bench_step

from muonbp_jax._newton_schulz import coefficient_schedule

SCHEDULES = (("jordan", 5), ("polar_express", 5), ("polar_express", 4), ("jordan", 4))


def apply(sigma: np.ndarray, schedule: np.ndarray) -> np.ndarray:
    for a, b, c in schedule:
        sigma = a * sigma + b * sigma**3 + c * sigma**5
    return sigma


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="2048,8192")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    m, n = (int(v) for v in args.shape.split(","))
    rows = []
    for kind in ("gaussian", "power", "spiked"):
        x = np.asarray(bench_step.spectrum_matrix(kind, m, n, seed=len(kind)), np.float64)
        sigma = np.linalg.svd(x, compute_uv=False)
        sigma = sigma / np.sqrt(np.sum(sigma**2))  # ‖X‖_F = sqrt(Σσ²)
        for name, steps in SCHEDULES:
            out = apply(sigma, coefficient_schedule(name, steps))
            rows.append(
                {
                    "spectrum": kind,
                    "schedule": f"{name} x{steps}",
                    "sigma_min": float(out.min()),
                    "sigma_max": float(out.max()),
                    "|UU^T-I|_F/sqrt(m)": float(np.sqrt(np.mean((out**2 - 1) ** 2))),
                }
            )
    print(_timing.table(rows, list(rows[0]), f"exact arithmetic, {m}x{n}"))
    _timing.write_json(args.out, {"shape": [m, n], "rows": rows})
    return rows


if __name__ == "__main__":
    main()
