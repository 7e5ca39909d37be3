"""Training algorithms for guidance policies (DESIGN.md, "algos"): losses and update steps.

- reward gradient (full trajectory with truncation / checkpointing / control cost, and the one-step form);
- PPO over the denoising MDP with TorchRL (collector, ``ClipPPOLoss``, group or GAE advantages);
- the seed's :class:`GuidanceModelTrainer` (supervised ``train_step``, one-step ``train_from_reward``).
"""

from fluxguide.algos.bc import BCLoss, bc_evaluate, bc_update, check_dataset_matches_policy
from fluxguide.data.collection import (
    DatasetError,
    GuidanceDataset,
    StateCollectionCallback,
    create_training_pairs,
    load_guidance_dataset,
)
from fluxguide.algos.ppo import PPO, PPOConfig, group_advantages, rewards_to_go
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
from fluxguide.data.targets import (
    TARGET_STRATEGIES,
    GuidanceDataCollector,
    TargetStrategy,
    make_target_strategy,
)
from fluxguide.algos.trainer import GuidanceModelTrainer

__all__ = [
    "PPO",
    "BCLoss",
    "CorrectionRecorder",
    "GuidanceModelTrainer",
    "NonFiniteLossError",
    "PPOConfig",
    "RewardGradient",
    "RewardGradientConfig",
    "RewardGradientOutput",
    "bc_evaluate",
    "bc_update",
    "check_dataset_matches_policy",
    "draw_truncation",
    "group_advantages",
    "one_step_reward_loss",
    "predicted_clean_latent",
    "random_translate",
    "reward_gradient_loss",
    "rewards_to_go",
    "straight_through_clamp",
    "total_loss",
]
