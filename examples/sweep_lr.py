"""Learning-rate sweep for the flagship example: final losses for each optimizer and rate.

    python examples/sweep_lr.py --compare muon,adamw --lrs 3e-3,1e-2,3e-2

Takes every option of train_lm.py (model, steps, mesh, data...); prints a Markdown table of
the final validation and training losses, then the best rate of each optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses

import train_lm


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected rates such as 3e-3,1e-2, got {text!r}"
        ) from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def main(argv: list[str] | None = None) -> None:
    p = train_lm.parser()
    p.description = __doc__.split("\n")[0]
    p.add_argument("--lrs", type=_rates, required=True, help="comma-separated peak rates")
    setup = train_lm.prepare(p, argv)
    from lm.train import train

    print("| optimizer | lr | val loss | train loss |\n|---|---:|---:|---:|", flush=True)
    best = {}
    for name, config in setup.configs.items():
        for lr in setup.args.lrs:
            run = dataclasses.replace(config, lr=lr, checkpoint_dir=None)
            m = train(run, corpus=setup.corpus, progress=not setup.args.no_progress)
            val, tr = m["final_val_loss"], m["final_train_loss"]
            print(f"| {name} | {lr:g} | {val:.4f} | {tr:.4f} |", flush=True)
            best[name] = min(best.get(name, (val, lr)), (val, lr))
    print("\nbest: " + ", ".join(f"{n} {lr:g} ({val:.4f})" for n, (val, lr) in best.items()))


if __name__ == "__main__":
    main()
