"""Data: in-memory tensor datasets, synthetic generators and table readers."""

from mtlkit.data.funnel import FunnelData, make_funnel
from mtlkit.data.synthetic import SYNTHETIC_PRESETS, SyntheticConfig, SyntheticData, make_synthetic
from mtlkit.data.tensors import Batch, MultiTaskTensors

__all__ = ["Batch", "MultiTaskTensors", "SyntheticConfig", "SyntheticData", "SYNTHETIC_PRESETS", "make_synthetic",
           "FunnelData", "make_funnel"]
