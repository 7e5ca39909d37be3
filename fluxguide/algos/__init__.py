"""Training algorithms for guidance policies (DESIGN.md, "algos"): losses and update steps.

- reward gradient (full trajectory with truncation / checkpointing / control cost, and the one-step form);
- the seed's :class:`GuidanceModelTrainer` (supervised ``train_step``, one-step ``train_from_reward``).
"""

from fluxguide.algos.reward_gradient import (
    CorrectionRecorder,
    NonFiniteLossError,
    RewardGradient,
    RewardGradientConfig,
    RewardGradientOutput,
    draw_truncation,
    one_step_reward_loss,
    predicted_clean_latent,
    random_translate,
    reward_gradient_loss,
    straight_through_clamp,
    total_loss,
)
from fluxguide.algos.trainer import GuidanceModelTrainer

__all__ = [
    "CorrectionRecorder",
    "GuidanceModelTrainer",
    "NonFiniteLossError",
    "RewardGradient",
    "RewardGradientConfig",
    "RewardGradientOutput",
    "draw_truncation",
    "one_step_reward_loss",
    "predicted_clean_latent",
    "random_translate",
    "reward_gradient_loss",
    "straight_through_clamp",
    "total_loss",
]
