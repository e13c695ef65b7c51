"""What a run leaves behind: the final table, metrics as CSV and JSON, and a PNG of loss curves."""

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


def write_csv(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """One row per optimizer and step; val_loss is filled on evaluation steps."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["optimizer", "step", "train_loss", "val_loss", "step_time_s", "kind"])
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
