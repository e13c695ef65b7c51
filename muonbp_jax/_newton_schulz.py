"""Newton–Schulz orthogonalization: the math, with no knowledge of meshes.

`orthogonalize` maps a batch of matrices X (last two axes) to an approximation of U·Vᴴ, where
X = U·S·Vᴴ is the reduced SVD (Vᴴ = Vᵀ for real X; complex X is iterated with conjugate
transposes, as in optax). The block step, the full step and single-device use all call it
unchanged; only what they feed it differs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from muonbp_jax._symmetric import (
    Product,
    column_gram,
    hermitian_product,
    resolve_product,
    square_polynomial,
)
from muonbp_jax._symmetric import gram as _row_gram

Coeffs = str | Sequence[float] | Sequence[Sequence[float]] | np.ndarray | jax.Array
Preconditioning = Literal["frobenius", "spectral", "aol", "schatten"]
Method = Literal["auto", "newton_schulz", "gram"]

# Keller Jordan's quintic coefficients (modded-nanogpt, 2024), repeated every step.
_JORDAN = (3.4445, -4.7750, 2.0315)

# Per-step coefficients of the degree-5 Polar Express (Amsel et al. 2025, arXiv 2505.16932,
# Algorithm 1). The paper divides (a, b, c) by (s, s³, s⁵) with safety factor s = 1.01 on every
# step but the last (fixed-point) one, so that bf16 rounding cannot push a singular value past the
# polynomial's stable range; we do the same.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
POLAR_EXPRESS_SAFETY = 1.01
_POLAR_EXPRESS = tuple(
    (a / POLAR_EXPRESS_SAFETY, b / POLAR_EXPRESS_SAFETY**3, c / POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_RAW
) + ((1.875, -1.25, 0.375),)

# Per-step coefficients used by Dion (Ahn et al. 2025), as shipped by optax under "dion".
_DION = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

NS_COEFFS_PRESETS: dict[str, tuple] = {
    "jordan": _JORDAN,
    "standard": _JORDAN,  # optax's name for the same preset
    "polar_express": _POLAR_EXPRESS,
    "dion": _DION,
}
PRECONDITIONINGS: tuple[str, ...] = get_args(Preconditioning)
NS_METHODS: tuple[str, ...] = get_args(Method)
# What `method="auto"` runs on each backend. On GPUs the Gram form: it iterates in float16,
# which GPUs multiply as fast as bfloat16, and saves FLOPs on wide matrices (benchmarks/
# RESULTS.md). TPUs have no fast float16 matmul and bfloat16 is too coarse for the Gram
# recursion, so they keep the plain iteration; so do CPUs, where the fake-device meshes of tests
# and examples run and matrices are small (the Gram form was measured up to ~30% faster on wide
# CPU matrices and no faster on square ones, noise included).
AUTO_METHODS: dict[str, str] = {"gpu": "gram", "cuda": "gram", "rocm": "gram"}


def resolve_method(method: Method, platform: str | None = None) -> str:
    """The method `"auto"` stands for on `platform` (default: jax's default backend)."""
    if method != "auto":
        return method
    return AUTO_METHODS.get(platform or jax.default_backend(), "newton_schulz")


def coefficient_schedule(ns_coeffs: Coeffs, ns_steps: int) -> np.ndarray:
    """Returns the (steps, 3) float64 table of (a, b, c) used at each iteration.

    A single (a, b, c) triple is repeated `ns_steps` times. A per-step table is used as given
    when it has at most `ns_steps` rows (optax's rule), and truncated to its first `ns_steps`
    rows when it has more (so `"polar_express"` with `ns_steps=5` runs its first five steps).
    """
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_COEFFS_PRESETS:
            raise ValueError(
                f"Unknown ns_coeffs preset {ns_coeffs!r}; choose one of "
                f"{sorted(NS_COEFFS_PRESETS)} or pass (a, b, c) or a per-step table."
            )
        ns_coeffs = NS_COEFFS_PRESETS[ns_coeffs]
    table = np.asarray(ns_coeffs, dtype=np.float64)
    if table.ndim not in (1, 2) or table.shape[-1] != 3:
        raise ValueError(f"ns_coeffs must have shape (3,) or (steps, 3), got {table.shape}.")
    if int(ns_steps) < 1:
        raise ValueError(f"ns_steps must be >= 1, got {ns_steps}.")
    if table.ndim == 1:
        return np.tile(table, (int(ns_steps), 1))
    return table[: int(ns_steps)]


def _adjoint(x: jax.Array) -> jax.Array:
    """Xᴴ of the last two axes: the transpose, conjugated for complex X (a no-op for real X,
    which leaves the real computation unchanged)."""
    return jnp.conj(jnp.swapaxes(x, -1, -2))


def _abs_square(x: jax.Array) -> jax.Array:
    """|x|² elementwise, real-valued also for complex x."""
    if jnp.iscomplexobj(x):
        return jnp.square(jnp.real(x)) + jnp.square(jnp.imag(x))
    return jnp.square(x)


def _is_tall(x: jax.Array) -> bool:
    return x.shape[-2] > x.shape[-1]


def _gram(x: jax.Array, product: str) -> jax.Array:
    """The smaller Gram matrix of X: X·Xᴴ (m×m) for a wide X, Xᴴ·X (n×n) for a tall one."""
    return column_gram(x, product) if _is_tall(x) else _row_gram(x, product)


def _apply(q: jax.Array, x: jax.Array) -> jax.Array:
    """A polynomial Q of X's (smaller) Gram matrix applied on its side: Q·X for a wide X, X·Q
    for a tall one. The iteration on a tall X is the conjugate transpose of the one on Xᴴ (Q
    is Hermitian, its coefficients real), so tall matrices are iterated as they are, with no
    transposed copy."""
    return x @ q if _is_tall(x) else q @ x


def _newton_schulz_step(
    x: jax.Array, a: float, b: float, c: float, product: str = "dense"
) -> jax.Array:
    # Quintic step X ← aX + (bA + cA²)X with A = XXᴴ, for X of shape (..., m, n), m ≤ n
    # (a tall X: X ← aX + X(bA + cA²) with A = XᴴX).
    # XXᴴ and A² are Hermitian: `product` may compute them from their lower triangle.
    # A² is formed as A·Aᴴ (A is Hermitian): exactly Hermitian after rounding, so every
    # product may take it from its lower triangle (see `_symmetric.hermitian_product`).
    gram = _gram(x, product)
    return a * x + _apply(square_polynomial(gram, 0.0, b, c, product), x)


def _gram_restarts(steps: int) -> tuple[int, ...]:
    # Iterations before which the Gram form rebuilds X and XXᵀ from scratch: after 2 (the
    # schedule Zhang, Amsel, Chen and Dao 2026 use for five steps), then every 3.
    return tuple(range(2, steps, 3))


def newton_schulz_flops(m: int, n: int, steps: int, method: Method = "newton_schulz") -> int:
    """Matmul FLOPs of orthogonalizing one m×n matrix (m ≤ n) with `steps` iterations."""
    m, n = min(m, n), max(m, n)
    if method == "newton_schulz":
        return steps * (4 * m * m * n + 2 * m**3)
    restarts = _gram_restarts(steps)
    # XXᵀ at the start and Q·X at the end, plus Q·X and XXᵀ at every restart.
    rectangular = (2 + 2 * len(restarts)) * 2 * m * m * n
    square = 0
    for i in range(steps):
        opens_window = i == 0 or i in restarts
        closes_window = i == steps - 1 or i + 1 in restarts
        square += 1 + (not opens_window) + 2 * (not closes_window)
    return rectangular + square * 2 * m**3


def _uses_gram(m: int, n: int, steps: int) -> bool:
    return newton_schulz_flops(m, n, steps, "gram") < newton_schulz_flops(m, n, steps)


def _gram_newton_schulz(x: jax.Array, schedule: np.ndarray, product: str = "dense") -> jax.Array:
    """The quintic iteration of `_newton_schulz_step`, carried out on the m×m Gram matrix.

    Every iterate is X_k = Q_k·X for a polynomial Q_k of R = XXᵀ (X·Q_k and R = XᵀX for a
    tall X, see `_apply`), and p(A)·X with A = X_kX_kᵀ
    only needs A. So the m×n matrix is touched only to form R and to apply Q at the end:
    O(m³) per iteration instead of O(m²n) (Zhang, Amsel, Chen and Dao 2026, "Gram
    Newton–Schulz"). R's recursion loses accuracy in half precision (its eigenvalues are the
    squared singular values), so X and R are rebuilt at the restarts of `_gram_restarts`.

    Every m×m product here is of two polynomials of R, which commute, so it is Hermitian (as is
    XXᴴ): they go through `hermitian_product`, `gram` and `square_polynomial`, which may compute
    only the lower triangle (`_symmetric`: "dense" is the plain matmul; "wgmma" uses its kernel
    for XXᴴ and the step polynomials α·I + β·R + γ·R² only).
    """
    sym = functools.partial(hermitian_product, product=product)  # a·b, Hermitian
    gram = _gram(x, product)
    restarts, q = _gram_restarts(len(schedule)), None
    for i, (a, b, c) in enumerate(schedule):
        if i in restarts:
            x = _apply(q, x)
            gram, q = _gram(x, product), None
        poly = square_polynomial(gram, float(a), float(b), float(c), product)  # R² = R·Rᴴ
        # All iterates are polynomials of R, so Q and the step polynomial commute.
        q = poly if q is None else sym(q, poly)
        if i + 1 < len(schedule) and i + 1 not in restarts:
            gram = sym(poly, sym(gram, poly))
    return _apply(q, x)


# Frobenius norms in one pass over x, after Blue's algorithm (J. L. Blue, "A portable Fortran
# program to find the Euclidean norm of a vector", ACM TOMS 4(1), 1978): squares of float32
# overflow above ~1.8e19 and underflow below ~1e-19, so each |x|² is added to one of three sums
# by magnitude, |x| scaled by 2^∓80 outside [2^-40, 2^40]. With these bounds no sum of up to
# 2^31 finite elements overflows, and a sum that underflows when moved into a larger one's
# domain is below 2^-46 of that sum (float32 rounding is 2^-24).
_BLUE_BIG, _BLUE_SMALL, _BLUE_SCALE = 2.0**40, 2.0**-40, 80


def _frobenius_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / (‖X‖_F + eps) per matrix, at any float32 scale, reading x once for the norm.

    The result is formed in the scaled domain: with ‖X‖_F = r·2^e (e ∈ {80, 0, -80}, from the
    largest nonzero sum), x / (‖X‖_F + eps) = (x·2^-e) · 1/(r + eps·2^-e), every factor a
    normal float32 (a 1e38 gradient gives a unit-norm matrix, not inf/inf). A NaN or inf entry
    makes its whole matrix NaN (and no other matrix of the batch).
    """
    a = jnp.abs(x)  # |x|, real also for complex x
    axes = (-2, -1)

    def sum_sq(mask, scale):
        # Masked before scaling too: a large entry scaled up for the small sum would overflow,
        # and its unused inf would make the gradient NaN (0·inf). (The outer mask keeps the
        # reduction's form; with the inner one alone, CPU programs that differ elsewhere, such
        # as optax.inject_hyperparams' and the plain optimizer's, rounded the sum apart.)
        return jnp.sum(
            jnp.where(mask, jnp.square(jnp.where(mask, a, 0.0) * scale), 0.0),
            axis=axes,
            keepdims=True,
        )

    big, small = a > _BLUE_BIG, a < _BLUE_SMALL
    s_big = sum_sq(big, 2.0**-_BLUE_SCALE)  # an inf entry makes this inf
    s_mid = sum_sq(~(big | small), 1.0)  # NaN entries land here and make it NaN
    s_small = sum_sq(small, 2.0**_BLUE_SCALE)
    # Roots of sums that may be 0 (unused cases) are taken of at least the smallest normal,
    # whose root's square underflows to 0 in `down`: the values are the same, and the derivative
    # of an unused case stays finite (an infinite one would make the gradient NaN: 0·inf).
    tiny = jnp.finfo(a.dtype).tiny
    root = lambda s: jnp.sqrt(jnp.maximum(s, tiny))
    # A sum moved one domain down: its root times 2^-80, squared (2^-160 itself is no float32).
    down = lambda s: jnp.square(root(s) * 2.0**-_BLUE_SCALE)
    r_big = root(s_big + down(s_mid))
    r_mid = root(s_mid + down(s_small))
    r_small = root(s_small)
    in_big, in_mid = s_big != 0, s_mid != 0  # a NaN sum counts as nonzero: its case is chosen
    r = jnp.where(in_big, r_big, jnp.where(in_mid, r_mid, r_small))
    r = jnp.where(jnp.isinf(r), jnp.nan, r)  # only an inf entry makes a sum inf
    shift = jnp.where(in_big, 2.0**-_BLUE_SCALE, jnp.where(in_mid, 1.0, 2.0**_BLUE_SCALE))
    # Zero matrices map to zero (r is sqrt(tiny), far below eps).
    return (x * shift) * (1.0 / (r + eps * shift))


def _precondition(x: jax.Array, preconditioning: str, eps: float) -> jax.Array:
    """Scales x (float32, or complex for complex x) so that its spectral norm is at most 1.

    For complex x every norm is real-valued: max|x|, ‖X‖_F² = Σ|x|², ‖X‖₂, and the Gram forms
    use XXᴴ (Hermitian).
    """
    if preconditioning == "frobenius":
        # One read of x for the norm (the other forms first divide by max|x|, a second read).
        return _frobenius_normalize(x, eps)
    # Squares overflow float32 above ~1.8e19 (a 1e30 gradient gave a zero update) and underflow
    # below ~1e-19, so norms are taken of x / max|x| per matrix, with eps rescaled to match:
    # the result is still x / (norm(x) + eps), or x·rsqrt(max(·, eps)) for the Gram forms.
    peak = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    peak = jnp.where(peak > 0, peak, 1.0)  # zero and NaN matrices pass through as they are
    # Two divisions by sqrt(peak): XLA turns x / peak into x · (1 / peak), and 1 / peak is
    # subnormal (flushed to zero on CPU) for peak > 2**126.
    root = jnp.sqrt(peak)
    x, eps_gram, eps = x / root / root, eps / jnp.square(peak), eps / peak
    if preconditioning == "spectral":
        norm = jnp.linalg.norm(x, ord=2, axis=(-2, -1), keepdims=True)
        return x / (norm + eps)
    if preconditioning == "aol":
        # Almost-orthogonal-layer rescaling (Boissin et al. 2025, arXiv 2512.04632): scale row i
        # by 1/sqrt(Σ_j |XXᴴ|_ij), which bounds the spectral norm by 1 (for a tall X, column i
        # by the same sums of XᴴX: the rescaling of the wide Xᴴ, transposed).
        gram = _gram(x, "dense")
        sums = jnp.sum(jnp.abs(gram), axis=-2 if _is_tall(x) else -1, keepdims=True)  # symmetric
        return x * jax.lax.rsqrt(jnp.maximum(sums, eps_gram))
    if preconditioning == "schatten":
        # Schatten-4 norm ‖XXᴴ‖_F^(1/2) ≥ ‖X‖₂ (Grishina et al. 2025, arXiv 2506.10935); ‖XᴴX‖_F
        # is the same norm, from the smaller Gram matrix of a tall X.
        gram = _gram(x, "dense")
        norm = jnp.sqrt(jnp.sum(_abs_square(gram), axis=(-2, -1), keepdims=True))
        return x * jax.lax.rsqrt(jnp.maximum(norm, eps_gram))
    raise ValueError(f"Unknown preconditioning {preconditioning!r}; use one of {PRECONDITIONINGS}.")


@dataclasses.dataclass(frozen=True)
class NewtonSchulz:
    """Newton–Schulz settings, split into the two phases that `orthogonalize_many` batches.

    `prepare` normalizes one matrix in float32 and casts it to the dtype its iteration runs in;
    `iterate` runs the iteration on a batch of prepared matrices of one shape, wide or tall
    (a tall matrix is iterated on its smaller Gram matrix XᴴX, as its transpose would be, with
    no transposed copy). Preparing each matrix before same-shape matrices are concatenated
    means the concatenation copies half-precision data, not the float32 input.
    """

    schedule: tuple[tuple[float, float, float], ...]
    eps: float
    preconditioning: Preconditioning
    dtype: jnp.dtype
    method: str  # resolved: "newton_schulz" or "gram" (build with `create`)
    product: str = "dense"  # how Hermitian products are computed (`_symmetric`), resolved

    @classmethod
    def create(
        cls,
        ns_coeffs: Coeffs = "polar_express",
        ns_steps: int = 5,
        *,
        eps: float = 1e-8,
        preconditioning: Preconditioning = "frobenius",
        dtype: jnp.dtype | None = jnp.bfloat16,
        method: Method = "auto",
        platform: str | None = None,
        product: Product = "auto",
        device: jax.Device | None = None,
    ) -> NewtonSchulz:
        """`platform` and `device` are where the iteration will run (default: jax's default
        backend and its first device): they resolve `method="auto"` and `product="auto"`."""
        if method not in NS_METHODS:
            raise ValueError(f"Unknown Newton–Schulz method {method!r}; use one of {NS_METHODS}.")
        if device is not None and platform is None:
            platform = device.platform
        method = resolve_method(method, platform)
        if product == "auto" and platform not in (None, "gpu", "cuda"):
            product = "dense"  # the kernel is for GPUs: `platform` overrides the default device
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(
                f"Unknown preconditioning {preconditioning!r}; use one of {PRECONDITIONINGS}."
            )
        schedule = tuple(
            tuple(float(v) for v in row) for row in coefficient_schedule(ns_coeffs, ns_steps)
        )
        compute = jnp.dtype(jnp.float32 if dtype is None else dtype)
        if jnp.issubdtype(compute, jnp.complexfloating):
            compute = jnp.finfo(compute).dtype  # a complex dtype names its precision
        product = resolve_product(product, device)
        # eps may be traced (optax.inject_hyperparams makes float arguments arrays).
        return cls(schedule, eps, preconditioning, compute, method, product)

    def uses_gram(self, m: int, n: int) -> bool:
        """Whether a matrix of this (wide or tall) shape is iterated in the Gram form."""
        return self.method == "gram" and _uses_gram(min(m, n), max(m, n), len(self.schedule))

    def compute_dtype(self, m: int, n: int, complex_input: bool = False) -> jnp.dtype:
        if complex_input:
            # Complex has no half-precision type: every dtype below float64 means complex64.
            return jnp.dtype(jnp.complex128 if self.dtype == jnp.float64 else jnp.complex64)
        if self.uses_gram(m, n) and self.dtype == jnp.bfloat16:
            return jnp.dtype(jnp.float16)
        return self.dtype

    def prepare(self, x: jax.Array) -> jax.Array:
        """(..., m, n) normalized, in the iteration's dtype."""
        if jnp.iscomplexobj(x):
            dtype = self.compute_dtype(*x.shape[-2:], complex_input=True)
            return _precondition(x.astype(dtype), self.preconditioning, self.eps)
        y = _precondition(x.astype(jnp.float32), self.preconditioning, self.eps)
        return y.astype(self.compute_dtype(*x.shape[-2:]))

    def iterate(self, y: jax.Array) -> jax.Array:
        """The iteration on prepared matrices; returns them in the iteration's dtype."""
        schedule = np.asarray(self.schedule)
        if self.uses_gram(*y.shape[-2:]):
            return _gram_newton_schulz(y, schedule, self.product)
        step = functools.partial(_newton_schulz_step, product=self.product)
        if len(set(self.schedule)) == 1:
            a, b, c = self.schedule[0]
            return jax.lax.fori_loop(
                0, len(schedule), lambda _, z: step(z, a, b, c), y, unroll=True
            )
        for a, b, c in self.schedule:
            y = step(y, a, b, c)
        return y

    def __call__(self, x: jax.Array) -> jax.Array:
        """Orthogonalizes the last two axes of x; the result is in the iteration's dtype."""
        return self.iterate(self.prepare(x))


def orthogonalize(
    x: jax.Array,
    ns_coeffs: Coeffs = "polar_express",
    ns_steps: int = 5,
    *,
    eps: float = 1e-8,
    preconditioning: Preconditioning = "frobenius",
    dtype: jnp.dtype | None = jnp.bfloat16,
    method: Method = "auto",
    product: Product = "auto",
) -> jax.Array:
    """Approximately orthogonalizes the last two axes of `x` by Newton–Schulz iterations.

    Leading axes are batch axes: each matrix is treated independently, in one batched call.
    The input is normalized in float32, iterated in `dtype`, and returned in `x.dtype`.

    Complex input is orthogonalized with conjugate transposes (the Gram matrix is XXᴴ, norms
    are real: max|x|, Σ|x|²), so the result approximates U·Vᴴ. Complex has no half-precision
    type, so for complex `x` the iteration runs in complex64 whenever `dtype` is bfloat16,
    float16 or float32 (and in complex128 for float64); normalization is in complex64. A
    complex `dtype` names its precision: complex64 means float32 for real input.

    `method="gram"` computes the same polynomial of X (equal in exact arithmetic) by iterating
    on the smaller Gram matrix (m×m XXᴴ for m ≤ n, n×n XᴴX for a tall x), with restarts:
    fewer FLOPs when the long side is at least twice the short one (e.g. 60 vs 90 m³ for n =
    4m, five steps); matrices where it would not save FLOPs use the plain iteration. In half
    precision its iterations run in float16 even when `dtype` is bfloat16: the Gram matrix
    squares the condition number, and bfloat16's 7-bit mantissa was measured to
    push singular values of heavy-tailed matrices up to ~2 (float16: within the plain
    iteration's band, at the same matmul speed on GPUs; on TPUs prefer the plain iteration).

    Args:
      x: array of shape (..., m, n).
      ns_coeffs: a preset name (`"polar_express"`, the default; `"jordan"`/`"standard"`,
        optax's default; `"dion"`), one (a, b, c) triple used at every step, or a (steps, 3) table of per-step triples.
      ns_steps: number of iterations (see `coefficient_schedule` for per-step tables).
      eps: added to the normalizer so that a zero matrix maps to zero.
      preconditioning: how X is scaled below spectral norm 1 before iterating, as in optax.
      dtype: dtype of the matmuls (None: float32); complex input: complex64, see above.
      method: `"newton_schulz"` (iterate on X), `"gram"` (iterate on XXᴴ, see above) or
        `"auto"` (the default): `"gram"` on GPUs, `"newton_schulz"` elsewhere (TPUs, CPUs),
        for jax's default backend (`AUTO_METHODS`), decided when the function is traced.
      product: how the Gram products X·Xᵀ (and the step polynomials α·I + β·A + γ·A² of a
        Gram matrix A) are computed: `"auto"` (the default) uses a kernel that computes their
        lower tiles only, about half the FLOPs, on NVIDIA Hopper GPUs for float16/bfloat16
        iterations (`"wgmma"`, see `muonbp_jax._symmetric_wgmma`) and XLA's matmul
        (`"dense"`) everywhere else.

    Returns:
      An array like `x` whose matrices have singular values near 1 (about [0.87, 1.12] on
      Gaussian matrices for the default Polar Express, [0.7, 1.2] for Jordan's coefficients by
      design) and the singular vectors of `x`.
    """
    if x.ndim < 2:
        raise ValueError(f"orthogonalize needs an array of rank >= 2, got shape {x.shape}.")
    ns = NewtonSchulz.create(
        ns_coeffs,
        ns_steps,
        eps=eps,
        preconditioning=preconditioning,
        dtype=dtype,
        method=method,
        product=product,
    )
    return ns(x).astype(x.dtype)


def _stack(parts: Sequence[jax.Array]) -> jax.Array:
    """Same-shape (batch, m, n) parts as one array, in order, each written into its slice of one
    buffer (`dynamic_update_slice`, in place) rather than joined by `jnp.concatenate`.

    XLA fuses each part's normalization and cast into its write either way; on one H200 the
    fused concatenation ran at about 1.3 TB/s (5.1 ms of the 1.2 B tree's update); the in-place
    writes made a P=1 update 2.3–2.7 ms faster than the previous code (two interleaved
    rounds) and a block step 1.1–1.6 ms (one round; benchmarks/RESULTS.md, "eighth pass")."""
    if len(parts) == 1:
        return parts[0]
    total = sum(p.shape[0] for p in parts)
    # Every element is written below: no need to fill the buffer first (jnp.empty is documented
    # as uninitialized from jax 0.11 on platforms that support it; zeros before).
    out = jnp.empty((total, *parts[0].shape[1:]), parts[0].dtype)
    offset = 0
    for p in parts:
        out = jax.lax.dynamic_update_slice_in_dim(out, p, offset, axis=0)
        offset += p.shape[0]
    return out


def orthogonalize_many(matrices: Sequence[jax.Array], ns: NewtonSchulz) -> list[jax.Array]:
    """Orthogonalizes a list of (batch, m, n) arrays, one batched iteration per matrix shape.

    Each array is prepared on its own (normalized, cast), so what is stacked is already in
    the iteration's dtype. An m×n and an n×m group are iterated apart, each as it is, with no
    transposed copy (on one H200 the kernel's Xᵀ·X of the tree's tall matrices took 1.09 ms
    against 1.44 ms for a transposed copy and X·Xᵀ: benchmarks/RESULTS.md, "seventh pass").
    The results come back in `ns.dtype` (bfloat16 by default; Gram results computed in float16
    are rounded to it, so that every shape, and both kinds of MuonBP step, return one dtype;
    complex results stay in their complex iteration dtype): the caller casts further where the
    cast can fuse with what follows.
    """
    prepared = [ns.prepare(m) for m in matrices]
    groups: dict[tuple[int, int, jnp.dtype], list[int]] = {}
    for i, y in enumerate(prepared):
        groups.setdefault((*y.shape[-2:], y.dtype), []).append(i)
    out: list[jax.Array | None] = [None] * len(prepared)
    for members in groups.values():
        parts = [prepared[i] for i in members]
        result = ns.iterate(_stack(parts))
        if not jnp.iscomplexobj(result):  # complex has no half precision: stays complex64
            result = result.astype(ns.dtype)
        offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        for i, lo, hi in zip(members, offsets[:-1], offsets[1:]):
            out[i] = result if len(parts) == 1 else result[lo:hi]
    return out
