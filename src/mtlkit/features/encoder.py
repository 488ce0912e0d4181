"""The feature encoder: embeddings for categorical columns plus the dense vector, as one model input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch.autograd.function import once_differentiable
from torch import nn

from mtlkit.configuration import check_count, from_mapping
from mtlkit.errors import ConfigError

__all__ = ["EncoderConfig", "FeatureEncoder"]


@dataclass
class EncoderConfig:
    """Sizes of a :class:`FeatureEncoder` (what a fitted preprocessor produces).

    Args:
        num_dense: dense columns.
        categorical_cardinalities: vocabulary size of each categorical column, OOV bucket included.
        categorical_embedding_dims: embedding width of each categorical column.
        multi_valued_cardinalities, multi_valued_embedding_dims: the same for multi-valued columns.
        multi_valued_pooling: ``mean`` or ``sum`` per multi-valued column.
        views: separately learned copies of every embedding (1; STEM's ``K + 1``: one per task,
            then a shared one). The dense features are the same in every view.
    """

    num_dense: int = 0
    categorical_cardinalities: Sequence[int] = ()
    categorical_embedding_dims: Sequence[int] = ()
    multi_valued_cardinalities: Sequence[int] = ()
    multi_valued_embedding_dims: Sequence[int] = ()
    multi_valued_pooling: Sequence[str] = ()
    views: int = 1

    def __post_init__(self) -> None:
        check_count(self.num_dense, "encoder.num_dense", 0)
        check_count(self.views, "encoder.views", 1)
        for key in ("categorical_cardinalities", "categorical_embedding_dims", "multi_valued_cardinalities",
                    "multi_valued_embedding_dims", "multi_valued_pooling"):
            setattr(self, key, tuple(getattr(self, key)))
        if len(self.categorical_cardinalities) != len(self.categorical_embedding_dims):
            raise ConfigError("encoder: one embedding dim per categorical column is required")
        if not (len(self.multi_valued_cardinalities) == len(self.multi_valued_embedding_dims) == len(self.multi_valued_pooling)):
            raise ConfigError("encoder: one cardinality, embedding dim and pooling per multi-valued column is required")
        for i, size in enumerate(self.categorical_cardinalities + self.multi_valued_cardinalities):
            check_count(size, f"encoder cardinality #{i}", 1)
        if self.output_dim == 0:
            raise ConfigError("encoder: no input column at all")

    @property
    def output_dim(self) -> int:
        """Width of one view."""
        return self.num_dense + sum(self.categorical_embedding_dims) + sum(self.multi_valued_embedding_dims)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderConfig":
        return from_mapping(cls, data, "encoder")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


class _TableRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape
        return table.index_select(0, rows)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        num_rows, width = ctx.table_shape
        # Entry (row r, dimension d) of the table is element r * width + d of the flat table: one
        # flat scatter_add_ adds every lookup's gradient into its row, in lookup order like
        # index_add_ (bincount, the same sums, also scans the bins for their minimum and maximum).
        # One broadcast add with alpha builds them: 145 against 220 us for a multiply then an add
        # at W2's 67,584 lookups.
        bins = torch.arange(width, device=rows.device).add(rows.unsqueeze(1), alpha=width).view(-1)
        grad_table = grad.new_zeros(num_rows * width).scatter_add_(0, bins, grad.reshape(-1))
        return grad_table.view(num_rows, width), None


def table_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``table[rows]``: the lookup of every categorical column at once.

    Its backward on CPU is one flat ``scatter_add_`` (W2 in ``benchmarks/``, on an Intel Xeon: 0.80 ms
    against 1.10 ms for a weighted ``bincount`` and 1.65 ms for ``index_select``'s ``index_add_``,
    itself about 3x faster than ``embedding``'s dense backward for these small tables); the sums are
    the same, in the same order. Elsewhere it is ``index_select``.

    Shape: table ``(V, D)``, rows ``(N,)`` int64 ``-> (N, D)``.
    """
    if table.device.type == "cpu" and torch.is_grad_enabled() and table.requires_grad:
        return _TableRows.apply(table, rows)
    return table.index_select(0, rows)


class FeatureEncoder(nn.Module):
    """Embeds categorical codes and concatenates them with the dense features.

    Categorical columns that share an embedding width live in one table with per-column offsets, so
    all their lookups are a single ``embedding`` call (with equal widths: one lookup for every column).
    With ``views`` V > 1 each table row holds the V copies side by side, so the lookups stay one call.

    Input: ``{"dense": (B, D) float, "categorical": (B, C) int64, "multi_valued": (B, M, L) int64 (-1 pads)}``
    (absent keys for absent kinds). Output: ``(B, output_dim)``, or ``(B, V, output_dim)`` with
    ``views`` V > 1 (view ``v``: the dense features, then every column's ``v``-th embedding copy).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.output_dim = config.output_dim
        self.views = views = config.views
        dims = config.categorical_embedding_dims
        self.groups = nn.ModuleList()
        self._group_columns: list[list[int]] = []
        for width in sorted(set(dims)):
            columns = [i for i, d in enumerate(dims) if d == width]
            cards = [config.categorical_cardinalities[i] for i in columns]
            table = nn.Embedding(sum(cards), width * views)
            nn.init.normal_(table.weight, std=0.05)
            self.groups.append(table)
            offsets = torch.tensor([0] + cards[:-1]).cumsum(0)
            self.register_buffer(f"offsets_{len(self._group_columns)}", offsets, persistent=False)
            self.register_buffer(f"columns_{len(self._group_columns)}", torch.tensor(columns), persistent=False)
            self._group_columns.append(columns)
        self._all_columns_in_one_group = len(self._group_columns) == 1
        self.multi_valued = nn.ModuleList()
        for card, width in zip(config.multi_valued_cardinalities, config.multi_valued_embedding_dims):
            table = nn.Embedding(card, width * views)
            nn.init.normal_(table.weight, std=0.05)
            self.multi_valued.append(table)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        views = self.views
        if self.config.num_dense:
            dense = inputs["dense"]
            parts.append(dense if views == 1 else dense.unsqueeze(1).expand(-1, views, -1))
        if self.groups:
            codes = inputs["categorical"]
            for g, table in enumerate(self.groups):
                group_codes = codes if self._all_columns_in_one_group else codes.index_select(1, getattr(self, f"columns_{g}"))
                rows = (group_codes + getattr(self, f"offsets_{g}")).flatten()
                embedded = table_rows(table.weight, rows)
                if views == 1:
                    parts.append(embedded.view(codes.shape[0], -1))
                else:  # (B, C, V, width) -> (B, V, C * width)
                    embedded = embedded.view(codes.shape[0], group_codes.shape[1], views, -1)
                    parts.append(embedded.transpose(1, 2).reshape(codes.shape[0], views, -1))
        if self.multi_valued:
            codes = inputs["multi_valued"]
            for m, (table, pooling) in enumerate(zip(self.multi_valued, self.config.multi_valued_pooling)):
                column = codes[:, m]
                present = (column >= 0).unsqueeze(-1).to(table.weight.dtype)
                pooled = (table(column.clamp_min(0)) * present).sum(1)
                if pooling == "mean":
                    pooled = pooled / present.sum(1).clamp_min(1.0)
                parts.append(pooled if views == 1 else pooled.view(pooled.shape[0], views, -1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
