"""Does MuonBP train as well as Muon? A sweep of the full-step period × tensor-parallel degree.

Trains the flagship example's byte-level GPT (examples/lm) with, for each seed, the same
initialization and batches:

* MuonBP at every period P in --periods (P=1 is Muon, `inf` BlockMuon) for every
  tensor-parallel degree in --tp (the blocks of block steps; Muon does not depend on it, so it is
  run at the largest degree only);
* AdamW (the same schedule shape, its own tuned learning rate);
* MuonBP at --ratio-period with block_learning_rate = ratio × learning_rate for each ratio in
  --lr-ratios (with RMS matching both kinds of step have the same update RMS, so ratio 1 is the
  natural choice; the sweep checks it).

On 8 fake CPU devices the blocks are real `shard_map` tiles of a (8/tp, tp) ('data', 'model')
mesh; on one GPU `block_grid` emulates them. Results go to --out as convergence.json (updated
after every run, so a run cut short keeps what it finished; --resume skips runs already there),
tables in convergence.md (shaped like the MuonBP paper's 280M ablation: rows P, columns TP degree,
final validation loss; and its main table) and PNG plots when matplotlib is installed.

    python benchmarks/convergence.py --small --out runs/convergence_cpu     # ~15 min on 2 cores
    python benchmarks/convergence.py --preset gpu --seeds 0,1 --out runs/convergence_gpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

# Imports no jax, so fake CPU devices can still be set up.
from lm import devices

PRESETS = {
    # 8 fake CPU devices on a 2-core machine: each run ~30 s.
    "small": {
        "steps": 200,
        "batch": 8,
        "seq": 64,
        "d_model": 64,
        "layers": 2,
        "heads": 8,
        "eval_every": 50,
    },
    # One GPU: ~25 M parameters.
    "gpu": {
        "steps": 1500,
        "batch": 32,
        "seq": 256,
        "d_model": 512,
        "layers": 8,
        "heads": 8,
        "eval_every": 100,
    },
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    optimizer: str  # "muonbp", "muon", "blockmuon" or "adamw"
    period: int | None  # None: never a full step
    tp: int
    seed: int
    lr_ratio: float = 1.0  # block_learning_rate / learning_rate

    @property
    def key(self) -> str:
        p = "inf" if self.period is None else self.period
        return f"{self.optimizer}|P={p}|tp={self.tp}|seed={self.seed}|ratio={self.lr_ratio:g}"


def parse_period(text: str) -> int | None:
    return None if text.strip().lower() in ("inf", "none", "∞") else int(text)


def plan(
    periods: Sequence[int | None],
    tps: Sequence[int],
    seeds: Sequence[int],
    ratios: Sequence[float],
    ratio_period: int,
    ratio_tp: int,
    adamw: bool = True,
) -> list[Run]:
    """Every run, seed-major, Muon and AdamW first, then the periods in the order given, so a
    sweep cut short by --budget-s keeps whole seeds and the most telling runs."""
    runs = []
    for seed in seeds:
        if 1 in periods:
            runs.append(Run("muon", 1, max(tps), seed))
        if adamw:
            runs.append(Run("adamw", None, max(tps), seed))
        for p in periods:
            if p != 1:
                opt = "blockmuon" if p is None else "muonbp"
                runs += [Run(opt, p, tp, seed) for tp in tps]
        runs += [Run("muonbp", ratio_period, ratio_tp, seed, r) for r in ratios if r != 1.0]
    return runs


def run_one(run: Run, shape: dict, corpus: Any, n_devices: int, lr: float | None) -> dict:
    from lm import train as train_lib

    mesh = (n_devices // run.tp, run.tp) if n_devices > 1 else None
    config = train_lib.Config(
        optimizer=run.optimizer,
        period=run.period if run.period is not None else 1,
        tp_blocks=run.tp,
        mesh=mesh,
        seed=run.seed,
        lr=None if run.optimizer == "adamw" else lr,
        block_lr_ratio=run.lr_ratio,
        eval_batches=4,
        **shape,
    )
    began = time.perf_counter()
    metrics = train_lib.train(config, corpus=corpus, progress=False)
    return {
        **dataclasses.asdict(run),
        "final_val_loss": metrics["final_val_loss"],
        "final_train_loss": metrics["final_train_loss"],
        "lr": metrics["lr"],
        "mean_step_ms": metrics["mean_step_ms"],
        "mean_block_step_ms": metrics["mean_block_step_ms"],
        "mean_full_step_ms": metrics["mean_full_step_ms"],
        "compile_s": metrics["compile_s"],
        "wall_s": time.perf_counter() - began,
        "evals": metrics["evals"],
        "train_loss": [s["train_loss"] for s in metrics["steps"]],
        "devices": metrics["devices"],
    }


# ----------------------------------------------------------------------------- reporting


def _stats(values: list[float]) -> tuple[float, float, int]:
    """Mean and half the range (the spread over seeds), and the count."""
    if not values:
        return math.nan, math.nan, 0
    return sum(values) / len(values), (max(values) - min(values)) / 2, len(values)


def _cell(values: list[float]) -> str:
    mean, spread, n = _stats(values)
    if n == 0:
        return "–"
    return f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {spread:.4f}"


def _select(results: list[dict], **where) -> list[float]:
    return [
        r["final_val_loss"]
        for r in results
        if _matches(r, where) and r["final_val_loss"] is not None
    ]


def _optimizer(period: int | None) -> str:
    return "muon" if period == 1 else "blockmuon" if period is None else "muonbp"


def _where(period: int | None, tp: int) -> dict:
    """The runs of one (P, TP) cell at block lr ratio 1; Muon does not depend on TP."""
    where = {"optimizer": _optimizer(period), "period": period, "lr_ratio": 1.0}
    if period != 1:
        where["tp"] = tp
    return where


def _matches(r: dict, where: dict) -> bool:
    return all(r[k] == v for k, v in where.items())


def _grid(periods, tps, cell) -> list[str]:
    """A Markdown table with rows P and columns TP degree; cell(P, tp) gives each entry."""
    lines = ["| P | " + " | ".join(f"TP {tp}" for tp in tps) + " |", "|---|" + "---|" * len(tps)]
    for p in periods:
        row = " | ".join(cell(p, tp) for tp in tps)
        lines.append(f"| {'∞' if p is None else p} | {row} |")
    return lines


def tables(results: list[dict], periods, tps, ratio_period: int, ratio_tp: int) -> str:
    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"Final validation loss (nats per byte), mean ± half the range over seeds {seeds}.",
        "",
        (
            "Period × tensor-parallel degree (rows P, columns TP degree; P=1 is Muon, whose "
            "steps do not depend on the blocks, run once at the largest degree):"
        ),
        "",
    ]
    lines += _grid(periods, tps, lambda p, tp: _cell(_select(results, **_where(p, tp))))
    muon = {r["seed"]: r["final_val_loss"] for r in results if r["optimizer"] == "muon"}

    def delta(p, tp) -> str:
        rs = [r for r in results if _matches(r, _where(p, tp)) and r["seed"] in muon]
        mean, spread, n = _stats([r["final_val_loss"] - muon[r["seed"]] for r in rs])
        return "–" if not n else f"{mean:+.4f}" + (f" ± {spread:.4f}" if n > 1 else "")

    if muon:
        lines += [
            "",
            (
                "The same, as the difference from Muon's loss with the same seed (paired: the seed "
                "moves every run's loss together, so this separates a difference from noise):"
            ),
            "",
        ]
        lines += _grid([p for p in periods if p != 1], tps, delta)
    tp = max(tps)
    mid = [p for p in periods if p not in (1, None)]
    main = [("Muon (P=1)", {"optimizer": "muon"})]
    main += [(f"MuonBP (P={p})", {"optimizer": "muonbp", "period": p, "tp": tp}) for p in mid]
    main += [
        ("BlockMuon (P=∞)", {"optimizer": "blockmuon", "tp": tp}),
        ("AdamW", {"optimizer": "adamw"}),
    ]
    lines += [
        "",
        f"Main comparison at TP {tp} (mean step time: the whole training step, this machine):",
        "",
        "| optimizer | peak lr | final val loss | final train loss | mean step ms |",
        "|---|---|---|---|---|",
    ]
    for label, where in main:
        where = {**where, "lr_ratio": 1.0}
        rs = [r for r in results if _matches(r, where)]
        if not rs:
            continue
        train = _cell([r["final_train_loss"] for r in rs])
        ms = _stats([r["mean_step_ms"] for r in rs if r["mean_step_ms"] is not None])[0]
        lr = "/".join(sorted({f"{r['lr']:g}" for r in rs})) or "–"
        lines.append(
            f"| {label} | {lr} | {_cell(_select(results, **where))} | {train} | {ms:.1f} |"
        )
    ratios = sorted({r["lr_ratio"] for r in results})
    if len(ratios) > 1:
        lines += [
            "",
            f"block_learning_rate / learning_rate at P={ratio_period}, TP {ratio_tp}:",
            "",
            "| ratio | final val loss |",
            "|---|---|",
        ]
        for ratio in ratios:
            vals = _select(
                results, optimizer="muonbp", period=ratio_period, tp=ratio_tp, lr_ratio=ratio
            )
            lines.append(f"| {ratio:g} | {_cell(vals)} |")
    return "\n".join(lines)


def plots(results: list[dict], periods, tps, out: Path) -> list[Path]:
    """convergence_grid.png (final val loss against P, one line per TP degree, AdamW and Muon
    as horizontal lines) and convergence_curves.png (validation curves at the largest TP)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    written = []
    finite = [p for p in periods if p is not None]
    xs = {p: (p if p is not None else 2 * max(finite, default=1)) for p in periods}
    fig, ax = plt.subplots(figsize=(6, 4))
    for tp in tps:
        pts = []
        for p in periods:
            mean, spread, n = _stats(_select(results, **_where(p, tp)))
            if n:
                pts.append((xs[p], mean, spread))
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"TP {tp}")
    adam = _stats(_select(results, optimizer="adamw"))
    if adam[2]:
        # AdamW is usually far above the Muon family: say where it is instead of squeezing
        # the Muon curves into a sliver of the plot.
        low, high = ax.get_ylim()
        if adam[0] <= high + (high - low):
            ax.axhline(adam[0], color="gray", linestyle="--", label=f"AdamW {adam[0]:.4f}")
        else:
            ax.plot([], [], " ", label=f"AdamW {adam[0]:.4f} (off the plot)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(xs.values()), [("∞" if p is None else str(p)) for p in periods])
    ax.set_xlabel("full-step period P (1: Muon, ∞: BlockMuon)")
    ax.set_ylabel("final validation loss")
    written.append(_save(fig, ax, out / "convergence_grid.png", {}))

    fig, ax = plt.subplots(figsize=(8.5, 4))
    tp = max(tps)
    for r in results:
        if r["seed"] != min(x["seed"] for x in results):
            continue
        if r["optimizer"] in ("muonbp", "blockmuon") and r["tp"] != tp:
            continue
        p = r["period"]
        label = {"muon": "Muon", "adamw": "AdamW", "blockmuon": "BlockMuon"}.get(
            r["optimizer"], f"MuonBP P={p}"
        )
        if r["lr_ratio"] != 1.0:
            label += f", block lr ×{r['lr_ratio']:g}"
        steps = [e["step"] for e in r["evals"]]
        ax.plot(steps, [e["val_loss"] for e in r["evals"]], marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"TP {tp}, seed {min(x['seed'] for x in results)}")
    legend = {"fontsize": "small", "loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    written.append(_save(fig, ax, out / "convergence_curves.png", legend))
    return written


def _save(fig, ax, path: Path, legend: dict) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(**legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--small", action="store_true", help="same as --preset small")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for name in ("steps", "batch", "seq", "d-model", "layers", "heads", "eval-every"):
        p.add_argument(f"--{name}", type=int, default=None, help="overrides the preset")
    p.add_argument("--periods", default="1,2,4,8,inf")
    p.add_argument("--tp", default="2,4,8", help="tensor-parallel degrees")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lr-ratios", default="0.5,1,2", help="block_lr / lr ratios")
    p.add_argument("--ratio-period", type=int, default=4)
    p.add_argument("--ratio-tp", type=int, default=None, help="default: the largest --tp")
    p.add_argument(
        "--lr", type=float, default=None, help="peak lr of the Muon runs (default: the example's)"
    )
    p.add_argument("--no-adamw", action="store_true", help="leave AdamW out")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this")
    p.add_argument("--resume", action="store_true", help="skip runs already in --out")
    p.add_argument("--report-only", action="store_true", help="tables/plots from --out")
    p.add_argument(
        "--cpu-devices", type=int, default=8, help="fake CPU devices when there is no GPU/TPU"
    )
    p.add_argument("--out", default="runs/convergence")
    args = p.parse_args(argv)

    preset = "small" if args.small else args.preset or "small"
    shape = dict(PRESETS[preset])
    for name in ("steps", "batch", "seq", "d_model", "layers", "heads", "eval_every"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    periods = [parse_period(x) for x in args.periods.split(",")]
    shown = sorted(periods, key=lambda q: math.inf if q is None else q)
    tps = [int(x) for x in args.tp.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    ratios = [float(x) for x in args.lr_ratios.split(",")] if args.lr_ratios else [1.0]
    ratio_tp = args.ratio_tp or max(tps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "convergence.json"
    saved = json.loads(store.read_text()) if store.exists() else {}
    results: list[dict] = saved.get("runs", []) if (args.resume or args.report_only) else []

    if not args.report_only:
        devices.use_cpu_devices(args.cpu_devices)
        import jax
        import optax
        from lm import data as data_lib

        n_devices = jax.device_count()
        for tp in tps:
            if n_devices > 1 and n_devices % tp:
                raise SystemExit(f"error: {n_devices} devices do not split into TP {tp}")
        corpus = data_lib.load_corpus()
        done = {
            Run(**{k: r[k] for k in ("optimizer", "period", "tp", "seed", "lr_ratio")}).key
            for r in results
        }
        todo = [
            r
            for r in plan(
                periods, tps, seeds, ratios, args.ratio_period, ratio_tp, not args.no_adamw
            )
            if r.key not in done
        ]
        began = time.perf_counter()
        meta = {
            "device": f"{n_devices} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "optax": optax.__version__,
            "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d"),
            "shape": shape,
            "command": " ".join(sys.argv),
        }
        print(f"{len(todo)} runs on {meta['device']}, shape {shape}", flush=True)
        for i, run in enumerate(todo):
            elapsed = time.perf_counter() - began
            if args.budget_s is not None and elapsed > args.budget_s:
                print(f"budget of {args.budget_s:.0f} s spent: {len(todo) - i} runs left")
                break
            result = run_one(run, shape, corpus, n_devices, args.lr)
            results.append(result)
            print(
                f"[{i + 1}/{len(todo)} {elapsed:5.0f}s] {run.key}: val "
                f"{result['final_val_loss']:.4f} train {result['final_train_loss']:.4f} "
                f"({result['wall_s']:.0f} s)",
                flush=True,
            )
            store.write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
        saved = {"meta": meta}
    text = tables(results, shown, tps, args.ratio_period, ratio_tp)
    meta = saved.get("meta", {})
    header = (
        f"{meta.get('device', '?')}, jax {meta.get('jax', '?')}, optax {meta.get('optax', '?')}, "
        f"{meta.get('date', '?')}; model/run shape {meta.get('shape', shape)}\n\n"
    )
    (out / "convergence.md").write_text(header + text + "\n")
    print(header + text)
    for path in plots(results, shown, tps, out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
