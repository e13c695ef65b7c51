"""Byte-level tokens from a corpus that needs no download: the Python standard library.

Every byte is a token (vocabulary 256). Files are split between training and validation by a
hash of their relative path (about one in ten goes to validation), so the split is the same on
every run and for every optimizer; a single file is split at 90% of its length instead.
Batches are random windows drawn from a generator seeded by (seed, step): the data order
depends only on the seed and the step, which is what makes `--compare` fair and `--resume`
exact.
"""

from __future__ import annotations

import dataclasses
import sysconfig
import zlib
from pathlib import Path

import numpy as np

VOCAB = 256
VALIDATION_EVERY = 10  # about one file in ten is validation
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint8 tokens
    val: np.ndarray
    source: str  # where the text came from, for reports
    files: int


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[Path]:
    # The stdlib folder can hold site-packages (virtual environments, pyenv): leave it out so
    # the corpus does not depend on what is installed.
    return sorted(
        f
        for f in root.rglob("*.py")
        if f.is_file() and not _SKIP_DIRS.intersection(f.relative_to(root).parts[:-1])
    )


def _text_files(root: Path) -> list[Path]:
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if f.is_file() and not any(p.startswith(".") for p in rel):
            files.append(f)
    return files


def _is_validation(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % VALIDATION_EVERY == 0


def _read(files: list[Path], root: Path) -> tuple[bytes, bytes]:
    train, val = [], []
    for f in files:
        data = f.read_bytes()
        if b"\0" in data:  # binary file: not text
            continue
        (val if _is_validation(f.relative_to(root).as_posix()) else train).append(data)
    return b"".join(train), b"".join(val)


def load_corpus(path: str | Path | None = None, max_bytes: int | None = None) -> Corpus:
    """Loads the default corpus (the stdlib's .py sources, tests excluded) or `path`, a text
    file or a folder of them (hidden and binary files skipped).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: too little text for a training and a validation split.
    """
    if path is None:
        root = stdlib_root()
        files = _stdlib_files(root)
        source = f"Python {sysconfig.get_python_version()} standard library ({root})"
    else:
        root = Path(path).expanduser().resolve()
        if not root.exists():
            raise FileNotFoundError(f"--data {path}: no such file or folder")
        files = [root] if root.is_file() else _text_files(root)
        source = str(root)
    if root.is_file():
        data = root.read_bytes()
        cut = len(data) * (VALIDATION_EVERY - 1) // VALIDATION_EVERY
        train, val = data[:cut], data[cut:]
    else:
        train, val = _read(files, root)
        if not val and train:  # every file hashed to training: hold out the tail instead
            cut = len(train) * (VALIDATION_EVERY - 1) // VALIDATION_EVERY
            train, val = train[:cut], train[cut:]
    if max_bytes is not None:
        train, val = train[:max_bytes], val[: max(max_bytes // VALIDATION_EVERY, 1)]
    return Corpus(
        train=np.frombuffer(train, np.uint8),
        val=np.frombuffer(val, np.uint8),
        source=source,
        files=len(files),
    )


def check_length(corpus: Corpus, seq: int) -> None:
    for name, tokens in (("training", corpus.train), ("validation", corpus.val)):
        if len(tokens) < seq + 2:
            raise ValueError(
                f"{corpus.source}: the {name} split has {len(tokens)} bytes, fewer than "
                f"--seq {seq} + 2; use more text or a shorter --seq."
            )


def windows(tokens: np.ndarray, rng: np.random.Generator, batch: int, seq: int):
    """`batch` random windows of seq+1 tokens: (inputs, targets), each (batch, seq) int32."""
    starts = rng.integers(0, len(tokens) - seq - 1, size=batch)
    rows = tokens[starts[:, None] + np.arange(seq + 1)].astype(np.int32)
    return rows[:, :-1], rows[:, 1:]


def train_batch(corpus: Corpus, seed: int, step: int, batch: int, seq: int):
    """The training batch of `step`: a function of (seed, step) only."""
    return windows(corpus.train, np.random.default_rng((seed, step)), batch, seq)


def validation_batches(corpus: Corpus, seed: int, count: int, batch: int, seq: int):
    """A fixed list of `count` validation batches (the same at every evaluation)."""
    rng = np.random.default_rng((seed, 1 << 31))
    return [windows(corpus.val, rng, batch, seq) for _ in range(count)]
