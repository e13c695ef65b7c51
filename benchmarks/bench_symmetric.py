"""Hermitian products from their lower triangle, against the dense matmul (issue 11, item 5).

Times `a·bᵀ` for the shapes Newton–Schulz multiplies on bench_step's 1.2 B tree (its full
matrices and its (1, 8) block tiles), dense (XLA, cuBLAS) and with the triangular Pallas kernel
of `muonbp_jax._symmetric` at several tilings; then Newton–Schulz itself on the tree's matrices
and on the block tiles with each product. Float16, as the Gram form iterates on GPUs.

    python benchmarks/bench_symmetric.py --out sym.json        # GPU
    python benchmarks/bench_symmetric.py --small               # a CPU try-out (interpreted)
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing
from bench_step import FULL, block_tiles, ns_flops

from muonbp_jax import _symmetric
from muonbp_jax._newton_schulz import NewtonSchulz, orthogonalize_many

# (label, batch, m, k): a·bᵀ with a, b of shape (batch, m, k).
SHAPES = (
    ("XXᵀ, full 2048×8192 (×48)", 48, 2048, 8192),
    ("m×m, full 2048 (×48)", 48, 2048, 2048),
    ("m×m, full 2048 (×64, square leaves)", 64, 2048, 2048),
    ("XXᵀ, tile 1024×2048 (×256)", 256, 1024, 2048),
    ("m×m, tile 1024 (×256)", 256, 1024, 1024),
    ("XXᵀ, tile 256×2048 (×512)", 512, 256, 2048),
    ("m×m, tile 256 (×640)", 640, 256, 256),
)
SMALL = (("XXᵀ 256×512", 2, 256, 512), ("m×m 256", 2, 256, 256))
# (tile, block_k, num_warps, num_stages)
CONFIGS = ((128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3), (128, 64, 8, 4))


def bench_products(shapes, configs, iters: int, interpret: bool) -> list[dict]:
    rows = []
    for label, batch, m, k in shapes:
        a = jax.random.normal(jax.random.key(0), (batch, m, k), jnp.float16) / np.sqrt(k)
        dense_fn = jax.jit(_symmetric.dense_product)
        ref = dense_fn(a, a)
        flops = 2 * batch * m * m * k
        ms = _timing.median_ms(dense_fn, a, a, iters=iters)
        rows.append({"shape": label, "impl": "dense", "ms": ms, "TFLOP/s": flops / ms / 1e9})
        print(_timing.table(rows[-1:], list(rows[-1])), flush=True)
        for tile, bk, warps, stages in configs:
            if m % tile or k % bk:
                continue
            fn = jax.jit(
                functools.partial(
                    _symmetric.triangular_product,
                    tile=tile,
                    block_k=bk,
                    num_warps=warps,
                    num_stages=stages,
                    interpret=interpret,
                )
            )
            try:
                out = fn(a, a)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                ms = _timing.median_ms(fn, a, a, iters=iters)
            except (ValueError, RuntimeError, jax.errors.JaxRuntimeError) as e:  # a refused tiling
                rows.append(
                    {
                        "shape": label,
                        "impl": f"tri {tile}/{bk}/{warps}/{stages}",
                        "error": f"{type(e).__name__}: {str(e)[:200]}",
                    }
                )
                print(rows[-1], flush=True)
                continue
            rows.append(
                {
                    "shape": label,
                    "impl": f"tri {tile}/{bk}/{warps}/{stages}",
                    "ms": ms,
                    "TFLOP/s": flops / ms / 1e9,  # dense-equivalent
                    "max|Δ| vs dense": err,
                }
            )
            print(_timing.table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def bench_newton_schulz(
    shapes: list[tuple[int, int]], label: str, iters: int, products=("dense", "triangular")
) -> list[dict]:
    """Newton–Schulz (defaults: Gram form, Polar Express, float16) on `shapes`, batched by
    shape as the library does, with each product."""
    groups: dict[tuple[int, int], int] = {}
    for r, c in shapes:
        groups[(min(r, c), max(r, c))] = groups.get((min(r, c), max(r, c)), 0) + 1
    mats = [
        jax.random.normal(jax.random.key(i), (n, *s), jnp.float32)
        for i, (s, n) in enumerate(groups.items())
    ]
    rows, outs = [], {}
    for product in products:
        ns = NewtonSchulz.create(method="gram", product=product)
        fn = jax.jit(lambda ms, ns=ns: orthogonalize_many(ms, ns))
        outs[product] = fn(mats)
        ms = _timing.median_ms(fn, mats, iters=iters)
        rows.append(
            {
                "matrices": label,
                "product": product,
                "ms": ms,
                "TFLOP/s (Gram FLOPs)": ns_flops(shapes, "gram") / ms / 1e9,
            }
        )
    # Orthogonality of the results (σ of the first matrix of each group, float64 on the host).
    for product, out in outs.items():
        s = [np.linalg.svd(np.asarray(o[0], np.float64), compute_uv=False) for o in out]
        row = next(r for r in rows if r["product"] == product)
        row["σ min"] = float(min(v.min() for v in s))
        row["σ max"] = float(max(v.max() for v in s))
        row["max|Δ| vs dense"] = max(
            float(jnp.max(jnp.abs(d.astype(jnp.float32) - t.astype(jnp.float32))))
            for d, t in zip(outs[products[0]], out)
        )
    print(_timing.table(rows, list(rows[0])), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-ns", action="store_true")
    parser.add_argument("--skip-products", action="store_true")
    parser.add_argument(
        "--ns-products",
        default="dense,triangular",
        help="comma-separated products for the Newton–Schulz runs (dense, triangular, panels:K)",
    )
    args = parser.parse_args(argv)
    env = _timing.environment()
    print(env, flush=True)
    start = time.time()
    interpret = jax.default_backend() != "gpu"
    shapes = SMALL if args.small else SHAPES
    configs = CONFIGS[:1] if args.small else CONFIGS
    payload = {"environment": env}
    if not args.skip_products:
        payload["products"] = bench_products(shapes, configs, args.iters, interpret)
        print(f"products done in {time.time() - start:.0f} s", flush=True)
    if not (args.skip_ns or args.small):
        products = tuple(args.ns_products.split(","))
        payload["newton_schulz"] = bench_newton_schulz(
            FULL.matrix_shapes(), "tree, 112", args.iters, products
        )
        payload["newton_schulz"] += bench_newton_schulz(
            block_tiles(FULL, (1, 8)), "(1, 8) block tiles", args.iters, products
        )
    print(f"done in {time.time() - start:.0f} s", flush=True)
    _timing.write_json(args.out, payload)


if __name__ == "__main__":
    main()
