"""Products whose result is Hermitian, computed from its lower triangle.

Newton–Schulz spends most of its FLOPs on products whose result is known to be Hermitian:
XXᴴ, and in the Gram form every product of two polynomials of R = XXᴴ (they commute, so
their product is Hermitian too). Only the lower triangle of such a product needs computing;
the upper one is its mirror. `gram(x) = X·Xᴴ`, `column_gram(x) = Xᴴ·X` (for tall X) and
`hermitian_product(a, b) = a·b (= a·bᴴ)` have these implementations:

* `"triangular"`: a Pallas (Triton) kernel on GPUs. Each program computes one lower tile
  (i ≥ j) and writes it and its mirror, so the matmul FLOPs are (t+1)/(2t) of the dense
  product for t tiles per side. Real float16/bfloat16/float32 only.
* `"wgmma"`: a Mosaic GPU kernel for Hopper (sm_90: TMA, warp-specialized pipeline, wgmma),
  the same lower tiles and mirror (`_symmetric_wgmma`), for X·Xᴴ and Xᴴ·X only (see
  `hermitian_product`, `column_gram`), with Newton–Schulz's polynomial α·I + β·R + γ·R²
  formed in the kernel (`square_polynomial`). Real float16/bfloat16 only. `"wgmma-unfused"`: the same
  kernel for X·Xᴴ, the polynomial as an XLA pass (kept for measurement).
* `"panels:K"`: K lower block panels as XLA matmuls, then the mirror assembled:
  (K+1)/(2K) of the FLOPs, any backend.
* `"dense"`: the plain product.

`"auto"` (the default) is `"wgmma"` on Hopper GPUs and `"dense"` everywhere else
(`resolve_product`): on one H200 the Mosaic kernel made Newton–Schulz on bench_step's tree
faster, the Triton kernel and the panels did not (benchmarks/RESULTS.md).

The blocks above the diagonal are the exact mirror of those below it; diagonal blocks are
computed in full (exactly symmetric only for XXᴴ). The dense product's result is Hermitian
only up to rounding.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

Product = Literal["auto", "dense", "triangular", "wgmma", "wgmma-unfused"] | str  # "panels:K"
PRODUCTS: tuple[str, ...] = ("auto", "dense", "triangular", "wgmma", "wgmma-unfused", "panels:K")
_KERNEL_PRODUCTS = ("wgmma", "wgmma-unfused")  # the Mosaic GPU kernel's


def _adjoint(x: jax.Array) -> jax.Array:
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def dense_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a·bᴴ as one (batched) matmul."""
    return a @ _adjoint(b)


@functools.cache
def _pallas():
    # Imported on first use: Pallas is part of jax but pulls in its GPU lowering.
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    return pl, plt


def _triangular_kernel(a_ref, b_ref, o_ref, *, tile: int, block_k: int, steps: int):
    pl, plt = _pallas()
    batch, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i >= j)
    def _lower_tile():
        def accumulate(s, acc):
            ks = pl.ds(pl.multiple_of(s * block_k, block_k), block_k)
            return acc + plt.dot(a_ref[:, ks], b_ref[:, ks], trans_b=True)

        acc = jax.lax.fori_loop(0, steps, accumulate, jnp.zeros((tile, tile), jnp.float32))
        c = acc.astype(o_ref.dtype)
        o_ref[batch, pl.ds(i * tile, tile), pl.ds(j * tile, tile)] = c

        @pl.when(i > j)
        def _mirror():
            o_ref[batch, pl.ds(j * tile, tile), pl.ds(i * tile, tile)] = c.T


def triangular_supported(a: jax.Array, tile: int = 128, block_k: int = 64) -> bool:
    """Whether `triangular_product` takes arrays of a's shape and dtype."""
    m, k = a.shape[-2:]
    return (
        a.dtype in (jnp.float16, jnp.bfloat16, jnp.float32)
        and m % tile == 0
        and k % block_k == 0
        and m >= tile
    )


def triangular_product(
    a: jax.Array,
    b: jax.Array,
    *,
    tile: int = 128,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """a·bᵀ for real a, b of shape (..., m, k) whose product is symmetric, from its lower
    tiles only (a Pallas kernel; `interpret=True` runs it anywhere, slowly, for tests)."""
    pl, plt = _pallas()
    if a.shape != b.shape or not triangular_supported(a, tile, block_k):
        raise ValueError(
            f"triangular_product needs two real (..., m, k) arrays of one shape and dtype with m "
            f"and k multiples of {tile} and {block_k}; got {a.shape} {a.dtype}, {b.shape}."
        )
    lead, (m, k) = a.shape[:-2], a.shape[-2:]
    a3, b3 = a.reshape(-1, m, k), b.reshape(-1, m, k).astype(a.dtype)
    tiles = m // tile
    kernel = functools.partial(_triangular_kernel, tile=tile, block_k=block_k, steps=k // block_k)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((a3.shape[0], m, m), a.dtype),
        grid=(a3.shape[0], tiles, tiles),
        in_specs=[
            pl.BlockSpec((None, tile, k), lambda n, i, j: (n, i, 0)),
            pl.BlockSpec((None, tile, k), lambda n, i, j: (n, j, 0)),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        compiler_params=None
        if interpret
        else plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="hermitian_lower_tiles",
    )(a3, b3)
    return out.reshape(*lead, m, m)


def panel_product(a: jax.Array, b: jax.Array, splits: int) -> jax.Array:
    """a·bᴴ, known Hermitian, from its lower block panels: `splits` matmuls (XLA's own, so any
    backend) with (splits+1)/(2·splits) of the dense FLOPs, then the mirror assembled."""
    m = a.shape[-2]
    if m % splits:
        return dense_product(a, b)
    h = m // splits
    panels = [a[..., j * h :, :] @ _adjoint(b[..., j * h : (j + 1) * h, :]) for j in range(splits)]
    columns = []
    for j in range(splits):
        upper = [_adjoint(panels[i][..., (j - i) * h : (j - i + 1) * h, :]) for i in range(j)]
        columns.append(jnp.concatenate([*upper, panels[j]], axis=-2) if upper else panels[j])
    return jnp.concatenate(columns, axis=-1)


def check_product(product: str) -> str:
    """`product` if it names one of `PRODUCTS`, else a ValueError."""
    if isinstance(product, str) and (
        product in ("auto", "dense", "triangular", *_KERNEL_PRODUCTS)
        or (product.startswith("panels:") and product[7:].isdecimal() and int(product[7:]) >= 1)
    ):
        return product
    raise ValueError(f"Unknown ns_product (Hermitian product) {product!r}; use one of {PRODUCTS}.")


def resolve_product(product: Product, device=None) -> str:
    """The product `product` stands for on `device` (default: jax's first default device):
    `"auto"` is `"wgmma"` where that kernel runs (`_symmetric_wgmma.runs_on`), else `"dense"`.
    Asking for `"wgmma"` elsewhere is a ValueError, as is an unknown name."""
    product = check_product(product)
    if product not in ("auto", *_KERNEL_PRODUCTS):
        return product
    from muonbp_jax import _symmetric_wgmma

    # This process's own device: every process of a multi-process run resolves alike.
    device = jax.local_devices()[0] if device is None else device
    if _symmetric_wgmma.runs_on(device):
        return "wgmma" if product == "auto" else product
    if product != "auto":
        raise ValueError(
            f"ns_product={product!r} needs an NVIDIA Hopper GPU (compute capability 9.0) and "
            f"a jax with Mosaic GPU's warp-specialized pipeline (tested: 0.10.2, 0.11.2); the "
            f"device is {getattr(device, 'device_kind', device)!r} ({device.platform}), jax "
            f"{jax.__version__}. Use 'auto' or 'dense'."
        )
    return "dense"


def _from_lower(a: jax.Array, rows: jax.Array, product: str) -> jax.Array | None:
    """a·rowsᴴ, known Hermitian, from its lower triangle; None where `product` is "dense" or
    the kernel does not take these arrays (the caller then multiplies densely)."""
    if product == "triangular":
        supported = a.shape == rows.shape and not jnp.iscomplexobj(a) and triangular_supported(a)
        return triangular_product(a, rows) if supported else None
    if product in _KERNEL_PRODUCTS:
        from muonbp_jax import _symmetric_wgmma

        supported = (
            a.shape == rows.shape and a.dtype == rows.dtype and _symmetric_wgmma.supported(a)
        )
        return _symmetric_wgmma.lower_tile_product(a, rows) if supported else None
    if product.startswith("panels:"):
        return panel_product(a, rows, int(product.split(":")[1]))
    return None


def hermitian_product(a: jax.Array, b: jax.Array, product: str = "dense") -> jax.Array:
    """a·b for a Hermitian b whose product with a is known to be Hermitian (two commuting
    polynomials of one Hermitian matrix, say): a·b = a·bᴴ, so only its lower triangle needs
    computing. "dense" (and any shape or dtype the kernel does not take) is plain `a @ b`.

    "wgmma" is plain `a @ b` here too: it serves `gram` only. Such a product is Hermitian in
    exact arithmetic, not after rounding (a and b commute only up to rounding), and mirroring
    its lower triangle turns the antisymmetric part of its rounding error into a symmetric
    error, which moves eigenvalues where the antisymmetric one barely does: with it, the Gram
    iteration pushed the largest singular value of bench_step's heavy-tailed test matrix from
    1.135 to 1.25 on an H200 (1.133 → 1.160 in a float64 simulation of float16 rounding;
    benchmarks/RESULTS.md). XXᴴ is Hermitian after rounding too: its mirror is exact.
    """
    out = None if product in _KERNEL_PRODUCTS else _from_lower(a, b, product)
    return a @ b if out is None else out


def gram(x: jax.Array, product: str = "dense") -> jax.Array:
    """X·Xᴴ, from its lower triangle unless `product` is "dense" (for a Hermitian X: X², as
    Newton–Schulz squares its Gram matrix)."""
    out = _from_lower(x, x, product)
    return dense_product(x, x) if out is None else out


def column_gram(x: jax.Array, product: str = "dense") -> jax.Array:
    """Xᴴ·X, the Gram matrix of X's columns (the smaller one of a tall X), without a transposed
    copy of X: the kernel products read X's column panels directly (`_symmetric_wgmma`,
    `transposed=True`); every other product is `gram` of Xᴴ, which XLA's matmul takes as a
    transposed operand."""
    if product in _KERNEL_PRODUCTS and not jnp.iscomplexobj(x):
        from muonbp_jax import _symmetric_wgmma

        if _symmetric_wgmma.supported(x, transposed=True):
            return _symmetric_wgmma.lower_tile_product(x, x, transposed=True)
    return gram(_adjoint(x), product)


def square_polynomial(
    r: jax.Array, alpha: float, beta: float, gamma: float, product: str = "dense"
) -> jax.Array:
    """α·I + β·R + γ·R² for a Hermitian R of shape (..., m, m), R² as `gram(R)` (R·Rᴴ).

    "wgmma" computes it in one kernel (`_symmetric_wgmma.square_polynomial`: the linear and
    identity terms added to each tile of R·Rᵀ before it is stored), where the kernel takes R;
    every other product forms γ·R² first, as `hermitian_product(γ·R, R)` (the dense
    product's rounding as before this kernel), and "wgmma-unfused" as γ·`gram(R)`; the sum is
    then an XLA pass."""
    if product == "wgmma" and not jnp.iscomplexobj(r) and r.shape[-1] == r.shape[-2]:
        from muonbp_jax import _symmetric_wgmma

        if _symmetric_wgmma.supported(r):
            return _symmetric_wgmma.square_polynomial(r, alpha, beta, gamma)
    if product == "wgmma-unfused":
        out = beta * r + gamma * gram(r, product)
    else:
        out = beta * r + hermitian_product(gamma * r, r, product)
    if alpha:
        out = out + alpha * jnp.eye(r.shape[-1], dtype=r.dtype)
    return out
