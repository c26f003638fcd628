"""A device's local data set, read from a CSV file or a ``.npz`` file.

- CSV: a header row; the label column is named by the task (``[data] label``),
  every other column is a numeric feature.
- ``.npz``: arrays ``X`` (samples first, any further shape, e.g. sensor windows
  shaped channels x time) and ``y``; loaded with ``allow_pickle=False``.

A ``cnn1d`` task takes windows shaped (in_channels, time): ``shape_for`` turns
flat rows (a CSV's) of in_channels x time values, channel after channel, into them.

Every problem is a ``DataError`` whose message names the file and the problem.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from broker.errors import DataError
from broker.task import ModelSpec


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # float32, samples first
    y: np.ndarray  # float64 labels or targets, one per sample (the trainer casts them)
    path: Path

    def __len__(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class DataFile:
    """A data file read and checked once; ``dataset(label)`` picks the label column."""

    path: Path
    columns: tuple[str, ...] | None  # CSV header; None for .npz
    values: np.ndarray | None = None  # CSV cells as float64
    npz: Dataset | None = None

    def dataset(self, label: str) -> Dataset:
        if self.npz is not None:
            return self.npz
        assert self.columns is not None and self.values is not None
        if label not in self.columns:
            raise DataError(
                f"{self.path}: no label column {label!r} in header {list(self.columns)}"
            )
        col = self.columns.index(label)
        if len(self.columns) < 2:
            raise DataError(f"{self.path}: no feature columns besides label {label!r}")
        X = np.delete(self.values, col, axis=1)
        return _check(self.path, X, self.values[:, col])


def open_data(path: str | Path) -> DataFile:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: data file is empty")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return DataFile(path, None, npz=_check(path, *_read_npz(path)))
    if suffix in (".csv", ".txt"):
        columns, values = _read_csv(path)
        return DataFile(path, columns, values)
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use .csv or .npz)")


def shape_for(X: np.ndarray, spec: ModelSpec, source: str | Path) -> np.ndarray:
    """``X`` as the task's architecture takes it; DataError naming ``source`` if it cannot.

    Only ``cnn1d`` needs more than rows: flat rows of in_channels x time values
    (all of channel 0's time steps, then channel 1's, ...: ``X.reshape(n, -1)``
    of windows) become (in_channels, time) windows.
    """
    if spec.arch != "cnn1d":
        return X
    channels, blocks = spec.args.get("in_channels"), spec.args.get("channels", [16, 32])
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
        return X  # the zoo reports the bad argument
    if X.ndim == 2:
        if X.shape[1] % channels:
            raise DataError(
                f"{source}: cnn1d expects rows of in_channels x time = {channels} x T values "
                f"(channel after channel); got {X.shape[1]} feature columns"
            )
        X = X.reshape(X.shape[0], channels, X.shape[1] // channels)
    elif X.ndim != 3 or X.shape[1] != channels:
        raise DataError(
            f"{source}: cnn1d expects samples shaped (in_channels, time) = ({channels}, T); "
            f"got {tuple(X.shape[1:])}"
        )
    if isinstance(blocks, list) and X.shape[2] < 2 ** len(blocks):
        raise DataError(
            f"{source}: cnn1d with {len(blocks)} pooling blocks needs time >= "
            f"{2 ** len(blocks)} steps per window; got {X.shape[2]}"
        )
    return X


def load_dataset(path: str | Path, label: str = "label") -> Dataset:
    return open_data(path).dataset(label)


def _read_csv(path: Path) -> tuple[tuple[str, ...], np.ndarray]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a text CSV file") from None
    except (OSError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV: {exc}") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: data file is empty")
    header = tuple(h.strip() for h in rows[0])
    if len(rows) == 1:
        raise DataError(f"{path}: header only, no data rows")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float64)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i} has {len(row)} fields, header has {len(header)}")
        for j, cell in enumerate(row):
            try:
                values[i - 2, j] = float(cell)
            except ValueError:
                raise DataError(
                    f"{path}: line {i}, column {header[j]!r}: {cell.strip()!r} is not a number"
                ) from None
    return header, values


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("X", "y") if k not in npz.files]
            if missing:
                raise DataError(f"{path}: .npz lacks array(s) {missing} (needs X and y)")
            X, y = npz["X"], npz["y"]
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise DataError(f"{path}: .npz holds arrays that need pickle: {exc}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for name, arr in (("X", X), ("y", y)):
        if arr.dtype.kind not in "biuf":
            raise DataError(f"{path}: array {name} has non-numeric dtype {arr.dtype}")
    return X, y


def _check(path: Path, X: np.ndarray, y: np.ndarray) -> Dataset:
    if X.ndim < 2:
        raise DataError(f"{path}: X must have a samples axis and features, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise DataError(f"{path}: y of shape {y.shape} does not match {X.shape[0]} samples in X")
    if X.shape[0] == 0:
        raise DataError(f"{path}: no samples")
    if math.prod(X.shape[1:]) == 0:
        raise DataError(f"{path}: no feature columns")
    X = X.astype(np.float32)
    if not np.isfinite(X).all() or not np.isfinite(y).all():
        raise DataError(f"{path}: holds NaN or infinite values (or numbers beyond float32)")
    return Dataset(X=X, y=y.astype(np.float64), path=path)
