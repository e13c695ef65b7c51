"""What each MuonBP update did: step kind, step size, update norms, Newton–Schulz quality.

Opt-in (`diagnostics=True` or `Diagnostics(...)` in `scale_by_muonbp`/`muonbp`): the state of
`scale_by_muonbp` then carries a `MuonBPDiagnostics` under the field `diagnostics`, read with
`optax.tree.get(opt_state, "diagnostics")`, and `scale_by_step_learning_rate` records the rate it
applied (`learning_rate`); `read_diagnostics(opt_state)` flattens both into a dict of scalars.

What is measured, per matrix leaf, on the update U = s·O of the paper (O the Newton–Schulz
output: the whole matrix on full steps, one per block on block steps; s the shape scale of what
was orthogonalized), so that the parameter moves by −learning_rate·U (plus weight decay):

* the update's RMS (exact) and spectral norm ‖U‖₂ (of the whole matrix, max over the leaf's
  matrices), and the block spectral norm max_b ‖U_b‖₂ over the blocks that were orthogonalized
  (the norm of the paper's analysis for block steps; equal to ‖U‖₂ on full steps);
* σ_max and σ_min of O over the pieces that were orthogonalized: both 1 for an exactly
  orthogonal O (semi-orthogonal for rectangular matrices, on its smaller side);
* the block step-size factor ρ that the step used (1 on full steps) and the Frobenius norm of
  the momentum.

Extreme singular values come from a few Lanczos iterations on the Gram matrix of the smaller
side (Golub & Van Loan, "Matrix Computations", 4th ed., §10.1), in float32, from a fixed start
vector, with full reorthogonalization: each iteration is one product with the Gram matrix (two
matrix-vector products with the matrix, as a power iteration), and its Ritz values bracket the
spectrum from inside, so σ_max is never overestimated and σ_min never underestimated; a few
iterations find σ_max well (a Krylov space beats a power iteration of the same length) and
σ_min more roughly.

Communication: block statistics are per block, inside `jax.shard_map`, combined by one
all-reduce (max) of four floats per leaf; norms by scalar all-reduces. The whole matrix's
spectral norm of a leaf whose matrix axes the mesh cuts needs, per Lanczos iteration, an
all-reduce of a float32 vector of the local side length: on full steps always (they communicate
anyway), on block steps only with `Diagnostics(whole_norm_on_block_steps=True)`; otherwise those
leaves report NaN for `update_spectral` on block steps and block steps keep to scalar
all-reduces.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from muonbp_jax._layout import Layout, Mesh, to_matrices, to_stack, to_tiles
from muonbp_jax._options import path_names, path_str

DEFAULT_ITERATIONS = 5
DEFAULT_EVERY = 100
_START_KEY = 0  # the fixed key of every start vector


@dataclasses.dataclass(frozen=True, kw_only=True)
class Diagnostics:
    """What `diagnostics=` of `scale_by_muonbp`/`muonbp` records (keyword arguments only).

    Attributes:
      every: measure the first full step and the first block step of every window of `every`
        updates (updates 0, every, 2·every, … open the windows); the other updates carry the
        last measurement of their kind. 1 measures every update. In a periodic MuonBP an
        update that is not measured runs the same branch of the step switch as without
        diagnostics (the switch has four branches); with a fixed kind (`period` 1 or None, or
        `full_step=` given) one `lax.cond` of its own skips the measurement.
        benchmarks/RESULTS.md has the costs.
      per_leaf: also record every leaf's values (a tree like the updates), not only the mean,
        max and min over leaves.
      iterations: Lanczos iterations per singular-value estimate (matrix-vector products with
        the Gram matrix); more is more accurate and costs two passes over the update each.
      whole_norm_on_block_steps: on block steps, compute the whole update's spectral norm also
        for leaves whose matrix axes the mesh cuts, with one vector all-reduce per iteration;
        False keeps block steps to scalar all-reduces (those leaves then report NaN).
    """

    every: int = DEFAULT_EVERY
    per_leaf: bool = False
    iterations: int = DEFAULT_ITERATIONS
    whole_norm_on_block_steps: bool = False


DiagnosticsOption = bool | str | Diagnostics | None


def resolve(option: DiagnosticsOption) -> Diagnostics | None:
    """`diagnostics=` as a `Diagnostics` (None when off): False/None, True, "per_leaf", or a
    `Diagnostics`."""
    if option is None or option is False:
        return None
    if option is True:
        return Diagnostics()
    if isinstance(option, str) and option == "per_leaf":
        return Diagnostics(per_leaf=True)
    if isinstance(option, Diagnostics):
        for name in ("iterations", "every"):
            value = getattr(option, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Diagnostics.{name} must be an int >= 1, got {value!r}.")
        return option
    raise ValueError(
        f"diagnostics must be False, True, 'per_leaf' or a muonbp_jax.Diagnostics, got {option!r}."
    )


class LeafDiagnostics(NamedTuple):
    """Float32 scalars describing one matrix leaf's update (or their mean, max or min over the
    Muon leaves). U = s·O is the update before the learning rate (see the module docstring)."""

    block_factor: jax.Array  # ρ used by this step (1 on full steps)
    update_rms: jax.Array  # RMS of U
    update_spectral: jax.Array  # ‖U‖₂ of the whole matrix (max over the leaf's matrices)
    block_spectral: jax.Array  # max over orthogonalized pieces of ‖U_piece‖₂
    ns_sigma_max: jax.Array  # largest singular value of O over the pieces (1: orthogonal)
    ns_sigma_min: jax.Array  # smallest singular value of O (smaller side) over the pieces
    momentum_norm: jax.Array  # Frobenius norm of the momentum


class StepRecord(NamedTuple):
    """The last measured update of one kind (full or block steps)."""

    step: jax.Array  # int32: its 0-based update index; -1 before the first (values NaN)
    mean: LeafDiagnostics  # over the Muon leaves
    max: LeafDiagnostics
    min: LeafDiagnostics
    per_leaf: Any  # a tree like the updates with a LeafDiagnostics per leaf, or None


class MuonBPDiagnostics(NamedTuple):
    """The `diagnostics` field of `MuonBPState`."""

    full_step: jax.Array  # float32: 1 if the last update was a full step, 0 for a block step
    step_factor: jax.Array  # float32 (3,): mean, max, min over leaves of its ρ (1: full step)
    full: StepRecord  # the last measured full step
    block: StepRecord  # the last measured block step


def _unmeasured() -> LeafDiagnostics:
    return LeafDiagnostics(*(jnp.full([], jnp.nan, jnp.float32) for _ in LeafDiagnostics._fields))


def initial(config: Diagnostics, treedef: Any, count: int) -> MuonBPDiagnostics:
    """The diagnostics before the first update (no step measured: step -1, values NaN), with
    the structure updates produce."""

    def record():
        per_leaf = None
        if config.per_leaf:
            per_leaf = jax.tree.unflatten(treedef, [_unmeasured() for _ in range(count)])
        step = jnp.full([], -1, jnp.int32)
        return StepRecord(step, _unmeasured(), _unmeasured(), _unmeasured(), per_leaf)

    return MuonBPDiagnostics(
        jnp.zeros([], jnp.float32), jnp.ones([3], jnp.float32), record(), record()
    )


# ----------------------------------------------------------------------------- Lanczos


def lanczos_extremes(
    gram: Callable[[jax.Array], jax.Array],
    dot: Callable[[jax.Array, jax.Array], jax.Array],
    start: jax.Array,
    iterations: int,
) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest Ritz values of a symmetric PSD operator after `iterations` steps.

    `gram(q)` applies the operator to a batch of vectors (..., d); `dot(a, b)` is the inner
    product over the last axis (all of it: a distributed caller sums over devices), shaped
    (...). Both Ritz values lie in [λ_min, λ_max]. Full reorthogonalization (classical
    Gram–Schmidt, applied twice) keeps float32 Lanczos stable at these lengths; an invariant
    subspace found early (the residual vanishes, e.g. for an exactly orthogonal matrix) ends the
    recurrence, the remaining diagonal entries repeat a Ritz value already found.
    """
    start = start.astype(jnp.float32)
    batch, k = start.shape[:-1], iterations
    q0 = start * jax.lax.rsqrt(jnp.maximum(dot(start, start), 1e-30))[..., None]
    basis = jnp.zeros((*batch, k + 1, start.shape[-1]), jnp.float32).at[..., 0, :].set(q0)
    zeros = jnp.zeros((*batch, k), jnp.float32)

    def step(j, carry):
        basis, alphas, betas, alive, tol = carry
        q = basis[..., j, :]
        w = gram(q)
        alpha = dot(q, w)
        tol = jnp.where(j == 0, 1e-4 * jnp.abs(alpha), tol)
        for _ in range(2):  # rows not yet filled are zero and remove nothing
            w = w - jnp.einsum("...j,...jd->...d", dot(basis, w[..., None, :]), basis)
        beta = jnp.sqrt(jnp.maximum(dot(w, w), 0.0))
        # Once the residual vanishes, later diagonal entries repeat the first Ritz value.
        alpha = jnp.where(alive, alpha, alphas[..., 0])
        alive = alive & (beta > tol)
        nxt = jnp.where(alive[..., None], w / jnp.where(alive, beta, 1.0)[..., None], 0.0)
        return (
            basis.at[..., j + 1, :].set(nxt),
            alphas.at[..., j].set(alpha),
            betas.at[..., j].set(jnp.where(alive, beta, 0.0)),
            alive,
            tol,
        )

    carry = (basis, zeros, zeros, jnp.ones(batch, bool), jnp.zeros(batch, jnp.float32))
    _, alphas, betas, _, _ = jax.lax.fori_loop(0, k, step, carry)
    upper = jnp.eye(k, k, 1, dtype=jnp.float32)
    band = betas.at[..., k - 1].set(0.0)[..., :, None] * upper  # β_j at (j, j+1)
    tri = alphas[..., :, None] * jnp.eye(k, dtype=jnp.float32) + band + jnp.swapaxes(band, -1, -2)
    ritz = jnp.linalg.eigvalsh(tri)
    return jnp.maximum(ritz[..., 0], 0.0), jnp.maximum(ritz[..., -1], 0.0)


def _start(shape: tuple[int, ...], position: jax.Array | int = 0) -> jax.Array:
    """A fixed pseudo-random start vector; `position` tells the devices' slices apart."""
    key = jax.random.fold_in(jax.random.key(_START_KEY), position)
    return jax.random.normal(key, shape, jnp.float32)


def _real(m: jax.Array) -> jax.Array:
    """Real matrices with the singular values of `m` (..., a, b): a real one as it is (in its
    own dtype: the products cast it to float32 as they read it), a complex one as its real
    form [[Re, −Im], [Im, Re]] in float32 (2a×2b, every singular value twice). Blocks of it
    stay blocks: the real forms of a partition of rows and columns partition the real
    form's."""
    if not jnp.iscomplexobj(m):
        return m
    re, im = jnp.real(m).astype(jnp.float32), jnp.imag(m).astype(jnp.float32)
    return jnp.concatenate([jnp.concatenate([re, -im], -1), jnp.concatenate([im, re], -1)], -2)


def _abs2_sum(x: jax.Array) -> jax.Array:
    """Σ|x|² in float32 (also for complex x)."""
    if jnp.iscomplexobj(x):
        x = jnp.abs(x)
    return jnp.sum(jnp.square(x.astype(jnp.float32)))


def _local_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b, axis=-1)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def _union(entries: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(a for e in entries for a in e)


def _matvec(m: jax.Array, u: jax.Array) -> jax.Array:
    """m (..., a, b) times u (..., b) in float32, read in m's own dtype: a multiply and a sum,
    which XLA fuses into one pass over m (no float32 copy of a half-precision m)."""
    return jnp.sum(m.astype(jnp.float32) * u[..., None, :], axis=-1)


def _rmatvec(m: jax.Array, u: jax.Array) -> jax.Array:
    """mᵀ (..., b, a) times u (..., a), as `_matvec`."""
    return jnp.sum(m.astype(jnp.float32) * u[..., :, None], axis=-2)


def _extremes(
    m: jax.Array, row_axes: tuple[str, ...], col_axes: tuple[str, ...], iterations: int
) -> tuple[jax.Array, jax.Array]:
    """(σ_min, σ_max) of each matrix of `m` (batch, a, b) with a ≤ b, whose rows are split over
    the mesh axes `row_axes` and columns over `col_axes` (inside `jax.shard_map`; both empty:
    local matrices). Lanczos runs on the a-side Gram matrix m·mᵀ."""

    def gram(u):
        w = _psum(_rmatvec(m, u), row_axes)
        return _psum(_matvec(m, w), col_axes)

    dot = lambda a, b: _psum(_local_dot(a, b), row_axes)
    position = jax.lax.axis_index(row_axes) if row_axes else 0
    start = jnp.broadcast_to(_start(m.shape[-2:-1], position), m.shape[:-1])
    low, high = lanczos_extremes(gram, dot, start, iterations)
    return jnp.sqrt(low), jnp.sqrt(high)


def _batched(
    items: Sequence[tuple[jax.Array, tuple[str, ...], tuple[str, ...]]], iterations: int
) -> list[tuple[jax.Array, jax.Array]]:
    """`_extremes` of many (matrices (n, a, b), row_axes, col_axes), one Lanczos run per group
    of equal (a, b, dtype, axes): same-shape leaves (the layers of a model) share every kernel
    of the recurrence, as they share Newton–Schulz iterations."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (m, rows, cols) in enumerate(items):
        groups.setdefault((*m.shape[1:], m.dtype, rows, cols), []).append(i)
    out: list[Any] = [None] * len(items)
    for (_, _, _, rows, cols), members in groups.items():
        parts = [items[i][0] for i in members]
        low, high = _extremes(
            jnp.concatenate(parts) if len(parts) > 1 else parts[0], rows, cols, iterations
        )
        offsets = np.cumsum([0] + [p.shape[0] for p in parts])
        for i, lo, hi in zip(members, offsets[:-1], offsets[1:]):
            out[i] = (low[lo:hi], high[lo:hi])
    return out


def _wide(m: jax.Array, rows: tuple[str, ...], cols: tuple[str, ...], tall: bool):
    """(m, row_axes, col_axes) oriented so that Lanczos iterates on the smaller side."""
    return (jnp.swapaxes(m, -1, -2), cols, rows) if tall else (m, rows, cols)


def piece_extremes(m: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
    """(σ_min, σ_max) of each matrix of `m` (..., a, b), on its smaller side; no communication."""
    m = _real(m)
    lead = m.shape[:-2]
    m = m.reshape(-1, *m.shape[-2:])
    low, high = _batched([_wide(m, (), (), m.shape[-2] > m.shape[-1])], iterations)[0]
    return low.reshape(lead), high.reshape(lead)


def _whole_item(m: jax.Array, lay: Layout, on_mesh: bool):
    cuts = lay.cuts if on_mesh else tuple(() for _ in lay.matrix_axes)
    rows = _union(cuts[: len(lay.reduction_axes)])
    cols = _union(cuts[len(lay.reduction_axes) :])
    # Iterate on the smaller side of the whole matrix (not of the local block).
    return _wide(_real(m), rows, cols, lay.matrix_shape[0] > lay.matrix_shape[1])


def _piece_item(tiles: jax.Array):
    tiles = _real(tiles)
    return _wide(tiles, (), (), tiles.shape[-2] > tiles.shape[-1])


class _Sigmas(NamedTuple):
    """Per leaf (shape (L,)): σ_max of the whole O, and σ_max, σ_min of O over the pieces that
    were orthogonalized."""

    whole_max: jax.Array
    piece_max: jax.Array
    piece_min: jax.Array


def _sigmas(
    orthogonal: list[jax.Array],
    layouts: list[Layout],
    mesh: Mesh | None,
    config: Diagnostics,
    full: bool,
) -> _Sigmas:
    """The singular values of one kind of step, computed per device and combined by one max
    all-reduce (minima enter negated)."""
    iterations = config.iterations
    on_mesh = mesh is not None and any(lay.spec is not None for lay in layouts)
    # Which leaves get the whole matrix's σ: all on full steps; on block steps those that need
    # no vector all-reduce for it (no mesh axis cuts their matrices), or all when asked.
    whole = [
        full or config.whole_norm_on_block_steps or not (on_mesh and any(lay.cuts))
        for lay in layouts
    ]

    def local(xs):
        mats = [to_matrices(to_stack(x, lay), lay) for x, lay in zip(xs, layouts)]
        wanted = [i for i, w in enumerate(whole) if w]
        whole_found = dict(
            zip(
                wanted,
                _batched([_whole_item(mats[i], layouts[i], on_mesh) for i in wanted], iterations),
            )
        )
        if full:
            pieces = [whole_found[i] for i in range(len(mats))]
        else:
            pieces = _batched(
                [_piece_item(to_tiles(m, lay.grid)) for m, lay in zip(mats, layouts)], iterations
            )
        # A leaf without the whole σ reports 0 here and NaN below (a max all-reduce drops NaN).
        highs = [jnp.max(whole_found[i][1]) if i in whole_found else 0.0 for i in range(len(mats))]
        packed = jnp.stack(
            [
                jnp.stack([jnp.asarray(h, jnp.float32) for h in highs]),
                jnp.stack([jnp.max(high) for _, high in pieces]),
                -jnp.stack([jnp.min(low) for low, _ in pieces]),
            ]
        )
        if on_mesh:
            packed = jax.lax.pmax(packed, tuple(mesh.axis_names))
        return packed

    if on_mesh:
        specs = [P(*lay.spec) if lay.spec is not None else P() for lay in layouts]
        packed = jax.shard_map(local, mesh=mesh, in_specs=(specs,), out_specs=P(), check_vma=False)(
            orthogonal
        )
    else:
        packed = local(orthogonal)
    whole_max = jnp.where(np.asarray(whole), packed[0], jnp.nan)
    return _Sigmas(whole_max, packed[1], -packed[2])


# ----------------------------------------------------------------------------- recording


class Statics(NamedTuple):
    """Per-leaf constants of one kind of step: the shape scale s (times |⟨M, O⟩| with
    `adaptive=True`, then traced) and the block factor ρ (1 on full steps)."""

    scales: Sequence[Any]
    factors: Sequence[float]


def measure(
    config: Diagnostics,
    full: bool,
    step: jax.Array,
    orthogonal: list[jax.Array],
    momentum: list[jax.Array],
    statics: Statics,
    layouts: list[Layout],
    mesh: Mesh | None,
    treedef: Any,
) -> StepRecord:
    """The record of update `step`, a full or a block step."""
    sigmas = _sigmas(orthogonal, layouts, mesh, config, full)
    f32 = lambda v: jnp.stack([jnp.asarray(x, jnp.float32) for x in v])
    scale = f32(statics.scales)
    size = f32([int(np.prod(o.shape)) for o in orthogonal])
    fro = jnp.sqrt(jnp.stack([_abs2_sum(o) for o in orthogonal]))
    leaves = LeafDiagnostics(
        block_factor=f32(statics.factors),
        update_rms=scale * fro / jnp.sqrt(size),
        update_spectral=scale * sigmas.whole_max,
        block_spectral=scale * sigmas.piece_max,
        ns_sigma_max=sigmas.piece_max,
        ns_sigma_min=sigmas.piece_min,
        momentum_norm=jnp.sqrt(jnp.stack([_abs2_sum(m) for m in momentum])),
    )
    per_leaf = None
    if config.per_leaf:
        per_leaf = jax.tree.unflatten(
            treedef,
            [LeafDiagnostics(*(v[i] for v in leaves)) for i in range(len(orthogonal))],
        )
    over = lambda fn: LeafDiagnostics(*(fn(v) for v in leaves))
    return StepRecord(
        step=jnp.asarray(step, jnp.int32),
        mean=over(jnp.mean),
        max=over(jnp.max),
        min=over(jnp.min),
        per_leaf=per_leaf,
    )


def due(record: StepRecord, step: jax.Array, every: int) -> jax.Array:
    """Whether update `step` is the first of its kind in its window of `every` updates (the
    kind whose last measurement is `record`)."""
    return (record.step < 0) | (record.step // every < step // every)


def _with_record(previous: MuonBPDiagnostics, full: bool, record: StepRecord):
    """(full record, block record) of `previous` with one kind's replaced."""
    return (record, previous.block) if full else (previous.full, record)


def step_and_measure(
    config: Diagnostics,
    previous: MuonBPDiagnostics,
    step: jax.Array,
    is_full: jax.Array | bool,
    branches: dict[bool, Callable[[Any], list[jax.Array]]],
    operands: tuple[list[jax.Array], list[jax.Array]],
    measure: Callable[[bool, list[jax.Array], Any], StepRecord],
    statics: tuple[Statics, Statics],
    *,
    reads_gradient: bool,
) -> tuple[list[jax.Array], MuonBPDiagnostics]:
    """Runs the step of kind `is_full` (`branches[kind](operands)`: its Newton–Schulz outputs)
    and measures it when it is due; returns the outputs and the diagnostics after it.

    `operands` is (momentum, gradient); `measure(kind, outputs, operands)` makes the record of
    this update; `statics` are the (full, block) per-leaf constants. A traced kind picks its
    step and whether to measure in one `lax.switch` of four branches (block, block+measure,
    full, full+measure), so an update that is not measured runs the branch it runs without
    diagnostics and no second conditional; a fixed kind runs its step, then one `lax.cond`
    measures or keeps the record. `every=1` needs neither choice.
    """
    every = config.every
    keep = (previous.full, previous.block)

    def measured(kind):
        def run(ops):
            out = branches[kind](ops)
            return out, _with_record(previous, kind, measure(kind, out, ops))

        return run

    if isinstance(is_full, bool):
        if every == 1:
            out, records = measured(is_full)(operands)
        else:
            out = branches[is_full](operands)
            # What the measurement reads: the gradient only if `reads_gradient`.
            reads = operands if reads_gradient else (operands[0], None)
            records = jax.lax.cond(
                due(previous.full if is_full else previous.block, step, every),
                lambda x: _with_record(previous, is_full, measure(is_full, *x)),
                lambda x: keep,
                (out, reads),
            )
    elif every == 1:
        out, records = jax.lax.cond(is_full, measured(True), measured(False), operands)
    else:
        skipped = lambda kind: lambda ops: (branches[kind](ops), keep)
        due_full = due(previous.full, step, every)
        due_block = due(previous.block, step, every).astype(jnp.int32)
        index = jnp.where(is_full, 2 + due_full, due_block)
        out, records = jax.lax.switch(
            index, [skipped(False), measured(False), skipped(True), measured(True)], operands
        )
    return out, finish(records, is_full, *statics)


def finish(
    records: tuple[StepRecord, StepRecord],
    is_full: jax.Array | bool,
    full: Statics,
    block: Statics,
) -> MuonBPDiagnostics:
    """The diagnostics after an update: its kind and block factors, and the two records."""
    factors = lambda s: jnp.stack([jnp.asarray(f, jnp.float32) for f in s.factors])
    rho = jnp.where(is_full, factors(full), factors(block))
    return MuonBPDiagnostics(
        full_step=jnp.asarray(is_full, jnp.float32),
        step_factor=jnp.stack([jnp.mean(rho), jnp.max(rho), jnp.min(rho)]),
        full=records[0],
        block=records[1],
    )


# ----------------------------------------------------------------------------- reading


def _unwrap(node: Any, cls: type) -> Any:
    """`node` if it is a `cls`; the value of a wrapper holding one (nnx.Optimizer wraps the
    state entries that mirror a parameter, here a leaf's LeafDiagnostics, in a variable)."""
    if isinstance(node, cls):
        return node
    if not isinstance(node, tuple) and hasattr(node, "get_value"):
        value = node.get_value()
        if isinstance(value, cls):
            return value
        # flax 0.12 holds the entries as a plain tuple at init, as a mapping after an update.
        if cls is LeafDiagnostics and isinstance(value, tuple) and len(value) == len(cls._fields):
            return cls(*value)
        keys = getattr(value, "keys", None)
        if cls is LeafDiagnostics and keys is not None and set(keys()) == set(cls._fields):
            return cls(**{k: value[k] for k in cls._fields})
    return None


def _named(tree: Any, cls: type) -> list[tuple[tuple[str, ...], Any]]:
    found = []

    def visit(path, node):
        unwrapped = _unwrap(node, cls)
        if unwrapped is not None:
            found.append((path, unwrapped))

    jax.tree_util.tree_map_with_path(visit, tree, is_leaf=lambda x: _unwrap(x, cls) is not None)
    return found


def _value(x: Any) -> Any:
    """An array held in a state entry (nnx.Optimizer may wrap it in a variable)."""
    return x.get_value() if hasattr(x, "get_value") else x


def read_diagnostics(opt_state: Any, *, per_leaf: bool = True) -> dict[str, jax.Array]:
    """The diagnostics in `opt_state` as a flat dict of scalars, ready for a logger.

    Keys, for the last update: `full_step` (1 full, 0 block); `learning_rate` (the rate that
    `scale_by_step_learning_rate` applied, when it records it: `muonbp(..., diagnostics=...)`
    does) and `learning_rate_mean`/`_max`/`_min`, that rate times each leaf's block factor ρ
    (what each leaf moved by). For the last measured full step and block step (see
    `Diagnostics.every`): `full/step` and `block/step` (the update index measured; -1 before
    the first, whose values are NaN), `full/<field>_mean`, `_max`, `_min` for every
    `LeafDiagnostics` field, the same under `block/`, and, when recorded and `per_leaf`,
    `full/<leaf path>/<field>` and `block/<leaf path>/<field>`. Raises ValueError when
    `opt_state` holds no diagnostics or several.
    """
    found = _named(opt_state, MuonBPDiagnostics)
    if len(found) != 1:
        raise ValueError(
            f"opt_state holds {len(found)} MuonBPDiagnostics; build the optimizer with "
            "diagnostics=True (one scale_by_muonbp per optimizer state)."
        )
    diag = found[0][1]
    out: dict[str, jax.Array] = {"full_step": _value(diag.full_step)}
    rate = _recorded_rate(opt_state)
    if rate is not None:
        rate = _value(rate)
        out["learning_rate"] = rate
        factors = _value(diag.step_factor)
        for i, stat in enumerate(("mean", "max", "min")):
            out[f"learning_rate_{stat}"] = rate * factors[i]
    for kind in ("full", "block"):
        record = _unwrap(getattr(diag, kind), StepRecord) or getattr(diag, kind)
        out[f"{kind}/step"] = _value(record.step)
        for stat in ("mean", "max", "min"):
            leaf = _unwrap(getattr(record, stat), LeafDiagnostics) or getattr(record, stat)
            for name, value in leaf._asdict().items():
                out[f"{kind}/{name}_{stat}"] = _value(value)
        if per_leaf and record.per_leaf is not None:
            for path, leaf in _named(record.per_leaf, LeafDiagnostics):
                names = path_str(path_names(path))
                for name, value in leaf._asdict().items():
                    out[f"{kind}/{names}/{name}"] = _value(value)
    return out


def _recorded_rate(opt_state: Any) -> jax.Array | None:
    from muonbp_jax._muonbp import ScaleByStepLearningRateState

    rates = [
        s.learning_rate
        for _, s in _named(opt_state, ScaleByStepLearningRateState)
        if getattr(s, "learning_rate", None) is not None
    ]
    return rates[0] if len(rates) == 1 else None
