"""The seed's ``flux.guidance_models`` module under its fluxguide path.

Code written against the original guidance framework ports by renaming ``flux.`` to ``fluxguide.``:
the guidance architectures live in :mod:`fluxguide.policies` and the trainer in :mod:`fluxguide.algos`.
"""

from fluxguide.algos.trainer import GuidanceModelTrainer
from fluxguide.policies import (
    AttentionGuidanceModel,
    BaseGuidanceModel,
    ConvGuidanceModel,
    MLPGuidanceModel,
    MultiObjectiveGuidance,
    StepSpecificGuidance,
    TimestepRangeGuidance,
    create_mlp_guidance_model,
)

__all__ = [
    "AttentionGuidanceModel",
    "BaseGuidanceModel",
    "ConvGuidanceModel",
    "GuidanceModelTrainer",
    "MLPGuidanceModel",
    "MultiObjectiveGuidance",
    "StepSpecificGuidance",
    "TimestepRangeGuidance",
    "create_mlp_guidance_model",
]
