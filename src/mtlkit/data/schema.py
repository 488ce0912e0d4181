"""Declaring a tabular multi-task dataset once: feature columns, label columns, weights and groups.

A schema is plain data (``to_dict``/``from_dict`` round-trip through YAML, TOML or JSON) and is
validated when built, with errors that name the offending key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from mtlkit.configuration import check_count, from_mapping, to_plain
from mtlkit.errors import ConfigError
from mtlkit.tasks import TaskSpec, validate_tasks

__all__ = ["DenseColumn", "CategoricalColumn", "MultiValuedColumn", "TableSchema", "identifier_columns", "infer_schema",
           "is_funnel", "is_zero_inflated"]

NORMALIZATIONS = ("standard", "minmax", "none")
POOLINGS = ("mean", "sum")
# "user_id", "item-id", "id", "userId", "ItemID"; not "paid" or "valid".
_ID_NAME = re.compile(r"(?:^|[_\-. ])(?:id|Id|ID)$|[a-z0-9](?:Id|ID)$")


@dataclass
class DenseColumn:
    """A numeric feature.

    Args:
        name: column name.
        normalization: ``standard`` (zero mean, unit variance), ``minmax`` (to [0, 1]) or ``none``;
            statistics come from the training split only.
        log: apply ``sign(x) * log1p(|x|)`` first (for heavy-tailed columns such as amounts or counts).
        fill_value: value for missing entries (before the log and normalisation); ``None`` uses the
            training mean.
        embed_values: when > 0, the column's exact values seen at least this many times in training
            are also embedded like a categorical column (rarer values share the OOV bucket). This lets
            a network treat ages, counts or round amounts non-linearly, as trees do; 0 turns it off.
    """

    name: str
    normalization: str = "standard"
    log: bool = False
    fill_value: float | None = None
    embed_values: int = 0

    def __post_init__(self) -> None:
        check_count(self.embed_values, f"dense column {self.name!r}: embed_values", 0)
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError(f"dense column {self.name!r}: normalization must be one of {list(NORMALIZATIONS)}, "
                              f"got {self.normalization!r}")


@dataclass
class CategoricalColumn:
    """A categorical feature, embedded.

    Args:
        name: column name (values are read as strings).
        embedding_dim: embedding width (``None``: the schema's ``default_embedding_dim``).
        min_frequency: training count below which a value goes to the out-of-vocabulary bucket.
        hash_buckets: when > 0, no vocabulary: each value's embedding row is a stable hash of its text
            modulo this many buckets (for ids with millions of values, or new ones every day: a value
            unseen in training shares a row with some others instead of one OOV row). 0: a vocabulary
            of the training values.
    """

    name: str
    embedding_dim: int | None = None
    min_frequency: int = 1
    hash_buckets: int = 0

    def __post_init__(self) -> None:
        if self.embedding_dim is not None:
            check_count(self.embedding_dim, f"categorical column {self.name!r}: embedding_dim", 1)
        check_count(self.min_frequency, f"categorical column {self.name!r}: min_frequency", 1)
        check_count(self.hash_buckets, f"categorical column {self.name!r}: hash_buckets", 0)
        if self.hash_buckets and self.min_frequency != 1:
            raise ConfigError(f"categorical column {self.name!r}: min_frequency applies to a vocabulary; "
                              f"a column with hash_buckets has none (set one of them)")


@dataclass
class MultiValuedColumn(CategoricalColumn):
    """A list of categorical values per row (e.g. recent item ids), embedded and pooled.

    Args:
        separator: separator between values inside a cell.
        max_length: values kept per row (the first ones).
        pooling: ``mean`` or ``sum`` of the value embeddings.
    """

    separator: str = "|"
    max_length: int = 16
    pooling: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count(self.max_length, f"multi-valued column {self.name!r}: max_length", 1)
        if self.pooling not in POOLINGS:
            raise ConfigError(f"multi-valued column {self.name!r}: pooling must be one of {list(POOLINGS)}, got {self.pooling!r}")
        if not self.separator:
            raise ConfigError(f"multi-valued column {self.name!r}: separator must be a non-empty string")


def _columns(cls, items: Any, key: str) -> tuple:
    if items is None:
        return ()
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"schema.{key}: expected a list of columns, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        out.append(cls(name=item) if isinstance(item, str) else from_mapping(cls, item, f"schema.{key}[{i}]"))
    return tuple(out)


@dataclass
class TableSchema:
    """Everything mtlkit needs to know about a table.

    Args:
        tasks: the tasks; each reads its label from ``TaskSpec.label`` (default: the task name).
            Empty or NaN labels are missing: that row is left out of that task's loss and metrics.
        dense: numeric feature columns (names or :class:`DenseColumn` mappings).
        categorical: categorical feature columns.
        multi_valued: list-valued categorical columns.
        weight_column: optional per-row sample weight (never a feature).
        group_column: optional user/group id for group AUC (never a feature).
        default_embedding_dim: embedding width of categorical columns that do not set one.
        missing_values: cell values that mean "missing" (besides empty cells and NaN). Missing
            categorical values become one explicit ``<missing>`` category.
        standardize_labels: train regression tasks (task types with ``metric_scale_powers``) on
            their labels minus the training mean, over the training standard deviation, so that a
            watch time in seconds neither swamps the other tasks' losses nor starts thousands of
            steps away from its mean; predictions and metrics stay in the labels' own units.
    """

    tasks: Sequence[TaskSpec]
    dense: Sequence[DenseColumn] = ()
    categorical: Sequence[CategoricalColumn] = ()
    multi_valued: Sequence[MultiValuedColumn] = ()
    weight_column: str | None = None
    group_column: str | None = None
    default_embedding_dim: int = 8
    missing_values: Sequence[str] = field(default_factory=lambda: ("",))
    standardize_labels: bool = True

    def __post_init__(self) -> None:
        self.tasks = validate_tasks(self.tasks)
        if not isinstance(self.standardize_labels, bool):
            raise ConfigError(f"schema.standardize_labels: expected true or false, got {self.standardize_labels!r}")
        self.dense = _columns(DenseColumn, self.dense, "dense")
        self.categorical = _columns(CategoricalColumn, self.categorical, "categorical")
        self.multi_valued = _columns(MultiValuedColumn, self.multi_valued, "multi_valued")
        self.missing_values = tuple(str(v) for v in self.missing_values)
        check_count(self.default_embedding_dim, "schema.default_embedding_dim", 1)
        if not (self.dense or self.categorical or self.multi_valued):
            raise ConfigError("schema: declare at least one feature column (dense, categorical or multi_valued)")
        features = self.feature_names
        repeated = sorted({n for n in features if features.count(n) > 1})
        if repeated:
            raise ConfigError(f"schema: columns declared more than once: {repeated}")
        labels = {t.label_column for t in self.tasks} | {t.sample_space for t in self.tasks if t.sample_space}
        special = {c for c in (self.weight_column, self.group_column) if c}
        clash = sorted((labels | special) & set(features))
        if clash:
            raise ConfigError(f"schema: label, weight and group columns cannot also be features: {clash}")

    @property
    def feature_names(self) -> list[str]:
        return [c.name for c in (*self.dense, *self.categorical, *self.multi_valued)]

    @property
    def value_embedded(self) -> list[CategoricalColumn]:
        """Dense columns whose values are also embedded, as the categorical columns they become
        (named ``<column>#value``; they follow the declared categorical columns)."""
        return [CategoricalColumn(name=f"{c.name}#value", min_frequency=c.embed_values) for c in self.dense if c.embed_values]

    @property
    def required_columns(self) -> list[str]:
        """Every column a training table must have."""
        return list(dict.fromkeys(self.feature_names + self.label_columns))

    @property
    def label_columns(self) -> list[str]:
        """Label, sample-space, weight and group columns (what training and evaluation read besides features)."""
        columns = [t.label_column for t in self.tasks] + [t.sample_space for t in self.tasks if t.sample_space]
        columns += [c for c in (self.weight_column, self.group_column) if c]
        return list(dict.fromkeys(columns))

    def embedding_dim(self, column: CategoricalColumn) -> int:
        return column.embedding_dim or self.default_embedding_dim

    @classmethod
    def from_dict(cls, data: Any) -> "TableSchema":
        if isinstance(data, TableSchema):
            return data
        return from_mapping(cls, data, "schema")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "dense": [_compact(c) for c in self.dense],
            "categorical": [_compact(c) for c in self.categorical],
            "multi_valued": [_compact(c) for c in self.multi_valued],
            "weight_column": self.weight_column,
            "group_column": self.group_column,
            "default_embedding_dim": self.default_embedding_dim,
            "missing_values": list(self.missing_values),
            "standardize_labels": self.standardize_labels,
        }


def _compact(column) -> str | dict[str, Any]:
    """A column as its bare name when every option is the default, else only the options that differ."""
    defaults = type(column)(name=column.name)
    changed = {k: v for k, v in to_plain(column).items() if k == "name" or v != getattr(defaults, k)}
    return column.name if len(changed) == 1 else changed


def infer_schema(frame: pd.DataFrame, labels: Sequence[str], max_categories_for_numeric: int = 20,
                 ignore: Sequence[str] = ()) -> TableSchema:
    """A starting schema for a table, for the user to edit.

    Label columns become tasks: ``binary`` when their non-missing values are all 0/1, ``multiclass``
    (one class per distinct value) when they are text, ``ziln`` when they are amounts that are mostly
    0 and heavy-tailed otherwise (:func:`is_zero_inflated`), else ``regression``. Numeric columns with more
    than ``max_categories_for_numeric`` distinct values are dense (with ``log`` when they are
    non-negative and heavy-tailed), except whole numbers in a column named like an id (``user_id``,
    ``itemId``), which are categorical: a user id's numeric order means nothing. Text columns whose
    cells list values separated by ``|`` (``"action|comedy"``) are multi-valued; other columns are
    categorical. Columns in ``ignore`` are left out.
    """
    for key, names in (("labels", labels), ("ignore", ignore)):
        missing = [c for c in names if c not in frame.columns]
        if missing:
            raise ConfigError(f"{key}: column(s) {missing} not in the table; columns are {list(frame.columns)}")
    tasks = []
    for name in labels:
        present = frame[name].dropna()
        values = pd.to_numeric(present, errors="coerce")
        if values.isna().any():  # names: one class per distinct value
            tasks.append(TaskSpec(name=name, type="multiclass", num_classes=max(2, int(present.astype(str).nunique()))))
            continue
        kind = "binary" if len(values) and values.isin([0, 1]).all() else "ziln" if is_zero_inflated(values) else "regression"
        tasks.append(TaskSpec(name=name, type=kind))
    dense, categorical, multi_valued = [], [], []
    for column in frame.columns:
        if column in labels or column in ignore:
            continue
        series = frame[column]
        numeric = pd.to_numeric(series, errors="coerce")
        is_numeric = numeric.notna().sum() >= 0.99 * series.notna().sum() and numeric.notna().any()
        if is_numeric:
            whole_id = bool(_ID_NAME.search(str(column)) and (numeric.dropna() == numeric.dropna().round()).all())
            if numeric.nunique() > max_categories_for_numeric and not whole_id:
                heavy = bool(numeric.min() >= 0 and numeric.quantile(0.99) > 10 * max(numeric.median(), 1.0))
                dense.append(DenseColumn(name=column, log=heavy))
                continue
        else:
            max_length = _listed_values(series)
            if max_length:
                multi_valued.append(MultiValuedColumn(name=column, max_length=max_length))
                continue
        categorical.append(CategoricalColumn(name=column))
    if not dense and not categorical and not multi_valued:
        raise ConfigError(f"no feature column left: every column is a label {list(labels)} or left out {list(ignore)}")
    return TableSchema(tasks=tasks, dense=dense, categorical=categorical, multi_valued=multi_valued)


def is_zero_inflated(values: pd.Series) -> bool:
    """Whether numeric label ``values`` look like spend or lifetime value, the ``ziln`` task type's
    case: none negative, at least a quarter of them 0, and the positive ones skewed (their 99th
    percentile over 3 times their median, as a lognormal's with a log-standard deviation above 0.47)."""
    values = values.dropna()
    positive = values[values > 0]
    if len(values) == 0 or (values < 0).any() or (values == 0).mean() < 0.25 or len(positive) < 2:
        return False
    return bool(positive.quantile(0.99) > 3 * positive.median())


def _listed_values(series: pd.Series, separator: str = "|") -> int | None:
    """For a text column whose cells are lists (``"a|b"``): the number of values to keep per row (the
    99th percentile of the lists' lengths, at most 64); None when it does not look like one.

    A list column has the separator in at least a tenth of its cells, and fewer distinct values than
    distinct cells (the same values recur in different combinations); a rare ``|`` in free text, or
    a category that merely contains one, does not qualify.
    """
    text = series.dropna().astype(str)
    text = text[text.str.strip() != ""]
    if text.empty or text.str.contains(separator, regex=False).mean() < 0.1:
        return None
    lists = text.str.split(separator, regex=False).map(lambda cell: [v for v in cell if v])
    values = lists.explode().dropna()
    if values.nunique() >= text.nunique():
        return None
    return int(min(64, max(1, lists.map(len).quantile(0.99, interpolation="higher"))))


def identifier_columns(frame: pd.DataFrame, columns: Sequence[str], min_rows: int = 100) -> list[str]:
    """The ``columns`` of ``frame`` that look like row identifiers (an order or request id), not features.

    Such a column holds a different value on every one of at least ``min_rows`` non-missing cells, in
    whole numbers or text. As a dense feature it is noise; as a categorical one every value of a new
    table is unseen. A repeating id (a user or item id seen on many rows) is a useful categorical
    feature and is not reported, nor is a column of fractional numbers, where a continuous measure is
    all-distinct too.
    """
    found = []
    for column in columns:
        values = frame[column].dropna()
        if len(values) < min_rows or values.nunique() != len(values):
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all() and not (numeric == numeric.round()).all():
            continue
        found.append(column)
    return found


def is_funnel(frame: pd.DataFrame, labels: Sequence[str]) -> bool:
    """Whether ``labels``, in this order, are the steps of a conversion funnel: at least two 0/1
    columns, each step with positives, and every positive of a step a positive of the step before
    (on the rows where both are labelled), as clicks and purchases are. AITM and ESMM model such
    tasks."""
    if len(labels) < 2:
        return False
    steps = []
    for name in labels:
        values = pd.to_numeric(frame[name], errors="coerce")
        present = values.dropna()
        if present.empty or not present.isin([0, 1]).all() or not (present == 1).any():
            return False
        steps.append(values)
    return all(not ((later == 1) & (earlier == 0)).any() for earlier, later in zip(steps, steps[1:]))
