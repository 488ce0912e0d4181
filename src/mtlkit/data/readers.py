"""Reading tables (CSV, gzip CSV, Parquet) through pandas and pyarrow, whole or in chunks.

Cells are read as text (CSV) so that every column is parsed once, by the preprocessing, with errors
that name the column; "NA" stays a value, never a silent NaN.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from mtlkit.errors import DataError
from mtlkit.files import atomic_write

__all__ = ["table_format", "read_table", "iter_table", "check_columns", "write_table"]

CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def table_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"parquet"`` from the file name."""
    name = Path(path).name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    raise DataError(f"{path}: unknown table format; expected a name ending in {CSV_SUFFIXES + PARQUET_SUFFIXES}")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")


def check_columns(frame: pd.DataFrame, required: Sequence[str], source: str) -> None:
    """Raise a :class:`DataError` naming every required column that ``frame`` lacks."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the table has {list(frame.columns)}")


def iter_table(path: str | os.PathLike, columns: Sequence[str] | None = None,
               chunk_rows: int = 250_000) -> Iterator[pd.DataFrame]:
    """Yield the table in chunks of at most ``chunk_rows`` rows (CSV cells as strings).

    ``columns`` (when given) must all exist; they are the only ones read.
    """
    path = Path(path)
    _check_file(path)
    kind = table_format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        if columns is not None:
            check_columns(pd.DataFrame(columns=names), columns, str(path))
        if file.metadata.num_rows == 0:
            raise DataError(f"{path}: the table has no rows")
        for batch in file.iter_batches(batch_size=chunk_rows, columns=list(columns) if columns else None):
            yield batch.to_pandas()
        return
    sep = "\t" if ".tsv" in path.name.lower() else ","
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    if columns is not None:
        check_columns(pd.DataFrame(columns=header), columns, str(path))
    reader = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[], usecols=columns,
                         chunksize=chunk_rows)
    empty = True
    for chunk in reader:
        if len(chunk):
            empty = False
            yield chunk
    if empty:
        raise DataError(f"{path}: the table has a header but no rows")


def read_table(path: str | os.PathLike, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The whole table (see :func:`iter_table`)."""
    return pd.concat(list(iter_table(path, columns)), ignore_index=True)


def write_table(frame: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write CSV or Parquet (by the file name) through a temporary file, then rename."""
    kind = table_format(path)
    if kind == "parquet":
        return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
    compression = "gzip" if str(path).endswith(".gz") else None
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False, compression=compression))
