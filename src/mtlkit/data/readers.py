"""Reading tables (CSV, gzip CSV, Parquet) through pandas and pyarrow, whole or in chunks.

Cells are read as text (CSV) so that every column is parsed once, by the preprocessing, with errors
that name the column; "NA" stays a value, never a silent NaN.

A table may be one file, a folder of part files (what Spark, Hive or pyarrow write: every table file
under it, in name order, leaving out hidden and ``_``-prefixed ones such as ``_SUCCESS``) or a glob
pattern (``data/day=*/part-*.parquet``, ``**`` across folders); its parts are read one after another
as one table, and parts without rows are skipped.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterator, Sequence

import pandas as pd

from mtlkit.errors import DataError
from mtlkit.files import atomic_write

__all__ = ["table_format", "table_files", "read_table", "iter_table", "check_columns", "write_table"]

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


class EmptyTableError(DataError):
    """A table file with a header (or a Parquet schema) but no rows."""


def table_files(path: str | os.PathLike) -> list[Path]:
    """The files of a table: ``path`` itself, the table files under a folder, or a glob's matches
    (sorted by name; hidden and ``_``-prefixed files left out). All of one format."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"{path}: no file matches")
    elif Path(path).is_dir():
        files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name.lower().endswith(CSV_SUFFIXES + PARQUET_SUFFIXES)
                       and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: a folder without table files (names ending in {CSV_SUFFIXES + PARQUET_SUFFIXES})")
    else:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        return [Path(path)]
    kinds = {table_format(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes CSV and Parquet files; a table's parts must be of one format")
    return files


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
    """Yield the table (a file, a folder of parts or a glob: :func:`table_files`) in chunks of at
    most ``chunk_rows`` rows (CSV cells as strings).

    ``columns`` (when given) must all exist in every part; they are the only ones read.
    """
    files = table_files(path)
    if len(files) == 1:
        yield from _iter_file(files[0], columns, chunk_rows)
        return
    rows = 0
    for file in files:
        if file.stat().st_size == 0:
            continue  # an empty part (Spark writes them)
        try:
            for chunk in _iter_file(file, columns, chunk_rows):
                rows += len(chunk)
                yield chunk
        except EmptyTableError:
            continue
    if rows == 0:
        raise DataError(f"{path}: none of its {len(files)} files has rows")


def _iter_file(path: Path, columns: Sequence[str] | None, chunk_rows: int) -> Iterator[pd.DataFrame]:
    _check_file(path)
    kind = table_format(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        file = pq.ParquetFile(path)
        names = file.schema_arrow.names
        if columns is not None:
            check_columns(pd.DataFrame(columns=names), columns, str(path))
        if file.metadata.num_rows == 0:
            raise EmptyTableError(f"{path}: the table has no rows")
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
        raise EmptyTableError(f"{path}: the table has a header but no rows")


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
