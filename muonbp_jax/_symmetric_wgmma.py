"""a·bᵀ known to be symmetric, from its lower tiles: a Mosaic GPU kernel for Hopper.

The same contract as `_symmetric.triangular_product` (the Triton kernel), on the hardware
path Hopper's fast matmuls use: TMA copies into shared memory, a warp-specialized pipeline
(one producer warpgroup, two consumer warpgroups) and `wgmma` instructions. It follows the
structure of JAX's own Hopper matmul example (`jax.experimental.pallas.ops.gpu.
hopper_matmul_mgpu`), with three changes:

* the persistent loop runs over the lower tiles (i ≥ j) of each matrix only, t(t+1)/2 of the
  t² tiles, so the matmul FLOPs are (t+1)/(2t) of the dense product's;
* every tile below the diagonal is written twice: as computed, and transposed into its mirror
  position above the diagonal (a register layout change to the transposed WGMMA layout, then a
  store through a transposed view of shared memory);
* both operands are row-major (m, k): the product is a·bᵀ, b's tiles are handed to `wgmma`
  through a transposed shared-memory view, and leading axes are a batch;
* `transposed=True` takes (k, m) operands instead and computes aᵀ·b (Xᵀ·X of a tall X, so
  that tall matrices need no transposed copy): the operand tiles are k×tile column panels,
  handed to `wgmma` as M- and N-major shared-memory views (allowed for 16-bit types).

Only real float16 and bfloat16 on sm_90 devices; callers fall back to the dense product
elsewhere (`supported`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax


@functools.cache
def _mgpu():
    # Imported on first use: the Mosaic GPU lowering is only needed when the kernel runs.
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return pl, plgpu


@dataclasses.dataclass(frozen=True)
class Tiling:
    """tile: the side of one output tile (each of the two consumer warpgroups computes a
    tile × tile/2 half); tile_k: the contraction step per pipeline stage; stages: how many
    stages of operand tiles are in flight."""

    tile: int = 128
    tile_k: int = 64
    stages: int = 4
    # How `square_polynomial` reads R's own tile: "tma" (copied into shared memory while the
    # tile's product runs) or "direct" (loaded from global memory after it).
    own_tile: str = "tma"


@functools.cache
def api_available() -> bool:
    """Whether the installed jax has the Mosaic GPU calls the kernel is written against (an
    experimental API: a jax without them falls back to XLA's matmul under "auto")."""
    try:
        _, plgpu = _mgpu()
    except ImportError:
        return False
    needed = (
        "emit_pipeline_warp_specialized",
        "transpose_ref",
        "layout_cast",
        "nd_loop",
        "find_swizzle",
        "broadcasted_iota",
        "load",
    )
    return (
        all(hasattr(plgpu, name) for name in needed)
        and hasattr(plgpu.Layout, "WGMMA_TRANSPOSED")
        and hasattr(plgpu.LoweringSemantics, "Warpgroup")
    )


def runs_on(device) -> bool:
    """Whether the kernel runs on `device`: an NVIDIA GPU of compute capability 9.0 (Hopper:
    H100, H200, GH200), with a jax that has the calls it needs (`api_available`)."""
    hopper = device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"
    return hopper and api_available()


def supported(a: jax.Array, tiling: Tiling = Tiling(), transposed: bool = False) -> bool:
    """Whether `lower_tile_product` takes arrays of a's shape and dtype."""
    m, k = a.shape[-2:][::-1] if transposed else a.shape[-2:]
    return (
        a.dtype in (jnp.float16, jnp.bfloat16)
        and a.size > 0
        and m % (2 * tiling.tile) == 0
        and k % tiling.tile_k == 0
    )


def _WGMMA():
    return _mgpu()[1].Layout.WGMMA


def _lower_tile(index: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
    """(i, j) of the index-th lower tile (i ≥ j) of a t×t grid, t even: row r and row t−1−r
    together hold t+1 lower tiles, so index // (t+1) names the pair and index % (t+1) the tile."""
    r, c = lax.div(index, t + 1), lax.rem(index, t + 1)
    in_row_r = c <= r
    return lax.select(in_row_r, r, t - 1 - r), lax.select(in_row_r, c, c - r - 1)


def _kernel(
    a_gmem, b_gmem, out_gmem, *, tiling: Tiling, t: int, batch: int, poly, transposed: bool
):
    pl, plgpu = _mgpu()
    dtype = a_gmem.dtype
    tile, tile_k, half = tiling.tile, tiling.tile_k, tiling.tile // 2
    k_steps = a_gmem.shape[-2 if transposed else -1] // tile_k
    itemsize = jnp.dtype(dtype).itemsize

    def swizzled(width: int):
        swizzle = plgpu.find_swizzle(width * itemsize * 8)
        return (
            plgpu.TilingTransform((8, swizzle // itemsize)),
            plgpu.SwizzleTransform(swizzle),
        )

    def pipeline(body, compute_context):
        if transposed:  # k×tile column panels of (k, m) operands
            spec = plgpu.BlockSpec(
                (tile_k, tile), lambda s: (s, 0), transforms=swizzled(tile), memory_space=plgpu.SMEM
            )
        else:  # tile×k row panels of (m, k) operands
            spec = plgpu.BlockSpec(
                (tile, tile_k),
                lambda s: (0, s),
                transforms=swizzled(tile_k),
                memory_space=plgpu.SMEM,
            )
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[spec, spec],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=tiling.stages,
            compute_context=compute_context,
        )

    ignore = lambda *_, **__: None
    tma_own = poly is not None and tiling.own_tile == "tma"

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(ignore, ignore).get_allocations(a_gmem.at[0], b_gmem.at[0]),
        out_smem=plgpu.SMEM((2, tile, half), dtype, transforms=swizzled(half)),
        mirror_smem=plgpu.SMEM((2, half, tile), dtype),
        # R's own tile for square_polynomial (32 KB of shared memory at 128/64: only then).
        own=(
            plgpu.SMEM((2, tile, half), dtype, transforms=swizzled(half)),
            plgpu.Barrier(num_barriers=2),
        )
        if tma_own
        else None,
        collective_axes="wg",
    )
    def _scope(allocations, out_smem, mirror_smem, own):
        own_smem, own_barrier = own if tma_own else (None, None)
        wg = lax.axis_index("wg")
        per_matrix = t * (t + 1) // 2

        @plgpu.nd_loop((batch * per_matrix,), collective_axes="sm")
        def _tiles(info):
            (index,) = info.index
            n = lax.div(index, per_matrix)
            i, j = _lower_tile(lax.rem(index, per_matrix), t)
            rows = pl.ds(i * tile, tile)  # this tile's rows
            cols = pl.ds(j * tile + wg * half, half)  # this warpgroup's half of its columns

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile, half), jnp.float32))
                def _accumulate(acc_ref):
                    if tma_own:
                        own_tile = a_gmem.at[n, rows, cols]
                        plgpu.copy_gmem_to_smem(own_tile, own_smem.at[wg], own_barrier.at[wg])
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if poly is not None:  # α·I + β·a + γ·a·bᵀ, a square: a's own tile
                        alpha, beta, gamma = poly
                        if tma_own:
                            plgpu.barrier_wait(own_barrier.at[wg])
                            own = plgpu.load(own_smem.at[wg], (), layout=_WGMMA())
                        else:
                            own_tile = a_gmem.at[n, rows, cols]
                            own = plgpu.load(own_tile, (), layout=_WGMMA(), optimized=False)
                        acc = gamma * acc + beta * own.astype(jnp.float32)
                        if alpha:
                            shape = (tile, half)
                            r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=_WGMMA())
                            c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=_WGMMA())
                            diagonal = r + i * tile == c + (j * tile + wg * half)
                            acc = acc + jnp.where(diagonal, jnp.float32(alpha), jnp.float32(0))
                    acc = acc.astype(dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's stores
                    out_smem[wg] = acc

                    @pl.when(i > j)
                    def _():
                        mirror = plgpu.transpose_ref(mirror_smem.at[wg], (1, 0))
                        mirror[...] = plgpu.layout_cast(acc, plgpu.Layout.WGMMA_TRANSPOSED)

                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[n, rows, cols])

                    @pl.when(i > j)
                    def _():
                        plgpu.copy_smem_to_gmem(mirror_smem.at[wg], out_gmem.at[n, cols, rows])

            def mma(_, a_smem, b_smem, acc_ref):
                if transposed:  # a_smem, b_smem: (tile_k, tile); acc += a_smemᵀ · b_smem[:, half]
                    b_half = b_smem.at[:, pl.ds(wg * half, half)]
                    plgpu.wgmma(acc_ref, plgpu.transpose_ref(a_smem, (1, 0)), b_half)
                else:  # a_smem, b_smem: (tile, tile_k); acc += a_smem · b_smem[half]ᵀ
                    b_half = b_smem.at[pl.ds(wg * half, half)]
                    plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_half, (1, 0)))
                plgpu.wgmma_wait(0)
                return acc_ref

            if transposed:
                panels = (a_gmem.at[n, :, rows], b_gmem.at[n, :, pl.ds(j * tile, tile)])
            else:
                panels = (a_gmem.at[n, rows, :], b_gmem.at[n, pl.ds(j * tile, tile), :])
            pipeline(mma, compute_context)(*panels, allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def lower_tile_product(
    a: jax.Array,
    b: jax.Array,
    tiling: Tiling = Tiling(),
    num_sms: int | None = None,
    transposed: bool = False,
) -> jax.Array:
    """a·bᵀ for real half-precision a, b of shape (..., m, k) whose product is symmetric,
    computed from its lower tiles (see the module docstring); with `transposed=True`, aᵀ·b for
    a, b of shape (..., k, m) (Xᵀ·X of a tall X without a transposed copy).

    Differentiable: Mosaic GPU kernels have no autodiff rule, so the derivative is given by
    hand, da·bᵀ + a·dbᵀ (daᵀ·b + aᵀ·db when transposed) as XLA matmuls (the tangent's terms
    are not symmetric on their own)."""
    return _differentiable(tiling, num_sms, None, bool(transposed), a, b)


def square_polynomial(
    r: jax.Array,
    alpha: float,
    beta: float,
    gamma: float,
    tiling: Tiling = Tiling(),
    num_sms: int | None = None,
) -> jax.Array:
    """α·I + β·R + γ·R² for a real half-precision symmetric R of shape (..., m, m), R² as
    R·Rᵀ from its lower tiles like `lower_tile_product`; the linear and identity terms are
    added to each tile in registers, so no elementwise pass reads R² back. R must be exactly
    symmetric: the tiles above the diagonal are mirrors, β·R's included (and so is the
    derivative's β·dR, which `jax.jvp` takes from the unmirrored tangent: symmetric tangents
    only, as inside Newton–Schulz)."""
    poly = (float(alpha), float(beta), float(gamma))
    return _differentiable(tiling, num_sms, poly, False, r, r)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _differentiable(
    tiling: Tiling, num_sms: int | None, poly, transposed: bool, a: jax.Array, b: jax.Array
):
    return _batchable(tiling, num_sms, poly, transposed)(a, b)


@functools.cache
def _batchable(tiling: Tiling, num_sms: int | None, poly, transposed: bool):
    """The kernel with a vmap rule of our own: a mapped axis becomes one more leading batch
    axis of a single kernel launch (the kernel batches its leading axes itself)."""

    @jax.custom_batching.custom_vmap
    def run(a, b):
        return _run(a, b, tiling, num_sms, poly, transposed)

    @run.def_vmap
    def _rule(axis_size, in_batched, a, b):
        a, b = (
            x if mapped else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, mapped in zip((a, b), in_batched)
        )
        return run(a, b), True

    return run


@_differentiable.defjvp
def _differentiable_jvp(tiling, num_sms, poly, transposed, primals, tangents):
    (a, b), (da, db) = primals, tangents
    transpose = lambda x: jnp.swapaxes(x, -1, -2)
    if transposed:
        tangent = transpose(da) @ b + transpose(a) @ db
    else:
        tangent = da @ transpose(b) + a @ transpose(db)
    if poly is not None:
        _, beta, gamma = poly
        tangent = gamma * tangent + beta * da
    return _differentiable(tiling, num_sms, poly, transposed, a, b), tangent


def _local_sms() -> int:
    """This process's first GPU's SM count; 132 (H100 SXM, H200) where there is no GPU (a
    program lowered for CUDA elsewhere)."""
    try:
        gpus = jax.local_devices(backend="gpu")
    except RuntimeError:
        gpus = []
    return (getattr(gpus[0], "core_count", None) if gpus else None) or 132


def _run(
    a: jax.Array, b: jax.Array, tiling: Tiling, num_sms: int | None, poly, transposed: bool
) -> jax.Array:
    _, plgpu = _mgpu()
    m, k = a.shape[-2:][::-1] if transposed else a.shape[-2:]
    if a.shape != b.shape or a.dtype != b.dtype or not supported(a, tiling, transposed):
        layout = "(..., k, m)" if transposed else "(..., m, k)"
        raise ValueError(
            f"lower_tile_product needs two float16 or bfloat16 {layout} arrays of one shape "
            f"and dtype with m a multiple of {2 * tiling.tile} and k of {tiling.tile_k}; got "
            f"{a.shape} {a.dtype}, {b.shape} {b.dtype}."
        )
    if poly is not None and (m != k or transposed):
        raise ValueError(f"square_polynomial needs square matrices; got shape {a.shape}.")
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    batch, t = a3.shape[0], m // tiling.tile
    if num_sms is None:
        num_sms = _local_sms()
    run = plgpu.kernel(
        functools.partial(
            _kernel, tiling=tiling, t=t, batch=batch, poly=poly, transposed=transposed
        ),
        out_type=jax.ShapeDtypeStruct((batch, m, m), a.dtype),
        grid=(min(num_sms, batch * t * (t + 1) // 2),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return run(a3, b3).reshape(*lead, m, m)
