"""Guidance networks and their TorchRL actor / critic wrappers (docs/design.md, "policies").

The seed's names: ``BaseGuidanceModel``, ``MLPGuidanceModel``, ``create_mlp_guidance_model``,
``AttentionGuidanceModel``, ``ConvGuidanceModel``, ``MultiObjectiveGuidance`` and step-specific guidance.
"""

from fluxguide.policies.actors import (
    CoefficientHead,
    GaussianHead,
    ObservationAdapter,
    coefficient_parts,
    is_coefficient_policy,
    make_coefficient_actor,
    make_deterministic_actor,
    make_probabilistic_actor,
)
from fluxguide.policies.affine import AffineGuidance
from fluxguide.policies.attention import AttentionGuidanceModel
from fluxguide.policies.architectures import ARCHITECTURES
from fluxguide.policies.base import BaseGuidanceModel, CheckedNetwork, GuidanceNetwork, build_guidance_model
from fluxguide.policies.checkpoint import load_guidance_model, read_guidance_config, save_guidance_model
from fluxguide.policies.coarse import CoarseGuidance, coarse_coordinates, project_coarse
from fluxguide.policies.composite import (
    CompositeGuidance,
    GuidancePart,
    MultiObjectiveGuidance,
    StepSpecificGuidance,
    TimestepRangeGuidance,
)
from fluxguide.policies.conv import ConvGuidanceModel
from fluxguide.policies.distributions import CoarseNormal, ReducedNormal, SubspaceNormal
from fluxguide.policies.exploration import Exploration, make_ppo_actor
from fluxguide.policies.embeddings import grid_position_features, timestep_embedding
from fluxguide.policies.hub import PolicyCard, load_policy_folder, push_policy_folder, save_policy_folder
from fluxguide.policies.mlp import MLPGuidanceModel, create_mlp_guidance_model
from fluxguide.policies.value import GuidanceValueModel, make_value_network

__all__ = [
    "ARCHITECTURES",
    "AffineGuidance",
    "AttentionGuidanceModel",
    "BaseGuidanceModel",
    "CheckedNetwork",
    "CoarseGuidance",
    "CoarseNormal",
    "CoefficientHead",
    "CompositeGuidance",
    "ConvGuidanceModel",
    "Exploration",
    "GaussianHead",
    "GuidanceNetwork",
    "GuidancePart",
    "GuidanceValueModel",
    "MLPGuidanceModel",
    "MultiObjectiveGuidance",
    "ObservationAdapter",
    "ReducedNormal",
    "StepSpecificGuidance",
    "SubspaceNormal",
    "TimestepRangeGuidance",
    "build_guidance_model",
    "coarse_coordinates",
    "coefficient_parts",
    "create_mlp_guidance_model",
    "grid_position_features",
    "is_coefficient_policy",
    "load_guidance_model",
    "make_coefficient_actor",
    "make_deterministic_actor",
    "make_ppo_actor",
    "make_probabilistic_actor",
    "make_value_network",
    "project_coarse",
    "read_guidance_config",
    "save_guidance_model",
    "timestep_embedding",
]
__all__ += ["PolicyCard", "load_policy_folder", "push_policy_folder", "save_policy_folder"]  # Hub-style folders
