"""Features: fitted preprocessing (vocabularies, normalisation) and the feature encoder (embeddings)."""

from mtlkit.features.encoder import EncoderConfig, FeatureEncoder
from mtlkit.features.preprocessing import MISSING_TOKEN, EncodedTable, TablePreprocessor

__all__ = ["EncoderConfig", "FeatureEncoder", "TablePreprocessor", "EncodedTable", "MISSING_TOKEN"]
