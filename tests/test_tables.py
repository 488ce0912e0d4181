import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from mtlkit import ConfigError, DataError
from mtlkit.data.readers import iter_table, read_table
from mtlkit.data.schema import TableSchema, identifier_columns, infer_schema
from mtlkit.features import MISSING_TOKEN, FeatureEncoder, TablePreprocessor
from mtlkit.models import TabularMultiTaskModel, build_model
from mtlkit.training import load_checkpoint, save_checkpoint

from tables import SCHEMA, make_table


@pytest.fixture
def frame():
    return make_table()


@pytest.fixture
def schema():
    return TableSchema.from_dict(SCHEMA)


def test_schema_round_trip_and_required_columns(schema):
    again = TableSchema.from_dict(schema.to_dict())
    assert again.to_dict() == schema.to_dict()
    assert schema.required_columns == ["price", "age", "city", "user", "tags", "click", "buy", "watch_time"]
    assert schema.to_dict()["categorical"][0] == "city"  # defaults are written as a bare name


@pytest.mark.parametrize("change, message", [
    ({"dense": [{"name": "price", "normalisation": "standard"}]}, r"schema.dense\[0\].*normalisation"),
    ({"dense": [{"name": "price", "normalization": "zscore"}]}, "normalization"),
    ({"categorical": ["city", "city"]}, "more than once"),
    ({"categorical": ["click"]}, "cannot also be features"),
    ({"categorical": [{"name": "city", "embedding_dim": 0}]}, "embedding_dim"),
    ({"multi_valued": [{"name": "tags", "pooling": "max"}]}, "pooling"),
    ({"colour": 1}, "colour"),
    ({"dense": [], "categorical": [], "multi_valued": []}, "at least one feature"),
    ({"standardize_labels": "no"}, "schema.standardize_labels: expected true or false"),
])
def test_bad_schemas_name_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        TableSchema.from_dict({**SCHEMA, **change})


def test_infer_schema(frame):
    schema = infer_schema(frame, ["click", "watch_time"])
    assert [(t.name, t.type) for t in schema.tasks] == [("click", "binary"), ("watch_time", "regression")]
    named = infer_schema(frame, ["click", "city"]).tasks[1]  # text labels: one class per name
    assert (named.type, named.num_classes) == ("multiclass", 4)
    dense = {c.name: c for c in schema.dense}
    assert {"price", "age"} <= set(dense)  # numeric with many distinct values
    assert dense["price"].log and not dense["age"].log
    assert {c.name for c in schema.categorical} >= {"city", "buy"}
    assert [(c.name, c.separator, c.max_length) for c in schema.multi_valued] == [("tags", "|", 3)]  # "a|c": lists of up to 3
    # Whole numbers in a column named like an id are categories; other numbers stay dense.
    ids = frame.assign(user_id=frame["user"] * 1000 + 7, itemId=frame["user"] + 1, paid=frame["user"] + 0.5,
                       valid=frame["user"] + 3, note=np.where(np.arange(len(frame)) % 50 == 0, "a|b", "plain text"))
    inferred = infer_schema(ids, ["click"])
    assert {"user_id", "itemId", "note"} <= {c.name for c in inferred.categorical}  # a rare "|" is not a list
    assert {"paid", "valid", "user"} <= {c.name for c in inferred.dense}
    with pytest.raises(ConfigError, match="nope"):
        infer_schema(frame, ["nope"])
    assert "city" not in {c.name for c in infer_schema(frame, ["click"], ignore=["city"]).categorical}
    with pytest.raises(ConfigError, match=r"ignore.*\['colour'\]"):
        infer_schema(frame, ["click"], ignore=["colour"])
    features = [c for c in frame.columns if c != "click"]
    with pytest.raises(ConfigError, match="no feature column left"):
        infer_schema(frame, ["click"], ignore=features)


def test_infer_schema_gives_zero_inflated_skewed_amounts_the_ziln_type(tmp_path):
    from mtlkit.data.schema import is_zero_inflated
    from mtlkit.experiments.tabular_run import initial_config

    rng = np.random.default_rng(0)
    rows = 2000
    buys = rng.random(rows) < 0.3
    frame = pd.DataFrame({"x": rng.normal(size=rows),
                          "spend": np.where(buys, np.round(np.exp(3 + rng.normal(size=rows)), 2), 0.0),
                          "watch": np.exp(rng.normal(size=rows)),  # skewed, but never 0
                          "visits": rng.poisson(3.0, rows),  # counts: 5 % zeros
                          "refund": np.where(buys, -5.0, 0.0)})  # negative amounts
    assert is_zero_inflated(frame["spend"]) and not any(is_zero_inflated(frame[c]) for c in ("watch", "visits", "refund"))
    assert not is_zero_inflated(pd.Series(buys * 20.0))  # one positive amount: not skewed
    schema = infer_schema(frame, ["spend", "watch", "visits", "refund"])
    assert [t.type for t in schema.tasks] == ["ziln", "regression", "regression", "regression"]
    frame.to_csv(tmp_path / "table.csv", index=False)
    _, _, notes = initial_config(tmp_path / "table.csv", ["spend", "watch"])
    assert len(notes) == 1 and "'spend' is 0 on 70% of the rows" in notes[0] and "ziln" in notes[0]


def test_identifier_columns_are_unique_whole_numbers_or_text(frame):
    frame = frame.assign(order_id=np.arange(len(frame)) * 7 + 1000,
                         request=[f"req-{i:05d}" for i in range(len(frame))],
                         amount=np.random.default_rng(0).random(len(frame)) * 100)  # all distinct, but continuous
    frame.loc[3, "request"] = None  # a missing cell does not make an id repeat
    columns = [c for c in frame.columns if c != "click"]
    assert identifier_columns(frame, columns) == ["order_id", "request"]
    # "user" repeats (a useful categorical feature); a table under min_rows says nothing.
    assert identifier_columns(frame.head(50), columns) == []
    assert identifier_columns(frame.assign(order_id=frame["order_id"] % 10), ["order_id"]) == []


def test_csv_gzip_and_parquet_read_the_same(frame, schema, tmp_path):
    frame.to_csv(tmp_path / "t.csv", index=False)
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        frame.to_csv(f, index=False)
    frame.to_parquet(tmp_path / "t.parquet", index=False)
    encoded = {}
    for name in ("t.csv", "t.csv.gz", "t.parquet"):
        table = read_table(tmp_path / name, schema.required_columns)
        pre = TablePreprocessor(schema).fit(table)
        encoded[name] = pre.transform(table).tensors
    for name in ("t.csv.gz", "t.parquet"):
        for key in encoded["t.csv"].inputs:
            torch.testing.assert_close(encoded[name].inputs[key], encoded["t.csv"].inputs[key])
        torch.testing.assert_close(encoded[name].labels, encoded["t.csv"].labels, equal_nan=True)


def test_chunked_fit_equals_whole_fit(frame, schema, tmp_path):
    frame.to_csv(tmp_path / "t.csv", index=False)
    whole = TablePreprocessor(schema).fit(read_table(tmp_path / "t.csv"))
    chunked = TablePreprocessor(schema).fit(iter_table(tmp_path / "t.csv", chunk_rows=97))
    assert chunked.vocabularies == whole.vocabularies
    for statistics in ("dense_statistics", "label_statistics"):
        for column, stats in getattr(whole, statistics).items():
            for key, value in stats.items():
                assert getattr(chunked, statistics)[column][key] == pytest.approx(value, rel=1e-9)
    assert set(whole.label_statistics) == {"watch"}


def test_regression_labels_are_standardised_on_their_labelled_training_rows(frame, schema, tmp_path):
    pre = TablePreprocessor(schema).fit(frame)
    watch = frame["watch_time"].dropna()  # labelled on clicked rows only
    stats = pre.label_statistics["watch"]
    assert stats["mean"] == pytest.approx(watch.mean()) and stats["std"] == pytest.approx(watch.std(ddof=0))
    labels = pre.transform(frame).tensors.labels
    standardised = labels[:, 2][labels[:, 2].isfinite()].double()
    assert standardised.mean().item() == pytest.approx(0, abs=1e-6) and standardised.std(correction=0).item() == pytest.approx(1, rel=1e-5)
    assert torch.equal(labels[:, :2], torch.tensor(frame[["click", "buy"]].to_numpy(), dtype=torch.float32))  # binary: as read
    back = pre.to_label_units("watch", labels[:, 2][labels[:, 2].isfinite()])
    np.testing.assert_allclose(back.numpy(), watch.to_numpy(), rtol=1e-5, atol=1e-6)  # float32 labels
    assert torch.equal(pre.to_label_units("click", labels[:, 0]), labels[:, 0])
    # Metrics move with the scale: mse by the variance, mae by the standard deviation; the loss stays.
    scores = pre.scores_in_label_units({"click": {"loss": 0.5, "auc": 0.7}, "watch": {"loss": 0.5, "mse": 0.5, "mae": 0.25, "count": 9}})
    assert scores["click"] == {"loss": 0.5, "auc": 0.7}
    assert scores["watch"] == pytest.approx({"loss": 0.5, "mse": 0.5 * stats["std"] ** 2, "mae": 0.25 * stats["std"], "count": 9})
    # Saved and reloaded; a file from before label statistics existed loads with raw labels.
    pre.save(tmp_path / "pre.json")
    assert TablePreprocessor.load(tmp_path / "pre.json").label_statistics == pre.label_statistics
    data = pre.to_dict()
    del data["label_statistics"]
    old = TablePreprocessor.from_dict(data)
    as_read = torch.tensor(frame[["click", "buy", "watch_time"]].to_numpy(), dtype=torch.float32)
    assert old.label_statistics == {}
    torch.testing.assert_close(old.transform(frame).tensors.labels, as_read, rtol=0, atol=0, equal_nan=True)
    raw = TablePreprocessor(TableSchema.from_dict({**SCHEMA, "standardize_labels": False})).fit(frame)
    assert raw.label_statistics == {}
    torch.testing.assert_close(raw.transform(frame).tensors.labels, as_read, rtol=0, atol=0, equal_nan=True)


def test_preprocessing_values(frame, schema):
    pre = TablePreprocessor(schema).fit(frame)
    out = pre.transform(frame)
    dense = out.tensors.inputs["dense"].double()
    logged = np.sign(frame["price"]) * np.log1p(frame["price"].abs())
    expected_price = (logged - logged.mean()) / logged.std(ddof=0)
    np.testing.assert_allclose(dense[:, 0].numpy(), expected_price, atol=1e-5)
    assert dense[:, 1].min().item() == pytest.approx(0.0) and dense[:, 1].max().item() == pytest.approx(1.0)
    # "NA" is a value, not a missing cell; vocabularies are most frequent first with 0 as OOV.
    assert pre.vocabularies["city"][0] == "paris" and "NA" in pre.vocabularies["city"]
    codes = out.tensors.inputs["categorical"]
    assert (codes[:, 0] == 1).sum().item() == (frame["city"] == "paris").sum()
    # Watch time is missing where there was no click: those rows are unlabelled for that task only.
    assert out.tensors.label_mask[:, 2].sum().item() == frame["click"].sum()
    assert out.tensors.label_mask[:, :2].all()


def test_rare_values_and_unseen_values_go_to_the_oov_bucket(frame, schema):
    pre = TablePreprocessor(schema).fit(frame)
    counts = frame["user"].astype(str).value_counts()
    assert set(pre.vocabularies["user"]) == set(counts[counts >= 2].index)
    new = frame.head(5).copy()
    new["city"] = ["tokyo", "paris", "", "lyon", "tokyo"]
    out = pre.transform(new, source="new.csv")
    assert out.out_of_vocabulary["city"] == 3  # two unseen cities and one missing (never seen missing)
    assert out.tensors.inputs["categorical"][[0, 2, 4], 0].tolist() == [0, 0, 0]


def test_missing_values(schema):
    frame = make_table(200)
    frame.loc[:9, "city"] = ""
    frame.loc[:4, "price"] = np.nan
    pre = TablePreprocessor(schema).fit(frame)
    assert MISSING_TOKEN in pre.vocabularies["city"]
    fill = pre.dense_statistics["price"]["fill"]
    assert fill == pytest.approx(frame["price"].mean())
    out = pre.transform(frame)
    assert torch.isfinite(out.tensors.inputs["dense"]).all()


def test_multi_valued_columns_are_padded_lists(frame, schema):
    pre = TablePreprocessor(schema).fit(frame)
    codes = pre.transform(frame).tensors.inputs["multi_valued"]
    assert codes.shape == (len(frame), 1, 16)
    lengths = (codes[:, 0] >= 0).sum(1)
    expected = frame["tags"].map(lambda cell: len([v for v in cell.split("|") if v]))
    assert lengths.tolist() == expected.tolist()


def test_preprocessing_save_and_load_reproduce_the_transform(frame, schema, tmp_path):
    pre = TablePreprocessor(schema).fit(frame)
    pre.save(tmp_path / "pre.json")
    again = TablePreprocessor.load(tmp_path / "pre.json")
    a, b = pre.transform(frame).tensors, again.transform(frame).tensors
    for key in a.inputs:
        assert torch.equal(a.inputs[key], b.inputs[key])


def test_embedded_values_of_dense_columns(frame):
    schema = TableSchema.from_dict({**SCHEMA, "dense": [{"name": "age", "embed_values": 5}]})
    pre = TablePreprocessor(schema).fit(frame)
    counts = frame["age"].value_counts()
    assert len(pre.vocabularies["age#value"]) == (counts >= 5).sum()
    codes = pre.transform(frame).tensors.inputs["categorical"]
    assert codes.shape[1] == 3  # city, user, then age's value
    assert pre.encoder_config().categorical_cardinalities[-1] == (counts >= 5).sum() + 1


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.drop(columns=["city"]), r"train.csv.*missing column.*city"),
    (lambda f: f.assign(age=["x"] + list(f["age"][1:])), r"column 'age' must be numeric; row 0 holds 'x'"),
    (lambda f: f.assign(click=[2] + list(f["click"][1:])), r"label column 'click'.*\{0, 1\}"),
    (lambda f: f.assign(price=[np.inf] + list(f["price"][1:])), r"'price'.*infinite"),
])
def test_bad_tables_are_clear_errors(frame, schema, tmp_path, mutate, message):
    path = tmp_path / "train.csv"
    mutate(frame).to_csv(path, index=False)
    with pytest.raises(DataError, match=message):
        table = read_table(path)
        TablePreprocessor(schema).fit(table, source=str(path))
        TablePreprocessor(schema).fit(make_table()).transform(table, source=str(path))


def test_empty_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="no rows"):
        read_table(tmp_path / "header.csv")
    with pytest.raises(DataError, match="unknown table format"):
        (tmp_path / "t.xlsx").write_text("x")
        read_table(tmp_path / "t.xlsx")


def test_fused_embedding_lookup_equals_per_column_lookups(frame, schema):
    pre = TablePreprocessor(schema).fit(frame)
    inputs = pre.transform(frame).tensors.inputs
    encoder = FeatureEncoder(pre.encoder_config())
    out = encoder(inputs)
    assert out.shape == (len(frame), encoder.output_dim)
    assert encoder.output_dim == 2 + 8 + 4 + 3
    # Rebuild each column's embedding from its slice of the fused tables.
    config = pre.encoder_config()
    expected = [inputs["dense"]]
    for width in sorted(set(config.categorical_embedding_dims)):
        g = sorted(set(config.categorical_embedding_dims)).index(width)
        table = encoder.groups[g].weight
        offset = 0
        for column, (card, dim) in enumerate(zip(config.categorical_cardinalities, config.categorical_embedding_dims)):
            if dim != width:
                continue
            expected.append(table[offset:offset + card][inputs["categorical"][:, column]])
            offset += card
    codes = inputs["multi_valued"][:, 0]
    weight = encoder.multi_valued[0].weight
    pooled = torch.stack([weight[row[row >= 0]].mean(0) if (row >= 0).any() else torch.zeros(3) for row in codes])
    expected.append(pooled)
    torch.testing.assert_close(out, torch.cat(expected, 1))


def test_tabular_model_checkpoint_round_trip(frame, schema, tmp_path):
    pre = TablePreprocessor(schema).fit(frame)
    inputs = pre.transform(frame).tensors.inputs
    encoder = FeatureEncoder(pre.encoder_config())
    model = TabularMultiTaskModel(encoder, build_model("ple", input_dim=encoder.output_dim, tasks=schema.tasks))
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, payload = load_checkpoint(tmp_path / "m.pt")
    assert payload["encoder_config"] == pre.encoder_config().to_dict()
    model.eval(), loaded.eval()
    for key, value in model(inputs).items():
        torch.testing.assert_close(loaded(inputs)[key], value)


def test_multiclass_labels_by_index_or_by_name(frame, tmp_path):
    frame = frame.assign(region=frame["city"].map({"paris": "north", "lyon": "south", "nice": "south", "NA": "east"}),
                         size=frame["user"] % 4)
    frame.loc[::7, "region"] = None  # unlabelled rows
    schema = TableSchema.from_dict({**SCHEMA, "tasks": [{"name": "region", "type": "multiclass", "num_classes": 3},
                                                        {"name": "size", "type": "multiclass", "num_classes": 4}]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    whole = TablePreprocessor(schema).fit(frame)
    chunked = TablePreprocessor(schema).fit(iter_table(tmp_path / "t.csv", chunk_rows=97))
    assert whole.label_classes == chunked.label_classes == {"region": ["east", "north", "south"]}  # "size" holds indices
    labels = whole.transform(frame).tensors.labels
    expected = frame["region"].map({"east": 0, "north": 1, "south": 2}).to_numpy(dtype=float)
    np.testing.assert_array_equal(labels[:, 0].numpy(), expected)
    np.testing.assert_array_equal(labels[:, 1].numpy(), frame["size"].to_numpy(dtype=float))
    assert TablePreprocessor.from_dict(whole.to_dict()).label_classes == whole.label_classes


def test_boolean_columns_read_as_one_and_zero(frame, schema, tmp_path):
    """A boolean label or dense column (Parquet's bool, CSV's True / False with empty cells) is 1 / 0."""
    as_numbers = TablePreprocessor(schema).fit(frame)
    expected = as_numbers.transform(frame).tensors
    flagged = frame.assign(click=frame["click"].astype(bool))
    flagged.to_parquet(tmp_path / "t.parquet", index=False)
    flagged.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv"):
        table = read_table(tmp_path / name, schema.required_columns)
        torch.testing.assert_close(as_numbers.transform(table).tensors.labels, expected.labels, equal_nan=True)
    gaps = flagged.assign(click=flagged["click"].astype(object))
    gaps.loc[:4, "click"] = None
    gaps.to_csv(tmp_path / "gaps.csv", index=False)
    labels = as_numbers.transform(read_table(tmp_path / "gaps.csv", schema.required_columns)).tensors.labels
    assert labels[:5, 0].isnan().all() and torch.equal(labels[5:, 0], expected.labels[5:, 0])
    with_flag = TableSchema.from_dict({**SCHEMA, "dense": [*SCHEMA["dense"], "paid"]})
    paid = frame.assign(paid=frame["age"] > 40)
    dense = TablePreprocessor(with_flag).fit(paid).transform(paid).tensors.inputs["dense"][:, 2].double()
    ones = (frame["age"] > 40).to_numpy(dtype=float)
    np.testing.assert_allclose(dense.numpy(), (ones - ones.mean()) / ones.std(), atol=1e-6)  # standardised 0 / 1


def test_a_table_in_parts_a_folder_or_a_glob(tmp_path):
    import pandas as pd

    frame = make_table(90, seed=3)
    parts = tmp_path / "clicks"
    parts.mkdir()
    for i, rows in enumerate((slice(0, 40), slice(40, 40), slice(40, 90))):  # the middle part has no rows
        frame.iloc[rows].to_parquet(parts / f"part-{i:05d}.parquet", index=False)
    (parts / "_SUCCESS").write_text("")
    (parts / ".part-00000.parquet.crc").write_bytes(b"\x00")
    whole = read_table(parts)
    pd.testing.assert_frame_equal(whole, frame.reset_index(drop=True))
    assert sum(len(c) for c in iter_table(parts, ["click"], chunk_rows=16)) == 90

    for day, rows in (("2026-11-01", slice(0, 50)), ("2026-11-02", slice(50, 90))):
        (tmp_path / f"day={day}").mkdir()
        frame.iloc[rows].to_csv(tmp_path / f"day={day}" / "part-0.csv", index=False)
    globbed = read_table(tmp_path / "day=*" / "part-*.csv")
    assert len(globbed) == 90 and list(globbed["city"]) == list(frame["city"])  # "NA" stays a city, part by part

    with pytest.raises(DataError, match="no file matches"):
        read_table(tmp_path / "day=*" / "*.parquet")
    frame.iloc[:5].to_csv(parts / "part-00009.csv", index=False)
    with pytest.raises(DataError, match="mixes CSV and Parquet"):
        read_table(parts)
    (parts / "part-00009.csv").unlink()
    frame.iloc[:5].drop(columns=["age"]).to_parquet(parts / "part-00009.parquet", index=False)
    with pytest.raises(DataError, match="part-00009.parquet: missing column.*'age'"):
        read_table(parts, ["age", "click"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="without table files"):
        read_table(empty)
    frame.iloc[0:0].to_parquet(empty / "part-0.parquet", index=False)
    frame.iloc[0:0].to_parquet(empty / "part-1.parquet", index=False)
    with pytest.raises(DataError, match="none of its 2 files has rows"):
        read_table(empty / "*.parquet")
