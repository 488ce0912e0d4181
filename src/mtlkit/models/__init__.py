"""Models: building blocks (MLPs, expert banks, gates, towers) and the registered multi-task models.

Every model is built from a typed config through one registry::

    from mtlkit.models import build_model
    model = build_model("mmoe", input_dim=100, tasks=["y1", "y2"], num_experts=8)
"""

from mtlkit.models.adaptive_task_fusion import AdaptiveTaskFusion, AdaTTConfig
from mtlkit.models.adaptive_information_transfer import AdaptiveInformationTransferModel, AITMConfig, funnel_violation
from mtlkit.models.base import ModelConfig, MultiTaskModel
from mtlkit.models.cross_stitch import CrossStitchConfig, CrossStitchNetwork
from mtlkit.models.esmm import EntireSpaceFunnelModel, EntireSpaceMultiTaskModel, ESMMConfig, FunnelESMMConfig, esmm_tasks
from mtlkit.models.entire_space_counterfactual import (ESCM2Config, EntireSpaceCounterfactualModel, doubly_robust_risk,
                                                     inverse_propensity_risk)
from mtlkit.models.budget import count_model_parameters, match_parameter_budget
from mtlkit.models.dselect_gates import DSelectKGateBank
from mtlkit.models.experts import ExpertBank
from mtlkit.models.gate_settings import GateSettings
from mtlkit.models.gates import GateBank, mix_experts
from mtlkit.models.layers import MLP, StackedLinear, StackedMLP
from mtlkit.models.mixture_of_experts import (
    MixtureOfExpertsConfig,
    MultiGateMixtureOfExperts,
    OneGateMixtureOfExperts,
)
from mtlkit.models.progressive_layered_extraction import (
    CGCConfig,
    CustomizedGateControl,
    PLEConfig,
    ProgressiveLayeredExtraction,
)
from mtlkit.models.registry import build_model, get_model_class, list_models, model_config, register_model
from mtlkit.models.shared_and_task_embeddings import SharedAndTaskSpecificEmbeddings, STEMConfig
from mtlkit.models.shared_bottom import SharedBottomConfig, SharedBottomModel
from mtlkit.models.single_task import SingleTaskConfig, SingleTaskModel
from mtlkit.models.calibrated_outputs import IsotonicCalibration, apply_output_calibration
from mtlkit.models.tabular import TabularMultiTaskModel, build_tabular_model

__all__ = [
    "MLP", "StackedLinear", "StackedMLP", "ExpertBank", "GateBank", "DSelectKGateBank", "GateSettings", "mix_experts",
    "ModelConfig", "MultiTaskModel", "register_model", "build_model", "list_models", "get_model_class",
    "model_config", "count_model_parameters", "match_parameter_budget",
    "SingleTaskConfig", "SingleTaskModel", "SharedBottomConfig", "SharedBottomModel",
    "MixtureOfExpertsConfig", "OneGateMixtureOfExperts", "MultiGateMixtureOfExperts",
    "CGCConfig", "PLEConfig", "CustomizedGateControl", "ProgressiveLayeredExtraction", "AdaTTConfig", "AdaptiveTaskFusion",
    "STEMConfig", "SharedAndTaskSpecificEmbeddings",
    "ESMMConfig", "EntireSpaceMultiTaskModel", "esmm_tasks",
    "ESCM2Config", "EntireSpaceCounterfactualModel", "doubly_robust_risk", "inverse_propensity_risk",
    "TabularMultiTaskModel", "build_tabular_model", "apply_output_calibration", "IsotonicCalibration",
    "FunnelESMMConfig", "EntireSpaceFunnelModel",
    "CrossStitchConfig", "CrossStitchNetwork", "AITMConfig", "AdaptiveInformationTransferModel", "funnel_violation",
]
