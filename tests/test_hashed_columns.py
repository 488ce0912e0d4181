"""Categorical and multi-valued columns with ``hash_buckets``: no vocabulary, a stable hash per value."""

import json

import pandas as pd
import pytest
import torch

from mtlkit import ConfigError
from mtlkit.data.schema import TableSchema
from mtlkit.features import FeatureEncoder, TablePreprocessor

from tables import SCHEMA, make_table

HASHED = {**SCHEMA, "categorical": ["city", {"name": "user", "embedding_dim": 4, "hash_buckets": 16}],
          "multi_valued": [{"name": "tags", "embedding_dim": 3, "hash_buckets": 8}]}


def test_hashed_codes_are_stable_buckets_with_no_vocabulary(tmp_path):
    frame = make_table(600, seed=0)
    pre = TablePreprocessor(TableSchema.from_dict(HASHED)).fit(frame)
    assert pre.vocabularies["user"] == [] and pre.vocabularies["tags"] == []  # nothing counted or saved
    out = pre.transform(frame)
    users = out.tensors.inputs["categorical"][:, 1]
    assert users.min() >= 0 and users.max() < 16
    # One code per value, the same wherever the value appears.
    pairs = pd.DataFrame({"user": frame["user"].astype(str), "code": users.numpy()}).drop_duplicates()
    assert pairs["user"].is_unique
    # The hash is part of every saved model's meaning: pinned, so a change of hashing fails here first.
    assert pre._codes(pd.Series(["user_42", "0", "<missing>"]), pre.schema.categorical[1]).tolist() == \
        [int(pd.util.hash_array(pd.Series([v]).to_numpy(dtype=object))[0] % 16) for v in ("user_42", "0", "<missing>")]
    assert pre._codes(pd.Series(["user_42"]), pre.schema.categorical[1]).tolist() == [11]  # 816768241115671035 % 16
    tags = out.tensors.inputs["multi_valued"][:, 0]
    assert tags[tags >= 0].max() < 8
    # Unseen values get a bucket, not the OOV row, and are not counted as out of vocabulary.
    new = frame.head(4).copy()
    new["user"] = [1001, 1002, 1003, 1004]
    encoded = pre.transform(new)
    assert "user" not in encoded.out_of_vocabulary and "tags" not in encoded.out_of_vocabulary
    assert encoded.out_of_vocabulary["city"] == 0
    # The encoder has one row per bucket; a saved preprocessor codes the same.
    config = pre.encoder_config()
    assert config.categorical_cardinalities[1] == 16 and list(config.multi_valued_cardinalities) == [8]
    FeatureEncoder(config)(out.tensors.inputs)
    pre.save(tmp_path / "pre.json")
    assert json.loads((tmp_path / "pre.json").read_text())["vocabularies"]["user"] == []
    again = TablePreprocessor.load(tmp_path / "pre.json").transform(frame).tensors.inputs
    for key, value in out.tensors.inputs.items():
        assert torch.equal(again[key], value)


def test_bad_hash_buckets():
    with pytest.raises(ConfigError, match="'user': hash_buckets: expected an integer >= 0"):
        TableSchema.from_dict({**SCHEMA, "categorical": [{"name": "user", "hash_buckets": -1}]})
    with pytest.raises(ConfigError, match="'user': min_frequency applies to a vocabulary"):
        TableSchema.from_dict({**SCHEMA, "categorical": [{"name": "user", "hash_buckets": 8, "min_frequency": 2}]})


def test_a_run_with_hashed_columns(tmp_path):
    from mtlkit.experiments.tabular_run import RunConfig, load_run, train_run

    make_table(800, seed=0).to_csv(tmp_path / "train.csv", index=False)
    test = make_table(200, seed=1)
    test.to_csv(tmp_path / "test.csv", index=False)
    config = RunConfig(data={"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}, schema=HASHED,
                       model={"name": "mmoe", "num_experts": 3, "expert_hidden": [16]},
                       training={"max_epochs": 2, "batch_size": 64, "progress": False})
    run = train_run(config, tmp_path / "run")
    predictions, unseen = load_run(run).predict(test)
    assert set(predictions) == {"click", "buy", "watch"} and "user" not in unseen
