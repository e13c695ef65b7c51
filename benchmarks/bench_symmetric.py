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

from muonbp_jax import _symmetric, _symmetric_wgmma
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
# The Mosaic GPU kernel's tilings (tile, tile_k, stages); shared memory holds 4 stages at most.
WGMMA_TILINGS = ((128, 64, 4), (128, 64, 3), (128, 128, 2))


def candidates(impls, configs, interpret: bool):
    """(name, m, k → whether it applies, jitted a·bᵀ) for each implementation to time."""
    out = []
    if "triangular" in impls:
        for tile, bk, warps, stages in configs:
            fn = functools.partial(
                _symmetric.triangular_product,
                tile=tile,
                block_k=bk,
                num_warps=warps,
                num_stages=stages,
                interpret=interpret,
            )
            fits = lambda m, k, tile=tile, bk=bk: m % tile == 0 and k % bk == 0
            out.append((f"tri {tile}/{bk}/{warps}/{stages}", fits, jax.jit(fn)))
    if "wgmma" in impls and not interpret:
        for tile, tile_k, stages in WGMMA_TILINGS:
            tiling = _symmetric_wgmma.Tiling(tile, tile_k, stages)
            fn = functools.partial(_symmetric_wgmma.lower_tile_product, tiling=tiling)
            fits = lambda m, k, t=tile, tk=tile_k: m % (2 * t) == 0 and k % tk == 0
            out.append((f"wgmma {tile}/{tile_k}/{stages}", fits, jax.jit(fn)))
    return out


def bench_products(shapes, impls, iters: int) -> list[dict]:
    rows = []
    for label, batch, m, k in shapes:
        # Scaled in float32, then cast: dividing by a NumPy float64 scalar would promote the
        # operands to float32 (this benchmark's tables before the fifth pass were float32).
        a = (jax.random.normal(jax.random.key(0), (batch, m, k)) / np.sqrt(k)).astype(jnp.float16)
        dense_fn = jax.jit(_symmetric.dense_product)
        ref = dense_fn(a, a)
        flops = 2 * batch * m * m * k
        ms = _timing.median_ms(dense_fn, a, a, iters=iters)
        rows.append({"shape": label, "impl": "dense", "ms": ms, "TFLOP/s": flops / ms / 1e9})
        print(_timing.table(rows[-1:], list(rows[-1])), flush=True)
        for name, fits, fn in impls:
            if not fits(m, k):
                continue
            try:
                out = fn(a, a)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                ms = _timing.median_ms(fn, a, a, iters=iters)
            except (ValueError, RuntimeError, jax.errors.JaxRuntimeError) as e:  # a refused tiling
                rows.append(
                    {"shape": label, "impl": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                )
                print(rows[-1], flush=True)
                continue
            rows.append(
                {
                    "shape": label,
                    "impl": name,
                    "ms": ms,
                    "TFLOP/s": flops / ms / 1e9,  # dense-equivalent
                    "max|Δ| vs dense": err,
                }
            )
            print(_timing.table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def _error_row(dtype, label: str, sms, got: np.ndarray, want: np.ndarray) -> dict:
    return {
        "dtype": jnp.dtype(dtype).name,
        "a·bᵀ": label,
        "SMs": sms or "all",
        "max|Δ| / max|ref|": float(np.abs(got - want).max() / np.abs(want).max()),
        "max|out − outᵀ|": float(np.abs(got - np.swapaxes(got, -1, -2)).max()),
    }


def check_wgmma() -> list[dict]:
    """The Mosaic kernel against a float64 NumPy product: XXᵀ, and S·S² for a symmetric S (two
    commuting symmetric matrices, so a product known to be symmetric without a = b)."""
    rows = []
    for dtype in (jnp.float16, jnp.bfloat16):
        # The last two run on 8 and 132 SMs: many tiles per program of the persistent loop.
        for batch, m, k, sms in (
            (3, 256, 256, None),
            (2, 512, 1024, None),
            (2, 1024, 2048, 8),
            (2, 2048, 8192, None),
        ):
            x = jax.random.normal(jax.random.key(m + k), (batch, m, k)) / np.sqrt(k)
            s = x[..., :m] + jnp.swapaxes(x[..., :m], -1, -2)
            pairs = {"XXᵀ": (x, x), "S·S²": (s, s @ s)}
            for name, (a, b) in pairs.items():
                a, b = a.astype(dtype), b.astype(dtype)
                fn = functools.partial(_symmetric_wgmma.lower_tile_product, num_sms=sms)
                got = np.asarray(jax.jit(fn)(a, b), np.float64)
                a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
                want = a64 @ np.swapaxes(b64, -1, -2)
                label = f"{name} {batch}×{a.shape[-2]}×{a.shape[-1]}"
                rows.append(_error_row(dtype, label, sms, got, want))
        # Xᵀ·X of tall X read as column panels (`transposed=True`): no transposed copy.
        for batch, k, m, sms in ((3, 512, 256, None), (2, 2048, 1024, 8), (2, 8192, 2048, None)):
            x = (jax.random.normal(jax.random.key(m * k), (batch, k, m)) / np.sqrt(k)).astype(dtype)
            fn = functools.partial(
                _symmetric_wgmma.lower_tile_product, num_sms=sms, transposed=True
            )
            got = np.asarray(jax.jit(fn)(x, x), np.float64)
            x64 = np.asarray(x, np.float64)
            want = np.swapaxes(x64, -1, -2) @ x64
            rows.append(_error_row(dtype, f"XᵀX (tall) {batch}×{k}×{m}", sms, got, want))
    print(_timing.table(rows, list(rows[0]), "wgmma kernel against float64"), flush=True)
    rows += check_wgmma_transforms()
    return rows


# (batch, k, m): tall matrices of the tree (down 8192×2048) and of its (1, 8) tiles.
TALL_SHAPES = ((16, 8192, 2048), (512, 2048, 256), (32 * 8, 2048, 1024), (16 * 8, 8192, 256))


def bench_tall(iters: int) -> list[dict]:
    """Xᵀ·X of a tall float16 X: cuBLAS (XLA's dot, transposed operand), the kernel on a
    transposed copy (the layout before tall matrices were iterated as they are), and the
    kernel reading column panels (`transposed=True`)."""
    rows = []
    kernel = _symmetric_wgmma.lower_tile_product

    def copy_then_kernel(x):
        y = jnp.swapaxes(x, -1, -2)  # the wide copy the kernel's X·Xᵀ needs
        return kernel(y, y)

    impls = {
        "XLA dot": lambda x: jnp.swapaxes(x, -1, -2) @ x,
        "copy + kernel": copy_then_kernel,
        "kernel, column panels": lambda x: kernel(x, x, transposed=True),
    }
    for batch, k, m in TALL_SHAPES:
        x = (jax.random.normal(jax.random.key(k + m), (batch, k, m)) / np.sqrt(k)).astype(
            jnp.float16
        )
        row = {"Xᵀ·X of": f"{batch}×{k}×{m}"}
        for name, fn in impls.items():
            row[f"{name} ms"] = _timing.median_ms(jax.jit(fn), x, iters=iters)
        rows.append(row)
        print(_timing.table(rows[-1:], list(row)), flush=True)
    return rows


# (label, batch, m): the square polynomials α·I + β·R + γ·R² of the tree's Newton–Schulz.
POLY_SHAPES = (
    ("R 2048 (×48, Gram form)", 48, 2048),
    ("A 2048 (×64, square leaves)", 64, 2048),
    ("R 1024 (×256, block tiles)", 256, 1024),
    ("R 256 (×512, block tiles)", 512, 256),
)
POLY = (3.4445, -4.7750, 2.0315)  # Jordan's quintic (α, β, γ)


def bench_polynomial(iters: int) -> list[dict]:
    """α·I + β·R + γ·R² for a symmetric float16 R: XLA (cuBLAS R·Rᵀ, then an elementwise
    pass), the kernel's R·Rᵀ then XLA's pass ("wgmma-unfused"), and the kernel with the sum
    formed in its epilogue (`square_polynomial`, R's own tile read by TMA or directly). Each
    against a float64 NumPy reference on the first matrix."""
    alpha, beta, gamma = POLY
    variants = {
        "dense": lambda r: _symmetric.square_polynomial(r, alpha, beta, gamma, "dense"),
        "wgmma-unfused": lambda r: _symmetric.square_polynomial(
            r, alpha, beta, gamma, "wgmma-unfused"
        ),
    }
    for own in ("tma", "direct"):
        tiling = _symmetric_wgmma.Tiling(own_tile=own)
        variants[f"fused, own tile {own}"] = functools.partial(
            _symmetric_wgmma.square_polynomial,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
            tiling=tiling,
        )
    rows = []
    for label, batch, m in POLY_SHAPES:
        x = jax.random.normal(jax.random.key(m), (batch, m, m)) / np.sqrt(m)
        r = ((x + jnp.swapaxes(x, -1, -2)) / 2).astype(jnp.float16)
        r0 = np.asarray(r[0], np.float64)
        want = alpha * np.eye(m) + beta * r0 + gamma * r0 @ r0
        for name, fn in variants.items():
            row = {"shape": label, "variant": name}
            try:
                jitted = jax.jit(fn)
                got = np.asarray(jitted(r)[0], np.float64)
                row["ms"] = _timing.median_ms(jitted, r, iters=iters)
                row["max|Δ| / max|ref|"] = float(np.abs(got - want).max() / np.abs(want).max())
                row["max|out − outᵀ|"] = float(np.abs(got - got.T).max())
            except Exception as err:  # noqa: BLE001 (a variant that fails to compile is reported)
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            rows.append(row)
            print(row, flush=True)
    keys = ["shape", "variant", "ms", "max|Δ| / max|ref|", "max|out − outᵀ|"]
    table = [{k: r.get(k, r.get("error", "")) for k in keys} for r in rows]
    print(_timing.table(table, keys, "α·I + β·R + γ·R², float16"), flush=True)
    return rows


def check_wgmma_transforms() -> list[dict]:
    """The kernel's vmap and derivative rules against float64 NumPy: vmap over a mapped axis
    (one launch with that axis as a batch) and over one mapped operand, and the gradient of
    sum(W ⊙ X·Xᵀ), which is (W + Wᵀ)·X."""
    rows = []
    fn = _symmetric_wgmma.lower_tile_product
    x = (jax.random.normal(jax.random.key(7), (3, 2, 256, 512)) / 16).astype(jnp.float16)
    w = jax.random.normal(jax.random.key(8), (3, 2, 256, 256)).astype(jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    t = lambda v: np.swapaxes(v, -1, -2)
    loss = lambda v, w: jnp.sum(w * fn(v, v).astype(jnp.float32))
    cases = {
        "vmap, both mapped": (jax.vmap(lambda v: fn(v, v))(x), x64 @ t(x64)),
        "vmap, b unmapped": (
            jax.vmap(lambda v: fn(v, x[0]))(x[:1]),
            x64[:1] @ t(x64[0]),
        ),
        "grad": (jax.jit(jax.grad(loss))(x, w), (w64 + t(w64)) @ x64),
        "vmap of grad": (jax.jit(jax.vmap(jax.grad(loss)))(x, w), (w64 + t(w64)) @ x64),
    }
    for name, (got, want) in cases.items():
        got = np.asarray(got, np.float64)
        rows.append(
            {
                "case": name,
                "shape": str(got.shape),
                "max|Δ| / max|ref|": float(np.abs(got - want).max() / np.abs(want).max()),
            }
        )
    print(_timing.table(rows, list(rows[0]), "wgmma kernel: vmap and grad"), flush=True)
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
    parser.add_argument("--skip-polynomial", action="store_true")
    parser.add_argument("--skip-tall", action="store_true")
    parser.add_argument(
        "--ns-products",
        default="dense,triangular",
        help="comma-separated products for the Newton–Schulz runs (dense, triangular, wgmma, "
        "panels:K)",
    )
    parser.add_argument(
        "--impls",
        default="triangular,wgmma",
        help="kernels timed against the dense product: triangular (Triton), wgmma (Mosaic GPU)",
    )
    args = parser.parse_args(argv)
    env = _timing.environment()
    print(env, flush=True)
    start = time.time()
    interpret = jax.default_backend() != "gpu"
    shapes = SMALL if args.small else SHAPES
    configs = CONFIGS[:1] if args.small else CONFIGS
    payload = {"environment": env}
    if "wgmma" in args.impls and not interpret:
        payload["wgmma_check"] = check_wgmma()
        if not args.skip_polynomial:
            payload["polynomial"] = bench_polynomial(args.iters)
        if not args.skip_tall:
            payload["tall"] = bench_tall(args.iters)
    if not args.skip_products:
        impls = candidates(args.impls.split(","), configs, interpret)
        payload["products"] = bench_products(shapes, impls, args.iters)
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
