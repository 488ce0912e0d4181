"""In-memory multi-task datasets held as tensors; batches are slices, never per-row Python."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence, Union

import torch

from mtlkit.errors import DataError

__all__ = ["Inputs", "Batch", "MultiTaskTensors", "map_inputs", "random_row_splits"]

# A model input: one float tensor, or named tensors (e.g. "dense" floats and "categorical" codes)
# that all have the same number of rows.
Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]


def map_inputs(inputs: Inputs, fn) -> Inputs:
    """Apply ``fn`` to every tensor of ``inputs``, keeping its structure."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    return {key: fn(value) for key, value in inputs.items()}


def _num_rows(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    sizes = {key: value.shape[0] for key, value in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise DataError(f"inputs: every input tensor needs the same number of rows, got {sizes}")
    return next(iter(sizes.values()))


# Rows per chunk of the finiteness checks: isfinite on a float tensor makes temporaries as large as
# the tensor (an absolute value, two masks), which on a table of 200 MB set the peak memory of a
# whole training run; per chunk of 2**22 values they stay below 17 MB.
_CHECK_VALUES = 1 << 22


def _first_non_finite(tensor: torch.Tensor, allow_nan: bool = False) -> tuple[int, ...] | None:
    """Index of the first value of a ``(N, ...)`` tensor that is infinite (or NaN, unless
    ``allow_nan``), or None; scanned in chunks of rows, so no full-size temporary is made."""
    rows = max(1, _CHECK_VALUES // max(1, tensor[0].numel())) if len(tensor) else 1
    for start in range(0, len(tensor), rows):
        chunk = tensor[start : start + rows]
        bad = torch.isinf(chunk) if allow_nan else ~torch.isfinite(chunk)
        if bool(bad.any()):
            row, *rest = bad.nonzero()[0].tolist()
            return (start + row, *rest)
    return None


@dataclass
class Batch:
    """One mini-batch.

    Attributes:
        inputs: model input (tensor ``(B, d)`` or named tensors with ``B`` rows).
        labels: ``(B, K)`` float; NaN where a task's label is missing.
        label_mask: ``(B, K)`` bool, True where the label is present.
        sample_weight: ``(B,)`` float or None.
        all_labelled: True when the whole dataset has every label (lets losses skip masking).
    """

    inputs: Inputs
    labels: torch.Tensor
    label_mask: torch.Tensor
    sample_weight: torch.Tensor | None
    all_labelled: bool = False

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(map_inputs(self.inputs, move), move(self.labels), move(self.label_mask),
                     None if self.sample_weight is None else move(self.sample_weight), self.all_labelled)


def random_row_splits(num_rows: int, fractions: Sequence[float], seed: int = 0) -> list[torch.Tensor]:
    """Disjoint random sets of row indices, ``round(fraction * num_rows)`` each, cut in turn from one
    permutation drawn from ``seed`` (the fractions must be >= 0 and sum to <= 1)."""
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to <= 1, got {list(fractions)}")
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for fraction in fractions:
        stop = start + int(round(fraction * num_rows))
        parts.append(order[start:stop])
        start = stop
    return parts


class MultiTaskTensors:
    """A dataset of ``N`` rows: inputs, a ``(N, K)`` label matrix and optional sample weights.

    Missing labels are NaN and are excluded from that task's loss and metrics (``label_mask``).
    Inputs must be finite; labels may be NaN (missing) but never infinite.

    Args:
        inputs: ``(N, d)`` float tensor or a mapping of tensors with ``N`` rows.
        labels: ``(N, K)`` (or ``(N,)`` for one task) float tensor.
        task_names: one name per label column.
        sample_weight: optional ``(N,)`` non-negative weights.
    """

    def __init__(self, inputs: Inputs, labels: torch.Tensor, task_names: Sequence[str],
                 sample_weight: torch.Tensor | None = None, validate: bool = True) -> None:
        labels = torch.as_tensor(labels)
        if labels.ndim == 1:
            labels = labels.unsqueeze(1)
        self.inputs = inputs
        self.labels = labels.float()
        self.task_names = list(task_names)
        self.sample_weight = None if sample_weight is None else torch.as_tensor(sample_weight).float()
        if validate:
            self.validate()
        self.label_mask = ~torch.isnan(self.labels)

    def validate(self) -> None:
        """Check shapes and values; raise :class:`DataError` naming what is wrong."""
        n = _num_rows(self.inputs)
        if n == 0:
            raise DataError("dataset is empty: 0 rows")
        if self.labels.ndim != 2 or self.labels.shape[0] != n:
            raise DataError(f"labels: expected shape ({n}, {len(self.task_names)}), got {tuple(self.labels.shape)}")
        if self.labels.shape[1] != len(self.task_names):
            raise DataError(
                f"labels: {self.labels.shape[1]} label columns but {len(self.task_names)} task names {self.task_names}"
            )
        items = {"inputs": self.inputs} if isinstance(self.inputs, torch.Tensor) else dict(self.inputs)
        for key, tensor in items.items():
            if tensor.is_floating_point():
                first = _first_non_finite(tensor)
                if first is not None:
                    row, *col = first
                    raise DataError(f"{key}: non-finite value (NaN or inf) at row {row}, column {col}; inputs must be finite")
        first = _first_non_finite(self.labels, allow_nan=True)
        if first is not None:
            row, col = first
            raise DataError(f"labels of task {self.task_names[col]!r}: infinite value at row {row}; "
                            "labels must be finite numbers (NaN marks a missing label)")
        if self.sample_weight is not None:
            w = self.sample_weight
            if w.shape != (n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise DataError(f"sample_weight: expected {n} finite values >= 0")

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the tensors are (all on one device)."""
        return self.labels.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the dataset's tensors (inputs, labels, mask, weights)."""
        tensors = [self.labels, self.label_mask, *([] if self.sample_weight is None else [self.sample_weight])]
        tensors += [self.inputs] if isinstance(self.inputs, torch.Tensor) else list(self.inputs.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _map(self, fn) -> "MultiTaskTensors":
        out = MultiTaskTensors.__new__(MultiTaskTensors)
        out.inputs = map_inputs(self.inputs, fn)
        out.labels = fn(self.labels)
        out.label_mask = fn(self.label_mask)
        out.task_names = self.task_names
        out.sample_weight = None if self.sample_weight is None else fn(self.sample_weight)
        return out

    def to(self, device: torch.device | str) -> "MultiTaskTensors":
        """The dataset with every tensor on ``device`` (itself when already there): on a GPU, batches
        are then gathered there, with no copy from the host per step."""
        device = torch.device(device)
        if self.device == device or (device.index is None and self.device.type == device.type):
            return self
        return self._map(lambda t: t.to(device))

    def subset(self, index: torch.Tensor | slice) -> "MultiTaskTensors":
        """Rows ``index`` (a slice gives views; an index tensor one gather per tensor)."""
        if isinstance(index, slice):
            return self._map(lambda t: t[index])
        index = index.to(self.device)
        return self._map(lambda t: t.index_select(0, index))

    def split(self, fractions: Sequence[float], seed: int = 0) -> list["MultiTaskTensors"]:
        """Random disjoint splits with the given fractions of the rows (they must sum to <= 1)."""
        return [self.subset(rows) for rows in random_row_splits(len(self), fractions, seed)]

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False) -> Iterator[Batch]:
        """Mini-batches: slices (views) in order, or with ``shuffle`` one gather per tensor per batch
        from a fresh permutation. Per-batch gathers measured faster than permuting the whole table
        once per epoch, which allocates (and page-faults) a full copy of it."""
        n = len(self)
        all_labelled = bool(self.label_mask.all())  # once per pass, not once per step
        # Drawn on the host from the CPU generator: the same seed gives the same order on every device.
        order = torch.randperm(n, generator=generator).to(self.device) if shuffle else None
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        # Every label present: each batch's mask is a broadcast view of one row of True, built once
        # per pass (per batch it cost 7-9 us of W1's 47-50 us a batch; docs/performance-log.md, round 18).
        labelled_row = self.label_mask.new_ones(1, self.labels.shape[1]) if all_labelled else None
        full_mask = labelled_row.expand(batch_size, -1) if all_labelled else None
        for start in range(0, stop, batch_size):
            end = min(start + batch_size, n)
            if order is None:
                part = slice(start, end)
                take = lambda t: t[part]  # noqa: E731
            else:
                index = order[start:end]
                take = lambda t: t.index_select(0, index)  # noqa: E731
            if not all_labelled:
                label_mask = take(self.label_mask)
            elif end - start == batch_size:
                label_mask = full_mask
            else:
                label_mask = labelled_row.expand(end - start, -1)
            yield Batch(
                map_inputs(self.inputs, take),
                take(self.labels),
                label_mask,
                None if self.sample_weight is None else take(self.sample_weight),
                all_labelled,
            )
