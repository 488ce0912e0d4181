"""Preprocessing fitted on the training split only: vocabularies, dense normalisation, labels.

The fitted state is plain JSON (vocabularies as lists of strings, statistics as numbers), saved
beside the model and reloaded exactly for evaluation and prediction; no pickle anywhere.

Encoding conventions:
- categorical code 0 is the out-of-vocabulary bucket (values unseen in training or rarer than
  ``min_frequency``); known values are 1.. in order of training frequency; a column with
  ``hash_buckets`` has no vocabulary and no OOV bucket: its codes are a stable hash of the value's text
  modulo the buckets (``pandas.util.hash_array``, the same on every machine and run);
- missing categorical cells become the explicit value ``<missing>``;
- multi-valued cells are padded with -1 up to ``max_length``;
- dense columns with ``embed_values`` also give a categorical code of their exact value, placed after
  the declared categorical columns;
- regression labels (with ``TableSchema.standardize_labels``) become ``(label - mean) / std`` of the
  training rows where that task is labelled, and ``ziln`` amounts ``label / g``, ``g`` the geometric
  mean of the positive training amounts (``TaskType.label_scaling``); a multiclass label column
  holds class indices, or class names, which become indices in sorted order; :meth:`TablePreprocessor.to_label_units` and
  :meth:`TablePreprocessor.scores_in_label_units` turn outputs and metrics back into the labels' units.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from mtlkit.data.readers import check_columns
from mtlkit.data.schema import CategoricalColumn, DenseColumn, MultiValuedColumn, TableSchema
from mtlkit.data.tensors import MultiTaskTensors
from mtlkit.errors import DataError
from mtlkit.features.encoder import EncoderConfig
from mtlkit.files import write_json
from mtlkit.tasks import TaskSpec

__all__ = ["MISSING_TOKEN", "EncodedTable", "TablePreprocessor"]

MISSING_TOKEN = "<missing>"
FORMAT = "mtlkit-preprocessor/1"


@dataclass
class EncodedTable:
    """A table turned into tensors.

    Attributes:
        tensors: inputs (``dense`` ``(N, D)`` float32, ``categorical`` ``(N, C)`` int64, ``multi_valued``
            ``(N, M, L)`` int64; absent keys when a kind has no column), labels ``(N, K)`` and weights.
        groups: ``(N,)`` int64 group ids (from ``group_column``) or None.
        out_of_vocabulary: rows per categorical column that fell into the OOV bucket.
    """

    tensors: MultiTaskTensors
    groups: torch.Tensor | None = None
    out_of_vocabulary: dict[str, int] = field(default_factory=dict)


def _as_text(series: pd.Series, missing_values: tuple[str, ...]) -> pd.Series:
    """Cells as strings, with missing cells (NaN, None, listed tokens) as ``<missing>``."""
    text = series.astype("string").fillna(MISSING_TOKEN)
    if missing_values:
        text = text.mask(text.isin(missing_values), MISSING_TOKEN)
    return text.astype(object)


def _as_number(series: pd.Series, column: str, source: str, missing_values: tuple[str, ...]) -> np.ndarray:
    """Numeric values (NaN where missing); booleans (and the cells ``true`` / ``false`` in any case)
    are 1 and 0; a non-numeric cell is an error naming the column."""
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        text = series.astype("string")
        missing = text.isna() | text.isin(missing_values) | (text.str.strip() == "")
        # A boolean column with empty cells reaches here as text (CSV) or objects (Parquet).
        text = text.mask(text.str.lower() == "true", "1").mask(text.str.lower() == "false", "0")
        values = pd.to_numeric(text.mask(missing, None), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = np.isnan(values) & ~missing.to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{source}: column {column!r} must be numeric; row {row} holds {text.iloc[row]!r}")
    if np.isinf(values).any():
        row = int(np.flatnonzero(np.isinf(values))[0])
        raise DataError(f"{source}: column {column!r} holds an infinite value at row {row}; expected finite numbers")
    return values


def _value_text(series: pd.Series, column: str, source: str, missing_values: tuple[str, ...]) -> pd.Series:
    """A dense column's values as canonical text ("39.0"), so CSV and Parquet inputs agree."""
    values = _as_number(series, column, source, missing_values)
    return pd.Series(values.astype(str), dtype=object).mask(np.isnan(values), MISSING_TOKEN)


def _signed_log(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


class TablePreprocessor:
    """Turns tables into tensors for a :class:`TableSchema`; fit once on the training split.

    Example::

        pre = TablePreprocessor(schema).fit(train_frame)
        train = pre.transform(train_frame, source="train.csv").tensors
        pre.save("run/preprocessing.json")
    """

    def __init__(self, schema: TableSchema) -> None:
        self.schema = schema
        self.vocabularies: dict[str, list[str]] = {}
        self.dense_statistics: dict[str, dict[str, float]] = {}
        self.label_statistics: dict[str, dict[str, float]] = {}  # {task: {"mean", "std"}} of standardised labels
        self.label_classes: dict[str, list[str]] = {}  # {task: class names, index order} of multiclass tasks labelled by name

    # ----------------------------------------------------------------------------------- fitting
    @property
    def fitted(self) -> bool:
        return bool(self.vocabularies or self.dense_statistics)

    def fit(self, frames: pd.DataFrame | Iterable[pd.DataFrame], source: str = "training table") -> "TablePreprocessor":
        """Learn vocabularies and statistics from the training rows (a frame or an iterable of chunks)."""
        schema = self.schema
        if isinstance(frames, pd.DataFrame):
            frames = [frames]
        counts: dict[str, pd.Series] = {}
        moments = {c.name: np.zeros(4) for c in schema.dense}  # count, sum of raw, sum and sum of squares of transformed
        extremes = {c.name: [math.inf, -math.inf] for c in schema.dense}
        scaled = self._standardized_tasks()
        label_moments = {t.name: np.zeros(3) for t in scaled}  # count, sum, sum of squares (of log amounts: geometric)
        class_tasks = [t for t in schema.tasks if t.num_classes is not None]
        class_values: dict[str, set[str]] = {t.name: set() for t in class_tasks}
        rows = 0
        for frame in frames:
            check_columns(frame, schema.required_columns, source)
            rows += len(frame)
            for column in schema.categorical:
                if column.hash_buckets:
                    continue  # no vocabulary to count
                counted = _as_text(frame[column.name], schema.missing_values).value_counts()
                counts[column.name] = counted if column.name not in counts else counts[column.name].add(counted, fill_value=0)
            for column in schema.value_embedded:
                dense_name = column.name.split("#")[0]
                counted = _value_text(frame[dense_name], dense_name, source, schema.missing_values).value_counts()
                counts[column.name] = counted if column.name not in counts else counts[column.name].add(counted, fill_value=0)
            for column in schema.multi_valued:
                if column.hash_buckets:
                    continue
                values = self._split(frame[column.name], column).explode().dropna()
                counted = values.value_counts()
                counts[column.name] = counted if column.name not in counts else counts[column.name].add(counted, fill_value=0)
            for column in schema.dense:
                raw = _as_number(frame[column.name], column.name, source, schema.missing_values)
                raw = raw[~np.isnan(raw)]
                transformed = _signed_log(raw) if column.log else raw
                m = moments[column.name]
                m[0] += raw.size
                m[1] += raw.sum()
                m[2] += transformed.sum()
                m[3] += np.square(transformed).sum()
                if raw.size:
                    extremes[column.name][0] = min(extremes[column.name][0], float(transformed.min()))
                    extremes[column.name][1] = max(extremes[column.name][1], float(transformed.max()))
            for task in scaled:
                label = self._label(frame, task, source)
                if task.task_type.label_scaling == "geometric":
                    label = np.log(label[label > 0])
                label = label[~np.isnan(label)]
                label_moments[task.name] += (label.size, label.sum(), np.square(label).sum())
            for task in class_tasks:
                text = _as_text(frame[task.label_column], schema.missing_values)
                if task.sample_space:
                    text = text[self._in_sample_space(frame, task, source)]
                class_values[task.name].update(text[text != MISSING_TOKEN].unique())
        if rows == 0:
            raise DataError(f"{source}: no rows to fit the preprocessing on")
        self.vocabularies = {}
        for column in (*schema.categorical, *schema.value_embedded, *schema.multi_valued):
            counted = counts.get(column.name, pd.Series(dtype=float))
            kept = counted[counted >= column.min_frequency]
            # Most frequent first; ties broken by the value so the order never depends on the chunks.
            ordered = sorted(kept.items(), key=lambda item: (-item[1], str(item[0])))
            self.vocabularies[column.name] = [str(value) for value, _ in ordered]
        self.dense_statistics = {}
        for column in schema.dense:
            n, raw_sum, t_sum, t_sq = moments[column.name]
            if n == 0:
                raise DataError(f"{source}: dense column {column.name!r} has no value in the training rows")
            fill = column.fill_value if column.fill_value is not None else raw_sum / n
            mean = t_sum / n
            std = math.sqrt(max(t_sq / n - mean * mean, 0.0))
            low, high = extremes[column.name]
            self.dense_statistics[column.name] = {"fill": float(fill), "mean": mean, "std": std, "min": low, "max": high}
        self.label_statistics = {}
        geometric = {t.name for t in scaled if t.task_type.label_scaling == "geometric"}
        for name, (n, total, squares) in label_moments.items():
            if n and name in geometric:  # scaled only, so that 0 stays 0
                self.label_statistics[name] = {"mean": 0.0, "std": math.exp(total / n)}
            elif n:  # a task without a labelled training row has nothing to learn from; its labels stay as they are
                mean = total / n
                std = math.sqrt(max(squares / n - mean * mean, 0.0))
                self.label_statistics[name] = {"mean": float(mean), "std": std if std > 0 else 1.0}
        self.label_classes = {}
        for task in class_tasks:
            values = sorted(class_values[task.name])
            if pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").notna().all():
                continue  # class indices: read as numbers and checked against num_classes
            if len(values) != task.num_classes:
                raise DataError(f"{source}: label column {task.label_column!r} holds {len(values)} class names in the "
                                f"training rows ({values[:10]}{' ...' if len(values) > 10 else ''}), but task "
                                f"{task.name!r} declares num_classes {task.num_classes}")
            self.label_classes[task.name] = values
        return self

    def _standardized_tasks(self) -> list[TaskSpec]:
        """The tasks whose labels :meth:`fit` standardises (see ``TableSchema.standardize_labels``)."""
        if not self.schema.standardize_labels:
            return []
        return [t for t in self.schema.tasks if t.task_type.metric_scale_powers]

    def _label(self, frame: pd.DataFrame, task: TaskSpec, source: str) -> np.ndarray:
        """A task's raw labels (float64; class indices for class names), NaN where missing or outside
        its sample space."""
        missing_values = self.schema.missing_values
        classes = self.label_classes.get(task.name)
        if classes is None:
            values = _as_number(frame[task.label_column], task.label_column, source, missing_values)
        else:
            text = _as_text(frame[task.label_column], missing_values)
            index = pd.Index(classes).get_indexer(text)
            missing = (text == MISSING_TOKEN).to_numpy()
            unknown = np.flatnonzero((index < 0) & ~missing)
            if unknown.size:
                row = int(unknown[0])
                raise DataError(f"{source}: label column {task.label_column!r} holds {text.iloc[row]!r} at row {row}, "
                                f"not one of task {task.name!r}'s classes {classes}")
            values = np.where(missing, np.nan, index.astype(np.float64))
        if task.sample_space:
            values = np.where(self._in_sample_space(frame, task, source), values, np.nan)
        return values

    def _in_sample_space(self, frame: pd.DataFrame, task: TaskSpec, source: str) -> np.ndarray:
        """``(N,)`` bool: the rows where ``task`` is defined (its ``sample_space`` column is 1)."""
        return _as_number(frame[task.sample_space], task.sample_space, source, self.schema.missing_values) == 1

    # ------------------------------------------------------------------------------ transforming
    @staticmethod
    def _split(series: pd.Series, column: MultiValuedColumn) -> pd.Series:
        text = series.astype("string").fillna("")
        return text.map(lambda cell: [v for v in cell.split(column.separator) if v][: column.max_length])

    def _check_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("the preprocessor is not fitted; call fit() on the training rows first")

    def transform(self, frame: pd.DataFrame, source: str = "table", with_labels: bool = True) -> EncodedTable:
        """Encode a table. Unseen categories go to the OOV bucket and are counted, never an error.

        Args:
            frame: the rows.
            source: file name used in error messages.
            with_labels: read (and check) the label columns; False for prediction.
        """
        self._check_fitted()
        schema = self.schema
        required = schema.required_columns if with_labels else schema.feature_names + [c for c in [schema.group_column] if c]
        check_columns(frame, required, source)
        if len(frame) == 0:
            raise DataError(f"{source}: the table has no rows")
        inputs: dict[str, torch.Tensor] = {}
        oov: dict[str, int] = {}
        if schema.dense:
            inputs["dense"] = torch.from_numpy(np.stack([self._dense(frame, c, source) for c in schema.dense], 1).astype(np.float32))
        codes = []
        for column in schema.categorical:
            code = self._codes(_as_text(frame[column.name], schema.missing_values), column)
            if not column.hash_buckets:  # a hashed column has no OOV bucket
                oov[column.name] = int((code == 0).sum())
            codes.append(code)
        for column in schema.value_embedded:
            dense_name = column.name.split("#")[0]
            codes.append(self._codes(_value_text(frame[dense_name], dense_name, source, schema.missing_values), column))
        if codes:
            inputs["categorical"] = torch.from_numpy(np.stack(codes, 1))
        if schema.multi_valued:
            inputs["multi_valued"] = torch.from_numpy(
                np.stack([self._multi_codes(frame[c.name], c, oov) for c in schema.multi_valued], 1))
        if with_labels:
            labels = np.stack([self._label(frame, t, source) for t in schema.tasks], 1)
            for k, task in enumerate(schema.tasks):
                where = f"{source}: label column {task.label_column!r} (task {task.name!r})"
                task.check_labels(torch.from_numpy(labels[:, k]), where)
                stats = self.label_statistics.get(task.name)
                if stats:
                    labels[:, k] = (labels[:, k] - stats["mean"]) / stats["std"]
            labels_tensor = torch.from_numpy(labels.astype(np.float32))
            weight = None
            if schema.weight_column:
                w = _as_number(frame[schema.weight_column], schema.weight_column, source, schema.missing_values)
                if np.isnan(w).any() or (w < 0).any():
                    raise DataError(f"{source}: weight column {schema.weight_column!r} needs a number >= 0 in every row")
                weight = torch.from_numpy(w.astype(np.float32))
        else:
            labels_tensor = torch.full((len(frame), len(schema.tasks)), float("nan"))
            weight = None
        groups = None
        if schema.group_column:
            groups = torch.from_numpy(pd.factorize(frame[schema.group_column].astype("string"))[0].astype(np.int64))
        tensors = MultiTaskTensors(inputs, labels_tensor, [t.name for t in schema.tasks], weight)
        return EncodedTable(tensors=tensors, groups=groups, out_of_vocabulary=oov)

    def _dense(self, frame: pd.DataFrame, column: DenseColumn, source: str) -> np.ndarray:
        stats = self.dense_statistics[column.name]
        values = _as_number(frame[column.name], column.name, source, self.schema.missing_values)
        values = np.where(np.isnan(values), stats["fill"], values)
        if column.log:
            values = _signed_log(values)
        if column.normalization == "standard":
            values = (values - stats["mean"]) / (stats["std"] if stats["std"] > 0 else 1.0)
        elif column.normalization == "minmax":
            span = stats["max"] - stats["min"]
            values = (values - stats["min"]) / (span if span > 0 else 1.0)
        return values

    def _codes(self, text: pd.Series, column: CategoricalColumn) -> np.ndarray:
        if column.hash_buckets:
            hashed = pd.util.hash_array(np.asarray(text, dtype=object), categorize=False)
            return (hashed % np.uint64(column.hash_buckets)).astype(np.int64)
        index = pd.Index(self.vocabularies[column.name])
        return (index.get_indexer(text) + 1).astype(np.int64)  # -1 (unknown) becomes 0, the OOV bucket

    def _multi_codes(self, series: pd.Series, column: MultiValuedColumn, oov: dict[str, int]) -> np.ndarray:
        lists = self._split(series, column)
        lengths = lists.map(len).to_numpy()
        flat = pd.Series([v for cell in lists for v in cell], dtype=object)
        codes = self._codes(flat, column) if len(flat) else np.zeros(0, dtype=np.int64)
        if not column.hash_buckets:
            oov[column.name] = int((codes == 0).sum())
        out = np.full((len(series), column.max_length), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(series)), lengths)
        positions = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, positions] = codes
        return out

    # ------------------------------------------------------------------------------ label units
    def to_label_units(self, task: str, values: torch.Tensor) -> torch.Tensor:
        """Predictions of ``task`` made on its standardised scale, in its label's units (``values``
        itself for a task whose labels are not standardised). Shape kept."""
        stats = self.label_statistics.get(task)
        return values if stats is None else values * stats["std"] + stats["mean"]

    def scores_in_label_units(self, scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` with the metrics of standardised tasks in their labels' units
        (``mse`` times the variance, ``mae`` times the standard deviation; see
        ``TaskType.metric_scale_powers``). ``loss`` stays the training objective, on the standardised scale."""
        tasks = {t.name: t for t in self.schema.tasks}
        out = {}
        for name, values in scores.items():
            values = dict(values)
            stats = self.label_statistics.get(name)
            if stats is not None:
                for metric, power in tasks[name].task_type.metric_scale_powers.items():
                    if metric in values:
                        values[metric] = values[metric] * stats["std"] ** power
            out[name] = values
        return out

    # ------------------------------------------------------------------------------- model input
    def cardinality(self, column: CategoricalColumn) -> int:
        """Embedding rows of a categorical column: its vocabulary plus the OOV bucket, or its hash buckets."""
        return column.hash_buckets or len(self.vocabularies[column.name]) + 1

    def encoder_config(self) -> EncoderConfig:
        """Sizes of the feature encoder that reads this preprocessor's tensors."""
        self._check_fitted()
        schema = self.schema
        categorical = [*schema.categorical, *schema.value_embedded]
        return EncoderConfig(
            num_dense=len(schema.dense),
            categorical_cardinalities=[self.cardinality(c) for c in categorical],
            categorical_embedding_dims=[schema.embedding_dim(c) for c in categorical],
            multi_valued_cardinalities=[self.cardinality(c) for c in schema.multi_valued],
            multi_valued_embedding_dims=[schema.embedding_dim(c) for c in schema.multi_valued],
            multi_valued_pooling=[c.pooling for c in schema.multi_valued],
        )

    # ------------------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        self._check_fitted()
        return {"format": FORMAT, "schema": self.schema.to_dict(), "vocabularies": self.vocabularies,
                "dense_statistics": self.dense_statistics, "label_statistics": self.label_statistics,
                "label_classes": self.label_classes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TablePreprocessor":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"preprocessing: expected a mapping with format {FORMAT!r}")
        out = cls(TableSchema.from_dict(data["schema"]))
        out.vocabularies = {k: list(v) for k, v in data["vocabularies"].items()}
        out.dense_statistics = {k: dict(v) for k, v in data["dense_statistics"].items()}
        # Files written before labels were standardised have none: their models predict raw labels.
        out.label_statistics = {k: dict(v) for k, v in data.get("label_statistics", {}).items()}
        out.label_classes = {k: [str(c) for c in v] for k, v in data.get("label_classes", {}).items()}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TablePreprocessor":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: not a readable preprocessing file ({error})") from None
        return cls.from_dict(data)
