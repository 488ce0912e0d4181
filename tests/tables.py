"""A small recommendation-style table the tests write to disk (dense, categorical, multi-valued, labels)."""

import numpy as np
import pandas as pd


def make_table(rows: int = 600, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 30, rows)
    city = rng.choice(["paris", "lyon", "nice", "NA"], rows, p=[0.4, 0.3, 0.2, 0.1])  # "NA" is a real city code here
    price = np.exp(rng.normal(3, 1.2, rows)).round(2)
    age = rng.integers(18, 70, rows).astype(float)
    tags = ["|".join(rng.choice(list("abcdef"), rng.integers(0, 4), replace=False)) for _ in range(rows)]
    score = 0.8 * (city == "paris") - 0.02 * (age - 40) + 0.3 * np.log(price) - 1.0 + rng.normal(0, 0.5, rows)
    click = (score > 0).astype(int)
    buy = np.where(click == 1, (rng.random(rows) < 0.3).astype(int), 0)
    watch = np.where(click == 1, score + rng.normal(0, 0.1, rows), np.nan)  # only defined when clicked
    return pd.DataFrame({"user": user, "city": city, "price": price, "age": age, "tags": tags,
                         "click": click, "buy": buy, "watch_time": watch})


SCHEMA = {
    "tasks": [{"name": "click", "type": "binary"},
              {"name": "buy", "type": "binary"},
              {"name": "watch", "type": "regression", "label": "watch_time"}],
    "dense": [{"name": "price", "log": True}, {"name": "age", "normalization": "minmax"}],
    "categorical": ["city", {"name": "user", "embedding_dim": 4, "min_frequency": 2}],
    "multi_valued": [{"name": "tags", "embedding_dim": 3}],
    "group_column": None,
}
