"""The flagship example (examples/train_lm.py): a smoke run of the command, exact resume,
one-line errors for bad arguments, and the data pipeline it relies on."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from lm import data
from lm.train import Config, train

TINY = {
    "steps": 6,
    "batch": 4,
    "seq": 16,
    "d_model": 32,
    "layers": 1,
    "heads": 4,
    "eval_every": 3,
    "eval_batches": 1,
}
TINY_FLAGS = [
    "--steps",
    "4",
    "--batch",
    "4",
    "--seq",
    "16",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--eval-every",
    "2",
    "--no-progress",
]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "train_lm.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> data.Corpus:
    """The first 200 kB of the default corpus: enough text, quicker to sample from."""
    return data.load_corpus(max_bytes=200_000)


def test_command_smoke(tmp_path):
    """The README's command on a tiny configuration: table, CSV, JSON and PNGs for each run,
    with MuonBP's diagnostics in the CSV (period 2: updates 0 and 2 are full steps)."""
    names = ["muonbp", "adamw"]
    out = tmp_path / "out"
    proc = run_cli(
        "--compare",
        ",".join(names),
        *TINY_FLAGS,
        "--period",
        "2",
        "--diagnostics",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows[2:]] == names
    for row in rows[2:]:
        train_loss, val_loss = (float(c) for c in row.split("|")[3:5])
        assert 0 < train_loss < math.log(256) + 1 and 0 < val_loss < math.log(256) + 1
    with (out / "metrics.csv").open() as f:
        records = list(csv.DictReader(f))
    assert [(r["optimizer"], int(r["step"])) for r in records] == [
        (n, s) for n in names for s in range(1, 5)
    ]
    assert all(math.isfinite(float(r["train_loss"])) for r in records)
    kinds = [r["kind"] for r in records if r["optimizer"] == "muonbp"]
    assert kinds == ["full", "block", "full", "block"]  # update t (0-based) is full iff t % 2 == 0

    # Diagnostics: MuonBP's rows have every aggregate of the record of the step's kind, finite
    # and measured at that step (the example measures every update); AdamW's rows are empty.
    fields = "update_rms update_spectral block_spectral ns_sigma_max ns_sigma_min momentum_norm"
    record = lambda kind: [
        f"{kind}/{f}_{s}" for f in fields.split() for s in ("mean", "max", "min")
    ]
    columns = ["full_step", "learning_rate", "full/step", "block/step", *record("full")]
    assert set(columns + record("block")) <= set(records[0])
    for r in records:
        if r["optimizer"] == "adamw":
            assert [r[c] for c in columns] == [""] * len(columns)
            continue
        t = int(r["step"]) - 1
        kind, other = ("full", "block") if t % 2 == 0 else ("block", "full")
        assert float(r["full_step"]) == (1.0 if kind == "full" else 0.0)
        assert int(float(r[f"{kind}/step"])) == t and int(float(r[f"{other}/step"])) == t - 1
        assert all(math.isfinite(float(r[c])) for c in record(kind)), r
        get = lambda key, r=r, kind=kind: float(r[f"{kind}/{key}"])
        # Newton–Schulz maps singular values into about [0.7, 1.2] (never above 1.5), and
        # σ_min ≤ σ_max; a submatrix's spectral norm is at most the whole matrix's, and on a
        # full step the orthogonalized piece is the whole matrix.
        sigma_min, sigma_max = get("ns_sigma_min_min"), get("ns_sigma_max_max")
        assert 0 <= sigma_min <= sigma_max < 1.5, r
        whole, block = get("update_spectral_max"), get("block_spectral_max")
        if kind == "full":
            assert whole == pytest.approx(block, rel=1e-5), r
        else:
            assert whole >= block * (1 - 1e-4), r
        assert get("update_rms_max") > 0 and get("momentum_norm_max") > 0
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["runs"]) == set(names) and "jax" in summary["versions"]
    json_steps = summary["runs"]["muonbp"]["steps"]
    assert [s["full_step"] for s in json_steps] == [1.0, 0.0, 1.0, 0.0]
    assert all("full_step" not in s for s in summary["runs"]["adamw"]["steps"])
    for figure in ("loss_curves.png", "diagnostics.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(names)


def test_one_device_emulates_blocks(tmp_path):
    """On a single device the tensor-parallel blocks come from block_grid (the GPU path)."""
    proc = run_cli(
        "--cpu-devices", "1", "--optimizer", "muonbp", *TINY_FLAGS, "--out", str(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 x cpu" in proc.stdout and "mesh data=1 x model=1" in proc.stdout


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_continues_exactly(tmp_path, small_corpus):
    """Stopping at step 3 (mid-period: P=2, so update 3 is a block step) and resuming gives
    the uninterrupted run's parameters bit for bit: the same compiled step on CPU is
    deterministic, the checkpoint restores every array exactly, and batches depend only on
    (seed, step)."""
    config = Config(optimizer="muonbp", period=2, **TINY)
    whole = train(config, corpus=small_corpus, progress=False, return_params=True)
    assert whole["steps"][-1]["train_loss"] < whole["steps"][0]["train_loss"]

    ckpt = Config(
        optimizer="muonbp",
        period=2,
        checkpoint_every=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        **TINY,
    )
    first = train(ckpt, corpus=small_corpus, progress=False, stop_at=3)
    assert len(first["steps"]) == 3
    resumed = train(ckpt, corpus=small_corpus, resume=True, progress=False, return_params=True)
    _assert_trees_equal(whole["params"], resumed["params"])
    assert [s["train_loss"] for s in resumed["steps"]] == [s["train_loss"] for s in whole["steps"]]
    # Every per-step record but its timing is the same (the smoke test covers the diagnostics
    # columns; they are left out here to keep this test's three compilations cheap).
    untimed = lambda steps: [
        {k: v for k, v in s.items() if k not in ("time_s", "timed")} for s in steps
    ]
    assert untimed(resumed["steps"]) == untimed(whole["steps"])

    changed = Config(
        optimizer="muonbp",
        period=2,
        lr=0.5,
        checkpoint_every=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        **TINY,
    )
    with pytest.raises(ValueError, match="different configuration.*lr"):
        train(changed, corpus=small_corpus, resume=True, progress=False)


def test_the_host_switch_trains_like_the_conditional(small_corpus):
    """The example's default: a periodic MuonBP's block and full steps compiled apart, the kind
    passed as `full_step=` from the host's step number. It must train as the one-program
    `lax.cond` on the optimizer's counter does (same kinds at the same steps, same updates up
    to the programs' different fusion)."""
    runs = {
        switch: train(
            Config(optimizer="muonbp", period=2, switch=switch, **{**TINY, "steps": 4}),
            corpus=small_corpus,
            progress=False,
            return_params=True,
        )
        for switch in ("host", "cond")
    }
    host, cond = runs["host"], runs["cond"]
    assert [s["kind"] for s in host["steps"]] == ["full", "block", "full", "block"]
    np.testing.assert_allclose(
        [s["train_loss"] for s in host["steps"]],
        [s["train_loss"] for s in cond["steps"]],
        rtol=1e-5,
    )
    for x, y in zip(jax.tree.leaves(host["params"]), jax.tree.leaves(cond["params"])):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-3 * np.abs(y).max())
    # and not trivially: the parameters moved by more than that
    first = train(
        Config(optimizer="muonbp", period=2, **{**TINY, "steps": 1}),
        corpus=small_corpus,
        progress=False,
        return_params=True,
    )
    moved = [
        np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max()
        for a, b in zip(jax.tree.leaves(first["params"]), jax.tree.leaves(host["params"]))
    ]
    assert max(moved) > 1e-2 * max(
        np.abs(np.asarray(y)).max() for y in jax.tree.leaves(cond["params"])
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare", "muonbp,sgd"], "unknown optimizer sgd"),
        (["--mesh", "4x4"], "--mesh 4x4 needs 16 devices but jax has 8"),
        (["--data", "/no/such/corpus"], "--data /no/such/corpus: no such file or folder"),
        (["--heads", "3"], "not divisible"),
    ],
)
def test_bad_arguments_one_line(args, message, tmp_path):
    proc = run_cli(*args, "--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train_lm.py: error:") and message in last, proc.stderr


def test_parameter_count_matches_the_model(mesh):
    from flax import nnx
    from lm.model import GPT, ModelConfig

    cfg = ModelConfig(seq=16, d_model=32, layers=3, heads=4)
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    sizes = {
        "/".join(map(str, path)): math.prod(p.shape)
        for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    matrices = sum(n for k, n in sizes.items() if k.startswith("blocks") and "norm" not in k)
    assert cfg.parameter_count() == (sum(sizes.values()), matrices)


def test_data_split_and_order(tmp_path):
    text = bytes(range(256)) * 40
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    corpus = data.load_corpus(path)
    cut = len(text) * 9 // 10
    assert corpus.train.tobytes() == text[:cut] and corpus.val.tobytes() == text[cut:]

    x, y = data.train_batch(corpus, seed=1, step=7, batch=3, seq=5)
    x2, _ = data.train_batch(corpus, seed=1, step=7, batch=3, seq=5)
    x3, _ = data.train_batch(corpus, seed=1, step=8, batch=3, seq=5)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_default_corpus_is_the_stdlib():
    corpus = data.load_corpus()
    assert "standard library" in corpus.source
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 50_000
    sample = corpus.train[:100_000].tobytes().decode("utf-8", errors="replace")
    assert "def " in sample and "import " in sample
