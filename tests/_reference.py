"""Independent float64 NumPy references for the tests: Newton–Schulz, hand-split tiles, scaling.

Nothing here imports muonbp_jax: the coefficients are written out from their sources and tiles
are cut with plain slicing, so a bug in the package cannot hide in its own reference.
"""

from __future__ import annotations

import numpy as np

# Keller Jordan's quintic coefficients (modded-nanogpt, 2024), used at every step; optax's default.
JORDAN = (3.4445, -4.7750, 2.0315)
# Per-step table of the degree-5 Polar Express (Amsel et al. 2025, arXiv 2505.16932,
# Algorithm 1), first five steps, each divided by (1.01, 1.01³, 1.01⁵) as the paper does; the
# package's default.
POLAR_EXPRESS = np.array(
    [
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    ]
) / np.array([1.01, 1.01**3, 1.01**5])


def newton_schulz(
    x: np.ndarray, coeffs=POLAR_EXPRESS, steps: int = 5, eps: float = 1e-8
) -> np.ndarray:
    """Frobenius-normalized quintic Newton–Schulz of one matrix, in float64.

    `coeffs` is one (a, b, c) triple repeated `steps` times or a per-step table.
    """
    x = np.asarray(x, np.float64)
    table = np.asarray(coeffs, np.float64)
    table = np.tile(table, (steps, 1)) if table.ndim == 1 else table
    tall = x.shape[0] > x.shape[1]
    y = x.T if tall else x
    y = y / (np.linalg.norm(y) + eps)
    for a, b, c in table:
        gram = y @ y.T
        y = a * y + (b * gram + c * gram @ gram) @ y
    return y.T if tall else y


def rms_scale(rows: int, cols: int, consistent_rms: float | None = 0.2) -> float:
    if consistent_rms is None:
        return float(np.sqrt(max(1.0, cols / rows)))
    return consistent_rms * float(np.sqrt(max(rows, cols)))


def full_update(x: np.ndarray, consistent_rms: float | None = 0.2, **ns) -> np.ndarray:
    """What a full step makes of the momentum matrix x: NS of the whole matrix, scaled by its
    own shape."""
    return newton_schulz(x, **ns) * rms_scale(*x.shape, consistent_rms)


def split(x: np.ndarray, row_parts: int, col_parts: int) -> list[list[np.ndarray]]:
    """Cuts x into a row_parts × col_parts grid of equal tiles, by slicing."""
    h, w = x.shape[0] // row_parts, x.shape[1] // col_parts
    return [
        [x[i * h : (i + 1) * h, j * w : (j + 1) * w] for j in range(col_parts)]
        for i in range(row_parts)
    ]


def block_factor(
    shape: tuple[int, int],
    row_parts: int,
    col_parts: int,
    rule: str = "spectral",
    consistent_rms: float | None = 0.2,
) -> float:
    """The block step-size factor of a matrix of `shape` cut into row_parts × col_parts tiles:
    the full update's spectral norm over the bound on the block update's (tile scale × √tiles)
    for "spectral"; 1/√tiles, tiles^(-1/4) or 1 for "sqrt_blocks", "quarter", "none"."""
    tiles = row_parts * col_parts
    if tiles == 1 or rule == "none":
        return 1.0
    if rule == "sqrt_blocks":
        return tiles**-0.5
    if rule == "quarter":
        return tiles**-0.25
    rows, cols = shape
    tile = rms_scale(rows // row_parts, cols // col_parts, consistent_rms)
    return rms_scale(rows, cols, consistent_rms) / (tile * np.sqrt(tiles))


def block_update(
    x: np.ndarray,
    row_parts: int,
    col_parts: int,
    consistent_rms: float | None = 0.2,
    rule: str = "spectral",
    **ns,
) -> np.ndarray:
    """What a block step makes of x when each device holds one tile of a row_parts × col_parts
    grid: NS of each tile on its own, scaled by the tile's shape and the block factor of `rule`,
    put back in place."""
    tiles = split(x, row_parts, col_parts)
    factor = block_factor(x.shape, row_parts, col_parts, rule, consistent_rms)
    return factor * np.block([[full_update(t, consistent_rms, **ns) for t in row] for row in tiles])


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
