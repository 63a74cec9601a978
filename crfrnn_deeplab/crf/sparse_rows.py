"""Sparse matrices stored by rows and applied as weighted gathers: the lattice's splat, blur and slice.

A row-stored matrix ``A`` (``columns``, ``weights`` and row ``offsets``, as CSR) is applied to a dense
``Tensor[K, C]`` with ``torch.nn.functional.embedding_bag`` in "sum" mode with per-sample weights: one fused
gather-multiply-add per row, which on the CPU runs FBGEMM's kernel and on CUDA a native one, with no compiled
extension of ours. It is faster than PyTorch's CSR products for the few-entries-per-row matrices of a lattice
(a gather and a weighted sum per row, no index-merging of a general sparse product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BlockedRows", "SparseRows", "index_dtype", "stacked"]


@dataclass(frozen=True, eq=False)
class SparseRows:
    """A sparse matrix Tensor[R, K] stored by rows: row r is ``Σ_e weights[e] · x[columns[e]]`` over its entries.

    Attributes:
        columns: Tensor[E] (int32 where the sizes allow, else int64), the column of every entry, grouped by row.
        offsets: Tensor[R + 1], same dtype: row r's entries are ``offsets[r]:offsets[r + 1]`` (may be empty).
        weights: Tensor[E], floating point.
        num_columns: K.
        row_length: the number of entries of every row when they all have the same (then row r's entries are
            ``r·row_length ...``), else None.
    """

    columns: Tensor
    offsets: Tensor
    weights: Tensor
    num_columns: int
    row_length: int | None = None

    def __post_init__(self) -> None:
        if torch.compiler.is_compiling():  # sizes are symbolic under torch.compile: checked in eager mode only
            return
        if self.columns.dim() != 1 or self.offsets.dim() != 1 or self.offsets.numel() < 1:
            raise ValueError(f"columns and offsets must be 1-D (offsets of length R + 1 >= 1), got shapes "
                             f"{tuple(self.columns.shape)} and {tuple(self.offsets.shape)}")
        if self.columns.dtype not in (torch.int32, torch.long) or self.offsets.dtype != self.columns.dtype:
            raise TypeError(f"columns and offsets must share an int32 or int64 dtype, got {self.columns.dtype} "
                            f"and {self.offsets.dtype}")
        if self.weights.shape != self.columns.shape or not self.weights.is_floating_point():
            raise ValueError(f"weights must be floating point with the columns' shape {tuple(self.columns.shape)}, "
                             f"got {tuple(self.weights.shape)} {self.weights.dtype}")

    @classmethod
    def selection(cls, columns: Tensor, present: Tensor | None, num_columns: int, dtype: torch.dtype) -> "SparseRows":
        """The 0/1 matrix Tensor[R, K] whose present rows hold one entry each, of weight 1: the k-th present row's in
        column ``columns[k]`` (e.g. each valid point to its vertex).

        Args:
            columns: Tensor[E] (int32 or int64), the column of each present row, in row order.
            present: bool Tensor[R], the rows that hold an entry (E of them); None: every row (R = E).
            num_columns: K.
            dtype: the weights' floating-point dtype.
        """
        ones = torch.ones(columns.numel(), dtype=dtype, device=columns.device)
        if present is None:
            offsets = torch.arange(columns.numel() + 1, dtype=columns.dtype, device=columns.device)
            return cls(columns, offsets, ones, num_columns, 1)
        offsets = torch.zeros(present.numel() + 1, dtype=columns.dtype, device=columns.device)
        torch.cumsum(present, 0, out=offsets[1:])
        if int(offsets[-1]) != columns.numel():
            raise ValueError(f"present must mark one row per column ({columns.numel()}), got {int(offsets[-1])} rows")
        return cls(columns, offsets, ones, num_columns)

    @property
    def num_rows(self) -> int:
        return self.offsets.numel() - 1

    def __matmul__(self, x: Tensor) -> Tensor:
        """The product with dense values: Tensor[K, C] -> Tensor[R, C] (empty rows give zeros)."""
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != self.num_columns or x.dtype != self.weights.dtype:
            raise ValueError(f"values must be a Tensor[{self.num_columns}, C] of {self.weights.dtype}, got "
                             f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
        return F.embedding_bag(
            self.columns, x, self.offsets, mode="sum", per_sample_weights=self.weights, include_last_offset=True
        )

    def rows(self) -> Tensor:
        """Tensor[E], the row of every entry."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.num_rows, device=counts.device), counts)

    def reweighted(self, weights: Tensor) -> "SparseRows":
        return SparseRows(self.columns, self.offsets, weights, self.num_columns, self.row_length)

    def scale_rows(self, scale: Tensor) -> "SparseRows":
        """``diag(scale) · self`` for scale Tensor[R]."""
        self._check_scale(scale, self.num_rows, "R")
        if self.row_length is not None:
            return self.reweighted((self.weights.view(-1, self.row_length) * scale.reshape(-1, 1)).view(-1))
        return self.reweighted(self.weights * scale.reshape(-1)[self.rows()])

    def scale_columns(self, scale: Tensor) -> "SparseRows":
        """``self · diag(scale)`` for scale Tensor[K]."""
        self._check_scale(scale, self.num_columns, "K")
        return self.reweighted(self.weights * scale.reshape(-1).index_select(0, self.columns))

    def _check_scale(self, scale: Tensor, size: int, name: str) -> None:
        if torch.compiler.is_compiling():  # sizes are symbolic under torch.compile: checked in eager mode only
            return
        if not isinstance(scale, Tensor) or scale.numel() != size or scale.dtype != self.weights.dtype:
            raise ValueError(f"scale must hold {name} = {size} values of {self.weights.dtype}, got "
                             f"{tuple(getattr(scale, 'shape', ()))} {getattr(scale, 'dtype', type(scale).__name__)}")

    def beside(self, right: "SparseRows") -> "SparseRows":
        """``[self | right]``, Tensor[R, K + K']: each row holds its entries in ``self``, then its entries in
        ``right`` (columns shifted by K)."""
        if not isinstance(right, SparseRows) or right.num_rows != self.num_rows:
            raise ValueError(f"right must be a SparseRows of {self.num_rows} rows, got "
                             f"{getattr(right, 'num_rows', type(right).__name__)}")
        num_columns = self.num_columns + right.num_columns
        index = index_dtype(num_columns, self.columns.numel() + right.columns.numel())
        left_counts, right_counts = self.offsets.diff().long(), right.offsets.diff().long()
        offsets = torch.zeros(self.num_rows + 1, dtype=torch.long, device=self.columns.device)
        torch.cumsum(left_counts + right_counts, 0, out=offsets[1:])
        columns = torch.empty(int(offsets[-1]), dtype=index, device=self.columns.device)
        weights = self.weights.new_empty(columns.shape)
        for part, shift, before in ((self, 0, 0), (right, self.num_columns, left_counts)):
            rows = part.rows()
            # an entry's place: its row's start, after the row's entries of self, at its rank within its row
            place = offsets[rows] + torch.arange(rows.numel(), device=rows.device) - part.offsets.long()[rows]
            if shift:
                place += before[rows]
            columns[place], weights[place] = part.columns.to(index) + shift, part.weights
        return SparseRows(columns, offsets.to(index), weights, num_columns)

    def spread_rows(self, rows: Tensor, num_rows: int) -> "SparseRows":
        """The matrix Tensor[num_rows, K] whose row ``rows[r]`` is row r of ``self`` and whose other rows are
        empty (``rows``: Tensor[R] of distinct row indices, ascending)."""
        if rows.dim() != 1 or rows.numel() != self.num_rows:
            raise ValueError(f"rows must give the new row of each of the {self.num_rows} rows, got shape "
                             f"{tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_rows or bool((rows.diff() <= 0).any())):
            raise ValueError(f"rows must ascend strictly within [0, {num_rows}), got {rows.tolist()[:8]}...")
        counts = torch.zeros(num_rows, dtype=torch.long, device=self.offsets.device)
        counts[rows] = self.offsets.diff().long()
        offsets = torch.zeros(num_rows + 1, dtype=self.offsets.dtype, device=self.offsets.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return SparseRows(self.columns, offsets, self.weights, self.num_columns)

    def to_dense(self) -> Tensor:
        """Tensor[R, K] (for tests and small problems)."""
        dense = self.weights.new_zeros(self.num_rows, self.num_columns)
        return dense.index_put_((self.rows(), self.columns.long()), self.weights, accumulate=True)


@dataclass(frozen=True, eq=False)
class BlockedRows:
    """A sparse matrix Tensor[R, K] applied one block of columns at a time: ``combine @ (parts @ x)``.

    A row whose entries are spread over all K columns (a lattice vertex gathers the pixels of a whole image region)
    reads ``x`` all over memory. Here every row is split into parts, one per block of consecutive columns it
    has entries in, and the parts are stored block after block: the gathers of one block stay within its rows of
    ``x``, which fit in the cache, and a second, small product sums each row's parts. The products equal
    :class:`SparseRows`' up to the order in which the entries are added.

    Attributes:
        parts: SparseRows Tensor[Q, K], one row per (block, row) pair that has entries, in block order.
        combine: SparseRows Tensor[R, Q] of unit weights: row r sums the parts of row r, in block order.
    """

    parts: SparseRows
    combine: SparseRows

    def __post_init__(self) -> None:
        if not isinstance(self.parts, SparseRows) or not isinstance(self.combine, SparseRows):
            raise TypeError(f"parts and combine must be SparseRows, got {type(self.parts).__name__} and "
                            f"{type(self.combine).__name__}")
        if torch.compiler.is_compiling():  # sizes are symbolic under torch.compile: checked in eager mode only
            return
        if self.combine.num_columns != self.parts.num_rows:
            raise ValueError(f"combine must have one column per row of parts ({self.parts.num_rows}), got "
                             f"{self.combine.num_columns}")

    @property
    def num_rows(self) -> int:
        return self.combine.num_rows

    @property
    def num_columns(self) -> int:
        return self.parts.num_columns

    def __matmul__(self, x: Tensor) -> Tensor:
        """The product with dense values: Tensor[K, C] -> Tensor[R, C] (empty rows give zeros)."""
        return self.combine @ (self.parts @ x)

    def scale_rows(self, scale: Tensor) -> "BlockedRows":
        """``diag(scale) · self`` for scale Tensor[R]."""
        return BlockedRows(self.parts, self.combine.scale_rows(scale))

    def scale_columns(self, scale: Tensor) -> "BlockedRows":
        """``self · diag(scale)`` for scale Tensor[K]."""
        return BlockedRows(self.parts.scale_columns(scale), self.combine)

    def to_dense(self) -> Tensor:
        """Tensor[R, K] (for tests and small problems)."""
        return self.combine.to_dense() @ self.parts.to_dense()


def stacked(top: SparseRows | BlockedRows, bottom: SparseRows) -> SparseRows | BlockedRows:
    """``[top; bottom]``: the rows of ``top`` then those of ``bottom``, over the same K columns.

    A :class:`BlockedRows` ``top`` stays blocked: ``bottom``'s rows join its parts, each summed alone.
    """
    if not isinstance(bottom, SparseRows) or not isinstance(top, (SparseRows, BlockedRows)):
        raise TypeError(f"stacked takes SparseRows or BlockedRows on top of SparseRows, got {type(top).__name__} "
                        f"and {type(bottom).__name__}")
    if bottom.num_columns != top.num_columns:
        raise ValueError(f"stacked rows need the same columns, got {top.num_columns} and {bottom.num_columns}")
    if isinstance(top, BlockedRows):
        parts = stacked(top.parts, bottom)
        own = torch.arange(top.parts.num_rows, parts.num_rows, device=bottom.columns.device)
        each = SparseRows.selection(own.to(parts.columns.dtype), None, parts.num_rows, bottom.weights.dtype)
        combine = top.combine
        combine = SparseRows(combine.columns, combine.offsets, combine.weights, parts.num_rows, combine.row_length)
        return BlockedRows(parts, stacked(combine, each))
    index = index_dtype(top.num_columns, top.columns.numel() + bottom.columns.numel())
    columns = torch.cat([top.columns.to(index), bottom.columns.to(index)])
    offsets = torch.cat([top.offsets.to(index), bottom.offsets[1:].to(index) + top.offsets[-1].to(index)])
    length = top.row_length if top.row_length == bottom.row_length else None
    return SparseRows(columns, offsets, torch.cat([top.weights, bottom.weights]), top.num_columns, length)


def index_dtype(num_columns: int, num_entries: int) -> torch.dtype:
    """The dtype of a sparse matrix's columns and offsets: int32 where ``num_columns`` and ``num_entries`` allow
    (embedding_bag's fast path), else int64."""
    for name, value in (("num_columns", num_columns), ("num_entries", num_entries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"index_dtype: {name} must be an int >= 0, got {value!r}")
    return torch.int32 if max(num_columns, num_entries) < 2**31 else torch.long
