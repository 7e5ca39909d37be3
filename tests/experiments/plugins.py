"""A user's plug-ins, named to the training scripts by spec (``tests.experiments.plugins:make_reward_fn``)."""

from __future__ import annotations

import torch

from fluxguide.rewards import RewardModel, make_reward

#: Every reward / policy the factories built, so a test can see that a script used them.
BUILT: list[object] = []


class CountingReward(RewardModel):
    """The shapes-world CLIP score (differentiable), counting its calls."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        return self.inner(images, prompts)


def make_reward_fn(world=None, **kwargs) -> CountingReward:
    reward = CountingReward(make_reward("shapes-clip", world=world))
    BUILT.append(reward)
    return reward


def make_policy_fn(backbone, *, hidden_dim: int, num_layers: int, vec_dim: int, grid_size, device):
    from fluxguide.policies.registry import POLICIES

    policy = POLICIES.get("mlp")(backbone, hidden_dim=hidden_dim, num_layers=num_layers, vec_dim=vec_dim,
                                 grid_size=grid_size, device=device)
    BUILT.append(policy)
    return policy
