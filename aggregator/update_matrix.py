"""A round's deltas as an n x d matrix on disk, read a block of columns at a time.

Strategies that need every update at once (median, trimmed mean, Krum, Bulyan)
cannot fold as updates arrive, and n copies of the model do not fit in memory
once n or the model grows. ``DeltaMatrix`` writes the deltas to one file instead:
row i is update i's delta ``w_i - base_i`` (devices in id order) over the
model's floating-point tensors, flattened in sorted tensor-name order, float64,
clipped to L2 norm ``clip_norm`` when one is set. The file is raw row-major
float64, ``np.memmap(path, np.float64, "r", shape=(n, d))`` reads it as is.

Coordinate-wise rules need every row of a column, so the matrix is read as
column blocks ``X`` (n x k, with ``n * k <= BLOCK_ELEMENTS``); the pairwise
distances Krum and Bulyan need are accumulated over the same blocks.

Memory, whatever n * d (the ``8 n d`` bytes of deltas live on disk only), with
B = ``8 * BLOCK_ELEMENTS`` bytes = 8 MB and M the float64 size of the model:

- building: one update (its tensors) plus a few float64 temporaries of its
  largest tensor (the delta, and ``delta_norm``'s);
- reading: one block at a time, read with ``pread`` into a fresh buffer, never
  mapped (a mapping would keep every page it touched in the process's resident
  set until unmapped); the generator drops its reference before reading the
  next, so a caller that drops its own holds one block;
- a robust aggregate peaks at about ``8 n^2`` bytes (the distance matrix, Krum
  and Bulyan only) + M (the flat result) + a few B (the block and a rule's
  temporaries on it: a sorted copy and its indices; Bulyan's selected rows,
  their distances to the median and their order: at most ~5 B), or during the
  build, whichever is larger. The result model, in the model's dtypes, comes on top.

``tests/test_strategy_robust.py`` measures it: Bulyan over 40 updates of a
1M-parameter model (305 MiB of deltas) grows the peak resident set by ~45 MiB.
With glibc's default sliding mmap threshold, freed 8 MB blocks stay in the heap
and the same run grows it by ~70 MiB, as does one with 80 updates (610 MiB of
deltas): retention by the allocator, not growing with n.

Integer buffers (BatchNorm's ``num_batches_tracked``) are not deltas and not in
the matrix: the build folds them into FedAvg's sample-weighted mean
(``FoldedSum``, as ``strategies.sums.weighted_mean`` does), which ``buffer_mean``
returns and the robust strategies use as is. A device lying about its sample
count can move only that counter.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from aggregator.fedavg import FoldedSum
from aggregator.strategies.base import Tensors, Update
from aggregator.strategies.sums import clip_factor, delta_norm

BLOCK_ELEMENTS = 1 << 20  # elements (float64) per column block: 8 MB
_ITEM = 8  # bytes per float64


class DeltaMatrix:
    """The deltas of a round's updates, on disk at ``path``; see the module docstring."""

    def __init__(
        self,
        path: Path,
        devices: tuple[str, ...],
        num_samples: tuple[int, ...],
        norms: torch.Tensor,
        shapes: dict[str, torch.Size],
        buffers: FoldedSum,
        buffer_names: tuple[str, ...],
    ) -> None:
        self.path = Path(path)
        self.devices = devices
        self.num_samples = num_samples
        self.norms = norms  # (n,) float64: L2 norm of each delta before clipping
        self.shapes = shapes  # floating tensors, in sorted name order (the column order)
        self.n = len(devices)
        self.d = sum(shape.numel() for shape in shapes.values())
        self._buffers = buffers
        self._buffer_names = buffer_names

    # -- building ------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        path: Path,
        updates: Iterator[Update],
        template: Mapping[str, torch.Tensor],
        clip_norm: float | None = None,
    ) -> DeltaMatrix:
        """Write one row per update, in the order given (device-id order), one update in
        memory at a time."""
        names = sorted(n for n, t in template.items() if t.dtype.is_floating_point)
        shapes = {name: template[name].shape for name in names}
        buffer_names = tuple(n for n, t in template.items() if not t.dtype.is_floating_point)
        buffers = FoldedSum({n: template[n] for n in buffer_names})
        devices, num_samples, norms = [], [], []
        with open(path, "wb") as out:
            for update in updates:
                for name, shape in shapes.items():
                    if update.tensors[name].shape != shape:
                        raise ValueError(
                            f"update of {update.device}: tensor {name!r} has shape "
                            f"{tuple(update.tensors[name].shape)}, the model {tuple(shape)}"
                        )
                norm = delta_norm(update.tensors, update.base)
                factor = clip_factor(norm, clip_norm)
                for name in names:
                    delta = update.tensors[name].to(torch.float64, copy=True).flatten()
                    delta.sub_(update.base[name].flatten())
                    if factor != 1.0:
                        delta.mul_(factor)
                    out.write(delta.numpy().data)
                buffers.fold({n: update.tensors[n] for n in buffer_names}, update.num_samples)
                devices.append(update.device)
                num_samples.append(update.num_samples)
                norms.append(norm)
        return cls(
            path,
            tuple(devices),
            tuple(num_samples),
            torch.tensor(norms, dtype=torch.float64),
            shapes,
            buffers,
            buffer_names,
        )

    # -- reading -------------------------------------------------------------------------
    def block_columns(self) -> int:
        """Columns per block: as many as fit ``BLOCK_ELEMENTS`` (at least one)."""
        return max(1, BLOCK_ELEMENTS // max(self.n, 1))

    def columns(self, block: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, X)`` for consecutive column ranges; X is a fresh n x (stop - start)
        float64 tensor the caller may keep or change."""
        k = block or self.block_columns()
        if k < 1:
            raise ValueError(f"block must be >= 1, got {k}")
        if self.n == 0 or self.d == 0:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, self.d, k):
                stop = min(start + k, self.d)
                x = torch.empty((self.n, stop - start), dtype=torch.float64)
                rows = x.numpy()
                want = (stop - start) * _ITEM
                for i in range(self.n):
                    got = os.preadv(fd, [rows[i].data.cast("B")], (i * self.d + start) * _ITEM)
                    if got != want:
                        raise OSError(f"{self.path}: short read ({got} of {want} bytes)")
                yield start, stop, x
                del x, rows  # a caller that drops its block too holds one block at a time
        finally:
            os.close(fd)

    def pairwise_sq_distances(self, block: int | None = None) -> torch.Tensor:
        """n x n float64: ``||delta_i - delta_j||^2``, from the Gram matrix summed over column
        blocks (exact for small dyadic values; for real deltas the cancellation error,
        ~1e-16 of the squared norms, is far below the float32 noise of the weights)."""
        gram = torch.zeros((self.n, self.n), dtype=torch.float64)
        for _, _, x in self.columns(block):
            gram.addmm_(x, x.T)
            del x
        sq = gram.diagonal().clone()
        dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_(min=0.0)
        dist.fill_diagonal_(0.0)
        return dist

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A flat (d,) vector back into the model's floating tensors (views of ``flat``)."""
        if flat.shape != (self.d,):
            raise ValueError(f"expected a flat vector of {self.d} values, got {tuple(flat.shape)}")
        out, offset = {}, 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            out[name] = flat[offset : offset + size].to(torch.float64).view(shape)
            offset += size
        return out

    def buffer_mean(self) -> Tensors:
        """FedAvg's value of the integer buffers (sample-weighted mean, rounded), model dtypes."""
        if not self._buffer_names or self._buffers.count == 0:
            return {}
        return self._buffers.average()

    # -- lifetime ------------------------------------------------------------------------
    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> DeltaMatrix:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
