"""The cost model's counts against hand-computed figures on tiny shapes.

The cost model reads muonbp_jax's own layouts, exchange groups and Newton–Schulz FLOP count on
abstract shapes; every expected number here is counted by hand or by running the iteration in
NumPy, so these tests check the library's planning as well as the model built on it."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cost_model.py"
_spec = importlib.util.spec_from_file_location("cost_model", _PATH)
cm = importlib.util.module_from_spec(_spec)
sys.modules["cost_model"] = cm  # dataclasses look their module up there
_spec.loader.exec_module(cm)

# d=8, ffn=16, 1 layer, 2 heads of 4, 1 kv head, vocab 32: q, o 8x8; k, v 8x4; gate, up 8x16;
# down 16x8.
TINY = cm.Model("t", d=8, ffn=16, layers=1, heads=2, kv_heads=1, vocab=32)


def _ns5_by_matmuls(rows: int, cols: int) -> int:
    """FLOPs of 5 Newton–Schulz steps, counted by running the iteration with NumPy and adding
    2·m·k·n for every matmul actually performed."""
    x = np.ones((rows, cols)) / (rows * cols)
    if rows > cols:
        x = x.T
    flops = 0

    def mm(a, b):
        nonlocal flops
        flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return a @ b

    for _ in range(5):
        gram = mm(x, x.T)
        x = 3.4445 * x + mm(-4.7750 * gram + 2.0315 * mm(gram, gram), x)
    return flops


@pytest.mark.parametrize("shape", [(8, 8), (8, 16), (16, 8), (3, 7)])
def test_ns_flops_match_counted_matmuls(shape):
    assert cm.ns_flops(*shape) == _ns5_by_matmuls(*shape)


def test_ns_flops_formula_by_hand():
    # 5·(4m²n + 2m³) with m=4 (short side), n=8: 5·(512 + 128) = 3200.
    assert cm.ns_flops(8, 4) == 3200


def _tiles(tp: int) -> dict[str, tuple[int, int]]:
    """Megatron tiles of TINY under tp-way TP, by hand: q,k,v,gate,up split on columns."""
    return {
        "q": (8, 8 // tp),
        "k": (8, 4 // tp),
        "v": (8, 4 // tp),
        "o": (8 // tp, 8),
        "gate": (8, 16 // tp),
        "up": (8, 16 // tp),
        "down": (16 // tp, 8),
    }


def _ns(shape):
    a, b = sorted(shape)
    return 5 * (4 * a * a * b + 2 * a**3)


def test_block_step_flops_are_sum_over_local_tiles():
    mesh = cm.MeshShape(tp=2)
    expected = sum(_ns(t) for t in _tiles(2).values())
    assert cm.block_step(TINY, mesh).ns_flops == expected
    assert cm.block_step(TINY, mesh).link_bytes == 0


def test_full_gather_counts_every_whole_matrix_and_its_missing_shards():
    mesh = cm.MeshShape(tp=4)
    cost = cm.full_step(TINY, mesh, "gather")
    whole = _tiles(1)
    assert cost.ns_flops == sum(_ns(t) for t in whole.values())
    elems = sum(r * c for r, c in whole.values())  # 64+32+32+64+128+128+128 = 576
    assert elems == 576
    assert cost.link_bytes == 576 * 3 // 4 * 4  # float32, 3/4 of each matrix received
    # One all-gather per group of same-shape matrices cut alike: q; k+v; o; gate+up; down.
    assert cost.collectives == 5


def test_full_all_to_all_spreads_groups_with_padding():
    mesh = cm.MeshShape(tp=4)
    cost = cm.full_step(TINY, mesh, "all_to_all")
    # Exchange groups (same shape, same cut): q; k+v; o; gate+up; down. Each has at most 4
    # matrices, so after padding to 4 every device orthogonalizes one whole matrix per group.
    assert cost.ns_flops == 2 * _ns((8, 8)) + _ns((8, 4)) + 2 * _ns((8, 16))
    # Per group, each device sends one tile (a quarter matrix) to each of the 3 others and gets
    # as many back: 2 · 3 · size/4 floats.
    sizes = [64, 32, 64, 128, 128]
    assert cost.link_bytes == sum(2 * 3 * (size // 4) * 4 for size in sizes)
    assert cost.collectives == 2  # every tile is cut by the same (tp) axis
    # It never does more Newton–Schulz work than the gather (redundant) full step.
    assert cost.ns_flops < cm.full_step(TINY, mesh, "gather").ns_flops


def test_full_auto_gathers_lone_matrices():
    mesh = cm.MeshShape(tp=4)
    cost = cm.full_step(TINY, mesh, "auto")
    # q, o and down are alone in their groups: gathered (3/4 of each received); k+v and
    # gate+up are exchanged.
    gathered = (64 + 64 + 128) * 3 // 4 * 4
    exchanged = 2 * 3 * (32 // 4) * 4 + 2 * 3 * (128 // 4) * 4
    assert cost.link_bytes == gathered + exchanged
    assert cost.collectives == 3 + 2


def test_fsdp_splits_the_other_dimension():
    mesh = cm.MeshShape(tp=2, fsdp=2)
    q = cm.Matrix("q", 8, 8, 1, "column")
    down = cm.Matrix("down", 16, 8, 1, "row")
    assert mesh.tile(q) == (4, 4)
    assert mesh.tile(down) == (8, 4)


def test_fsdp_all_to_all_needs_one_exchange_per_axis_order():
    # Column-parallel tiles are cut by (fsdp, tp), row-parallel ones by (tp, fsdp): two sets of
    # mesh axes, one all-to-all there and one back for each.
    cost = cm.full_step(TINY, cm.MeshShape(tp=2, fsdp=2), "all_to_all")
    assert cost.collectives == 4


def test_one_device_block_grid_gives_the_tp_tiles():
    # block_grid emulation of tp=2 on one device: the device orthogonalizes both tiles of every
    # matrix (the block step of tp=2, twice), and moves nothing.
    cost = cm.block_step(TINY, cm.MeshShape(1, 1, 1), tp_blocks=2)
    assert cost.ns_flops == 2 * sum(_ns(t) for t in _tiles(2).values())
    assert cost.link_bytes == 0


def test_indivisible_tile_raises():
    with pytest.raises(ValueError, match="not divisible"):
        cm.MeshShape(tp=3).tile(cm.Matrix("q", 8, 8, 1, "column"))


def test_adamw_bytes_for_known_layout():
    mesh = cm.MeshShape(tp=2)
    # matrices 576 + embedding/head 2·32·8 = 512, both split in 2; norms 3·8 replicated.
    local = (576 + 512) // 2 + 24
    assert cm.adamw_step(TINY, mesh).elementwise_bytes == local * 28
    assert TINY.params() == 576 + 512 + 24


def test_amortized_and_break_even_period():
    assert cm.amortized(1.0, 6.0, 5) == pytest.approx(2.0)
    assert cm.amortized(1.0, 6.0, None) == 1.0
    # ((P-1)·1 + 6)/P <= 1.5  <=>  P >= 10
    assert cm.break_even_period(1.0, 6.0, 1.5) == 10
    assert cm.amortized(1.0, 6.0, 10) <= 1.5 < cm.amortized(1.0, 6.0, 9)
    assert cm.break_even_period(2.0, 6.0, 1.5) is None  # the block step alone is too slow
    assert cm.break_even_period(1.0, 1.2, 1.5) == 1


def test_roofline_picks_the_slower_bound():
    hw = cm.Hardware("h", matmul=1e12, peak=1e12, hbm=1e9, link=1e9)
    cost = cm.StepCost("x", [])
    cost.add_groups([cm.Group(64, 64, 1)], 5, 2)
    flops_t = _ns((64, 64)) / 1e12
    bytes_t = cm.ns_hbm_bytes(64, 64) / 1e9
    assert cm.ns_time(cost, hw) == pytest.approx(max(flops_t, bytes_t))
    assert bytes_t > flops_t  # at this size memory dominates


def test_cli_writes_tables(tmp_path, capsys):
    cm.main(["--models", "1b", "--hardware", "h100", "--tp", "4", "--out", str(tmp_path)])
    text = (tmp_path / "cost_model.md").read_text()
    assert "Llama-3.2-1B" in text and "full_all_to_all" in text
    assert text in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "cost_model.json").read_text())
    assert result["mesh"] == {"tp": 4, "fsdp": 1, "dp": 1}
    # Llama 3.2 1B: about 1.24 B parameters (model card).
    assert 1.2e9 < result["params"] < 1.3e9


def test_cli_rejects_unknown_model():
    with pytest.raises(SystemExit, match="unknown model"):
        cm.main(["--models", "3b"])
