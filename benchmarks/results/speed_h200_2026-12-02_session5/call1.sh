# device call 1 of the fifth pass, from the repository root: the Mosaic GPU lower-tile kernel
# (muonbp_jax/_symmetric_wgmma.py) against the dense product and the stock Hopper matmul example
set -x
export PYTHONPATH=.
python -c "import jax, optax, flax, sys; print(sys.version, jax.__version__, optax.__version__, flax.__version__); print(jax.devices())" > $OUT/versions.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/versions.txt
cat > /tmp/check.py <<'PY'
import jax, jax.numpy as jnp, numpy as np, functools, sys
sys.path.insert(0, "benchmarks")
import _timing
from muonbp_jax import _symmetric_wgmma as w
# correctness: XXᵀ and S·S² (commuting symmetric), several shapes, both dtypes, vs float64
for dt in (jnp.float16, jnp.bfloat16):
    for b, m, k in ((3, 256, 256), (2, 512, 1024), (2, 1024, 2048)):
        x = jax.random.normal(jax.random.key(m + k), (b, m, k), jnp.float32) / np.sqrt(k)
        xh = x.astype(dt)
        got = np.asarray(jax.jit(w.lower_tile_product)(xh, xh), np.float64)
        x64 = np.asarray(xh, np.float64)
        ref = x64 @ np.swapaxes(x64, -1, -2)
        if m == k:
            s = x64 + np.swapaxes(x64, -1, -2)
            s2 = (s @ s)
            got2 = np.asarray(jax.jit(w.lower_tile_product)(jnp.asarray(s, dt), jnp.asarray(s2, dt)), np.float64)
            ref2 = np.asarray(jnp.asarray(s, dt), np.float64) @ np.asarray(jnp.asarray(s2, dt), np.float64)
            e2 = np.abs(got2 - ref2).max() / np.abs(ref2).max()
        else:
            e2 = float("nan")
        print(f"{jnp.dtype(dt).name} {b}x{m}x{k}: XXt rel err {np.abs(got - ref).max() / np.abs(ref).max():.2e}, S*S^2 rel err {e2:.2e}, asym {np.abs(got - np.swapaxes(got, -1, -2)).max():.2e}", flush=True)
# the stock Hopper example (dense) on one 2048x8192 XXt and one 2048^3, timed like the rest
from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
for m, k in ((2048, 8192), (2048, 2048), (4096, 4096)):
    a = jax.random.normal(jax.random.key(1), (m, k), jnp.float16) / np.sqrt(k)
    bt = jnp.asarray(a.T)
    dense = jax.jit(lambda a, b: a @ b)
    ms = _timing.median_ms(dense, a, bt, iters=20)
    print(f"dense {m}x{k}x{m}: {ms:.3f} ms {2*m*m*k/ms/1e9:.0f} TFLOP/s", flush=True)
    for tm, tn, wgd in ((128, 128, hm.MatmulDimension.N), (128, 64, hm.MatmulDimension.N), (64, 128, hm.MatmulDimension.M)):
        cfg = hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=4, wg_dimension=wgd, grid_tile_width=8)
        try:
            f = jax.jit(functools.partial(hm.matmul, c=None, config=cfg))
            ms = _timing.median_ms(f, a, bt, iters=20)
            print(f"stock mgpu {tm}x{tn} wg {wgd}: {ms:.3f} ms {2*m*m*k/ms/1e9:.0f} TFLOP/s", flush=True)
        except Exception as e:
            print("stock error", type(e).__name__, str(e)[:300], flush=True)
PY
timeout 150 python /tmp/check.py > $OUT/check.txt 2>&1
timeout 330 python benchmarks/bench_symmetric.py --impls wgmma --ns-products dense,wgmma --iters 10 --out $OUT/sym.json > $OUT/sym.log 2>&1
tail -30 $OUT/check.txt; grep -v "^$" $OUT/sym.log | tail -45
