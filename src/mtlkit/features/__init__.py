"""Features: fitted preprocessing (vocabularies, normalisation) and the feature encoder (embeddings)."""

from mtlkit.features.encoder import EncoderConfig, FeatureEncoder

__all__ = ["EncoderConfig", "FeatureEncoder", "TablePreprocessor", "EncodedTable", "MISSING_TOKEN"]

_PREPROCESSING = ("TablePreprocessor", "EncodedTable", "MISSING_TOKEN")


def __getattr__(name: str):
    # The preprocessing (and pandas with it) loads when a table is first preprocessed: models and
    # training on tensors never pay for pandas and pyarrow (about 70 MB of memory and 0.3 s).
    if name in _PREPROCESSING:
        from mtlkit.features import preprocessing

        return getattr(preprocessing, name)
    raise AttributeError(f"module 'mtlkit.features' has no attribute {name!r}")
