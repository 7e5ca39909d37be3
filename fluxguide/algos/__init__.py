"""Training algorithms for guidance policies: one contract (:mod:`fluxguide.algos.common`), four algorithms.

- :class:`RewardGradient`: backpropagate a differentiable reward through the sampler (full trajectory with
  truncation / checkpointing / control cost, or the one-step form);
- :class:`PPO`: PPO over the denoising MDP with TorchRL (collector, ``ClipPPOLoss``, group or GAE advantages);
- :class:`AdjointMatching`: regress the control onto the lean adjoint under the memoryless noise schedule
  (Domingo-Enrich et al., ICLR 2025), whose fixed point samples the reward-tilted distribution;
- :class:`BehaviourCloning`: regress corrections onto collected targets (:class:`BCLoss`, :mod:`fluxguide.data`);
- the seed's :class:`GuidanceModelTrainer` (supervised ``train_step``, one-step ``train_from_reward``).

Each algorithm's ``update(...)`` returns metrics averaged over ranks and raises :class:`NonFiniteLossError`;
its ``modules`` / ``optimizers`` name what a checkpoint holds (:class:`Algorithm`).
"""

from fluxguide.algos.adjoint_matching import (
    AdjointMatching,
    AdjointMatchingConfig,
    adjoint_matching_loss,
    lean_adjoint,
    sample_memoryless,
)
from fluxguide.algos.bc import (
    BCConfig,
    BCLoss,
    BehaviourCloning,
    bc_evaluate,
    bc_update,
    check_dataset_matches_policy,
)
from fluxguide.algos.common import (
    Algorithm,
    LossOutput,
    NonFiniteLossError,
    clip_and_check_gradients,
    optimizer_step,
    total_loss,
)
from fluxguide.algos.on_sampler import OnSamplerAlgorithm, SamplerBatch
from fluxguide.algos.ppo import PPO, PPOConfig, group_advantages, rewards_to_go
from fluxguide.algos.reward_gradient import (
    CorrectionRecorder,
    RewardGradient,
    RewardGradientConfig,
    RewardGradientOutput,
    draw_truncation,
    one_step_reward_loss,
    predicted_clean_latent,
    random_translate,
    reward_gradient_loss,
)
from fluxguide.algos.trainer import GuidanceModelTrainer
from fluxguide.backbones.base import straight_through_clamp

__all__ = [
    "PPO",
    "AdjointMatching",
    "AdjointMatchingConfig",
    "Algorithm",
    "BCConfig",
    "BCLoss",
    "BehaviourCloning",
    "CorrectionRecorder",
    "GuidanceModelTrainer",
    "LossOutput",
    "NonFiniteLossError",
    "OnSamplerAlgorithm",
    "PPOConfig",
    "RewardGradient",
    "RewardGradientConfig",
    "RewardGradientOutput",
    "SamplerBatch",
    "adjoint_matching_loss",
    "bc_evaluate",
    "bc_update",
    "check_dataset_matches_policy",
    "clip_and_check_gradients",
    "draw_truncation",
    "group_advantages",
    "lean_adjoint",
    "one_step_reward_loss",
    "optimizer_step",
    "predicted_clean_latent",
    "random_translate",
    "reward_gradient_loss",
    "rewards_to_go",
    "sample_memoryless",
    "straight_through_clamp",
    "total_loss",
]
