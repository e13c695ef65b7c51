"""What a run leaves behind: the final table, metrics as CSV and JSON, and PNGs of the loss
curves and of the MuonBP-family optimizers' diagnostics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = (
    ("optimizer", "optimizer", "{}"),
    ("lr", "lr", "{:g}"),
    ("final_train_loss", "train loss", "{:.4f}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("mean_block_step_ms", "block step ms", "{:.1f}"),
    ("mean_full_step_ms", "full step ms", "{:.1f}"),
)
SMOOTHING = 10  # steps in the moving average of the plotted training loss
STEP_FIELDS = ("step", "train_loss", "time_s", "kind", "timed")  # the rest are diagnostics


def table(runs: dict[str, dict[str, Any]]) -> str:
    """A Markdown table, one row per optimizer ("-" where a figure does not apply)."""
    rows = []
    for name, m in runs.items():
        values = {"optimizer": name, "lr": m["lr"], **m}
        rows.append(
            ["-" if values.get(key) is None else fmt.format(values[key]) for key, _, fmt in COLUMNS]
        )
    heads = [title for _, title, _ in COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(heads), rule, *map(line, rows)])


def diagnostic_names(runs: dict[str, dict[str, Any]]) -> list[str]:
    """The diagnostics recorded in any run's steps (`muonbp_jax.read_diagnostics` keys), in
    the order they first appear."""
    names: dict[str, None] = {}
    for m in runs.values():
        for s in m["steps"]:
            names.update((k, None) for k in s if k not in STEP_FIELDS)
    return list(names)


def write_csv(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per optimizer and step; val_loss is filled on evaluation steps, the diagnostics
    columns on the steps of the optimizers that record them (empty for the others)."""
    diagnostics = diagnostic_names(runs)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["optimizer", "step", "train_loss", "val_loss", "step_time_s", "kind", *diagnostics]
        )
        for name, m in runs.items():
            val = {e["step"]: e["val_loss"] for e in m["evals"]}
            for s in m["steps"]:
                writer.writerow(
                    [
                        name,
                        s["step"],
                        f"{s['train_loss']:.6f}",
                        "" if s["step"] not in val else f"{val[s['step']]:.6f}",
                        f"{s['time_s']:.6f}",
                        s["kind"],
                        *("" if k not in s else f"{s[k]:.7g}" for k in diagnostics),
                    ]
                )


def write_json(runs: dict[str, dict[str, Any]], info: dict[str, Any], path: Path) -> None:
    clean = {name: {k: v for k, v in m.items() if k != "params"} for name, m in runs.items()}
    path.write_text(json.dumps({**info, "runs": clean}, indent=1) + "\n")


def plot(runs: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Training loss (moving average) and validation loss against steps, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    shown = []  # losses after the first tenth of training, to set the y range
    for name, m in runs.items():
        steps = np.array([s["step"] for s in m["steps"]])
        loss = np.array([s["train_loss"] for s in m["steps"]])
        if len(loss) >= SMOOTHING:
            loss = np.convolve(loss, np.ones(SMOOTHING) / SMOOTHING, mode="valid")
            steps = steps[SMOOTHING - 1 :]
        (line,) = ax_train.plot(steps, loss, label=name, lw=2.2 if name == "muonbp" else 1.3)
        evals = m["evals"]
        ax_val.plot(
            [e["step"] for e in evals],
            [e["val_loss"] for e in evals],
            "o-",
            color=line.get_color(),
            label=name,
        )
        shown += [*loss[len(loss) // 10 :], *(e["val_loss"] for e in evals)]
    low, high = (min(shown), max(shown)) if shown else (0.0, 0.0)
    if high > low:
        ax_train.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax_train.set(
        xlabel="step", ylabel="loss (nats/byte)", title=f"training loss ({SMOOTHING}-step mean)"
    )
    ax_val.set(xlabel="step", title="validation loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _record_kind(s: dict[str, Any]) -> str:
    """The key prefix of the record of a logged step's kind."""
    return "full/" if s["full_step"] > 0.5 else "block/"


def plot_diagnostics(runs: dict[str, dict[str, Any]], path: Path, title: str) -> bool:
    """For each optimizer that records diagnostics, against steps: the spectral norm of the
    update U before the learning rate (of the whole matrices, solid; of the largest block on
    block steps, dotted; max over matrices) and the range of the Newton–Schulz output's
    singular values, full steps marked. Returns False (and draws nothing) when no run records
    diagnostics."""
    shown = {
        name: m["steps"] for name, m in runs.items() if m["steps"] and "full_step" in m["steps"][0]
    }
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_norm, ax_sigma) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for name, steps in shown.items():
        step = np.array([s["step"] for s in steps])
        full = np.array([s["full_step"] for s in steps]) > 0.5
        # Each step's own record: the record of the step's kind, when it measured this step
        # (update index step - 1; the example measures every update, DIAGNOSTICS.every = 1;
        # with sampling the other steps show as gaps).
        value = lambda key, steps=steps, kind=_record_kind: np.array(
            [s[kind(s) + key] if s[kind(s) + "step"] == s["step"] - 1 else np.nan for s in steps],
            dtype=float,
        )
        # Markers where full and block steps alternate; a run of one kind says so in its label.
        mark = full if 0 < full.sum() < len(full) else np.zeros_like(full)
        label = name + {0: " (block steps only)", len(full): " (every step full)"}.get(
            int(full.sum()), " (● full steps)"
        )
        lw = 1.6 if name == "muonbp" else 1.1
        (line,) = ax_norm.plot(step, value("update_spectral_max"), lw=lw, label=label)
        color = line.get_color()
        block = np.where(full, np.nan, value("block_spectral_max"))  # = the whole on full steps
        ax_norm.plot(step, block, ":", color=color, lw=lw)
        curves = ((ax_norm, "update_spectral_max"), (ax_sigma, "ns_sigma_max_max"))
        ax_sigma.plot(step, value("ns_sigma_max_max"), "-", color=color, lw=lw, label=label)
        ax_sigma.plot(step, value("ns_sigma_min_min"), "--", color=color, lw=lw)
        curves += ((ax_sigma, "ns_sigma_min_min"),)
        for ax, key in curves:
            ax.plot(step[mark], value(key)[mark], "o", color=color, ms=3.5)
    for ax in (ax_norm, ax_sigma):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    ax_norm.set(
        xlabel="step",
        ylabel="spectral norm (max over matrices)",
        title="update before the learning rate: whole matrix (solid), largest block (dotted)",
    )
    ax_sigma.set(
        xlabel="step",
        ylabel="singular value",
        title="Newton–Schulz output: σ_max (solid), σ_min (dashed)",
    )
    for ax in (ax_norm, ax_sigma):
        ax.title.set_fontsize(10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
