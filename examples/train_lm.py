"""Train a byte-level GPT with tensor parallelism and compare MuonBP with Muon, BlockMuon and AdamW.

    python examples/train_lm.py                      # the default comparison, a few minutes on CPU
    python examples/train_lm.py --compare muonbp,adamw --steps 500
    python examples/train_lm.py --optimizer muonbp --data ~/my_texts --out runs/mine

Without a GPU/TPU it runs on 8 fake CPU devices as a 2x4 ('data', 'model') mesh: the matrices
are split 4 ways Megatron-style and MuonBP's block steps orthogonalize each device's slice. On
one GPU, `block_grid` splits the matrices into the same 4 blocks. Every optimizer starts from the
same seed and sees the same batches. Writes, under --out: metrics.csv, metrics.json (with --diagnostics:
the MuonBP-family optimizers' per-step diagnostics), loss_curves.png, diagnostics.png (with
--diagnostics, when one of them ran) and checkpoints/<optimizer>/ (for --resume).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from lm import OPTIMIZERS, devices

DEFAULT_COMPARE = "muonbp,muon,blockmuon,adamw"


def _mesh(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 2x4, got {text!r}")
    return int(parts[0]), int(parts[1])


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(OPTIMIZERS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"an optimizer is named twice in {text!r}")
    return names


def _one_name(text: str) -> list[str]:
    if "," in text:
        raise argparse.ArgumentTypeError(f"one name expected (use --compare for several): {text}")
    return _names(text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


class _HelpWithDefaults(argparse.HelpFormatter):
    """Shows each option's default unless its help already says it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default is not None and action.default is not False
        if shown and action.default != argparse.SUPPRESS and "default" not in text:
            text += " (default: %(default)s)"
        return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Learning rates default to values tuned per optimizer (lm/optimizers.py).",
        formatter_class=_HelpWithDefaults,
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--compare",
        type=_names,
        default=_names(DEFAULT_COMPARE),
        metavar="A,B,...",
        help=f"optimizers to train in turn, from {', '.join(OPTIMIZERS)} "
        f"(default: {DEFAULT_COMPARE})",
    )
    which.add_argument(
        "--optimizer",
        type=_one_name,
        dest="compare",
        metavar="NAME",
        help="train one optimizer (same as --compare NAME)",
    )
    p.add_argument("--steps", type=_positive, default=600, help="training steps")
    p.add_argument("--batch", type=_positive, default=16, help="sequences per step")
    p.add_argument("--seq", type=_positive, default=128, help="bytes per sequence")
    p.add_argument("--d-model", type=_positive, default=128, help="model width")
    p.add_argument("--layers", type=_positive, default=2, help="transformer blocks")
    p.add_argument("--heads", type=_positive, default=4, help="attention heads")
    p.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate for every compared optimizer (default: tuned each)",
    )
    p.add_argument("--period", type=_positive, default=5, help="MuonBP's full-step period")
    p.add_argument(
        "--block-lr-ratio",
        type=_positive_float,
        default=1.0,
        help="block_learning_rate of MuonBP and BlockMuon as a multiple of the rate; the "
        "library's per-leaf block step-size rule still multiplies it (1: the library's defaults)",
    )
    p.add_argument(
        "--full-strategy",
        choices=("auto", "gather", "all_to_all"),  # muonbp_jax.FULL_STRATEGIES (jax not yet loaded)
        default="auto",
        help="how MuonBP's full steps orthogonalize sharded matrices",
    )
    p.add_argument(
        "--mesh",
        type=_mesh,
        default=None,
        metavar="DATAxMODEL",
        help="device mesh (default: 2x4 on 8 CPU devices, 1x1 on one GPU)",
    )
    p.add_argument(
        "--tp-blocks",
        type=_positive,
        default=4,
        help="tensor-parallel blocks per matrix; block_grid emulates those the "
        "mesh's model axis does not provide",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="text file or folder (default: the Python standard library's sources)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialization and data order")
    p.add_argument("--eval-every", type=_positive, default=50, help="steps between evaluations")
    p.add_argument(
        "--checkpoint-every", type=_positive, default=100, help="steps between checkpoints"
    )
    p.add_argument(
        "--out",
        default="runs/train_lm",
        metavar="DIR",
        help="where metrics, the plot and checkpoints go",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each optimizer from its latest checkpoint in --out",
    )
    p.add_argument(
        "--cpu-devices",
        type=_positive,
        default=None,
        help="fake CPU devices when no GPU/TPU is present (default: 8)",
    )
    p.add_argument(
        "--diagnostics",
        action="store_true",
        help="record the MuonBP family's per-step diagnostics (metrics columns and "
        "diagnostics.png); off by default: they cost compile time and (measured with 0.3) 10-25%% of a step here, "
        "more on a GPU, and would skew the tokens/s comparison with AdamW",
    )
    p.add_argument(
        "--switch",
        choices=("host", "cond"),
        default="host",
        help="how periodic MuonBP picks each step's kind: 'host' (default) compiles a block and "
        "a full step and passes full_step= from the step number; 'cond': one program, a "
        "lax.cond on the optimizer's counter",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


@dataclasses.dataclass
class Setup:
    """What the command line asks for, checked: one Config per optimizer, the corpus, the
    device description."""

    args: argparse.Namespace
    configs: dict[str, Any]
    corpus: Any
    device: str


def prepare(p: argparse.ArgumentParser, argv: list[str] | None) -> Setup:
    """Parses and checks the arguments, sets up the devices and loads the corpus; every
    problem ends the program with one line (`p.error`), before any training."""
    args = p.parse_args(argv)
    if args.data is not None and not Path(args.data).expanduser().exists():
        p.error(f"--data {args.data}: no such file or folder")
    on_cpu = devices.use_cpu_devices(args.cpu_devices)

    import jax  # after the device setup above
    from lm import data
    from lm.train import Config, mesh_shape

    # Every option named like a Config field sets that field.
    fields = {f.name for f in dataclasses.fields(Config)} & set(vars(args))
    configs = {
        name: Config(
            optimizer=name,
            checkpoint_dir=str(Path(args.out) / "checkpoints" / name),
            **{f: getattr(args, f) for f in fields},
        )
        for name in args.compare
    }
    try:
        for config in configs.values():
            config.check()
            mesh = mesh_shape(config)
        corpus = data.load_corpus(args.data)
        data.check_length(corpus, args.seq)
    except (ValueError, OSError) as e:
        p.error(str(e))

    count = jax.device_count()
    device = f"{count} x {jax.devices()[0].device_kind}" + (
        " (fake CPU devices)" if on_cpu and count > 1 else ""
    )
    print(
        f"devices : {device}, mesh data={mesh[0]} x model={mesh[1]}, "
        f"{args.tp_blocks} tensor-parallel blocks per matrix"
    )
    print(
        f"corpus  : {corpus.source}: {corpus.files} files, {len(corpus.train):,} training and "
        f"{len(corpus.val):,} validation bytes"
    )
    total, matrices = next(iter(configs.values())).model.parameter_count()
    print(
        f"model   : d_model={args.d_model} layers={args.layers} heads={args.heads} "
        f"seq={args.seq}: {total:,} parameters, {matrices:,} in Muon-trained matrices"
    )
    print(f"training: {args.steps} steps of {args.batch} x {args.seq} bytes\n")
    return Setup(args, configs, corpus, device)


def run_info(setup: Setup, argv: list[str] | None) -> dict[str, Any]:
    """Command, device, versions and date, stored with the metrics."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    def version(name: str) -> str | None:  # None: used from a source tree, not installed
        try:
            return installed_version(name)
        except PackageNotFoundError:
            return None

    names = ("jax", "jaxlib", "optax", "flax", "orbax-checkpoint", "muonbp-jax")
    command = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    return {
        "command": " ".join(command),
        "device": setup.device,
        "cpu_count": os.cpu_count(),
        "versions": {"python": platform.python_version(), **{n: version(n) for n in names}},
        "commit": _commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _commit() -> str | None:
    """The repository's commit, with "+dirty" when muonbp_jax/ or examples/ have uncommitted
    changes (the figures then come from code no commit holds); None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(
        ["git", "-C", str(root), *a], capture_output=True, text=True, check=False
    )
    try:
        head = git("rev-parse", "--short", "HEAD")
    except OSError:  # no git
        return None
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--", "muonbp_jax", "examples").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    setup = prepare(parser(), argv)
    args = setup.args
    from lm import report
    from lm.train import train

    runs = {
        name: train(config, corpus=setup.corpus, resume=args.resume, progress=not args.no_progress)
        for name, config in setup.configs.items()
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(runs, out / "metrics.csv")
    report.write_json(runs, run_info(setup, argv), out / "metrics.json")
    title = (
        f"byte-level GPT d={args.d_model} L={args.layers}, {args.steps} steps of "
        f"{args.batch}x{args.seq} bytes, {setup.device}"
    )
    report.plot(runs, out / "loss_curves.png", title=title)
    figures = [out / "loss_curves.png"]
    if report.plot_diagnostics(runs, out / "diagnostics.png", title=title):
        figures.append(out / "diagnostics.png")
    print()
    print(report.table(runs))
    print(
        f"\nwrote {out / 'metrics.csv'}, {out / 'metrics.json'}, "
        f"{', '.join(map(str, figures))}; checkpoints in {out / 'checkpoints'}"
    )


if __name__ == "__main__":
    main()
