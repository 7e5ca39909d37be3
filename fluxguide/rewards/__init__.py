"""Reward modules behind one contract, a registry and composition (docs/design.md, "rewards").

Every reward maps images ``(B, 3, H, W)`` in [0, 1] and ``B`` prompts to a float32 ``(B,)`` tensor and
says whether it is ``differentiable`` with respect to the pixels.
"""

from fluxguide.rewards.aesthetic import AestheticPredictor, AestheticReward, read_state_dict
from fluxguide.rewards.base import (
    NotDifferentiableError,
    RewardModel,
    call_reward,
    describe_reward,
    require_differentiable,
    reward_with_grad,
)
from fluxguide.rewards.callable_reward import CallableReward
from fluxguide.rewards.clip_score import CLIPCaptionLogProb, CLIPScore
from fluxguide.rewards.composite import WeightedSum
from fluxguide.rewards.inputs import (
    NonFiniteRewardError,
    RewardOutputError,
    check_images,
    check_prompts,
    check_reward_output,
)
from fluxguide.rewards.open_clip_models import load_open_clip
from fluxguide.rewards.preprocess import CLIPPreprocess
from fluxguide.rewards.registry import REWARDS, available_rewards, make_reward, register_reward
from fluxguide.rewards.style import StyleSimilarity

__all__ = [
    "REWARDS",
    "AestheticPredictor",
    "AestheticReward",
    "CLIPCaptionLogProb",
    "CLIPPreprocess",
    "CLIPScore",
    "CallableReward",
    "NonFiniteRewardError",
    "NotDifferentiableError",
    "RewardModel",
    "RewardOutputError",
    "StyleSimilarity",
    "WeightedSum",
    "available_rewards",
    "call_reward",
    "check_images",
    "check_prompts",
    "check_reward_output",
    "describe_reward",
    "load_open_clip",
    "make_reward",
    "read_state_dict",
    "register_reward",
    "require_differentiable",
    "reward_with_grad",
]
