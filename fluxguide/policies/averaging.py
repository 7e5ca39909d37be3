"""An exponential moving average of a policy's weights (Polyak averaging), the policy a run evaluates and saves.

Reward-gradient fine-tuning at a high learning rate ends wherever the last noisy updates left the weights: runs of
one recipe that differ only in their seed end several held-out points apart. The average of the recent iterates
sits nearer the middle of the region they wander in (Polyak & Juditsky 1992, "Acceleration of Stochastic
Approximation by Averaging"; the EMA weights of diffusion training, Karras et al. 2024, "Analyzing and Improving
the Training Dynamics of Diffusion Models"). It costs one copy of the policy and one multiply-add per weight per
update; the optimizer never sees it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class PolicyAverage(nn.Module):
    """``average <- decay * average + (1 - decay) * policy`` after every update, starting from the policy.

    The average is a copy of the policy's module (same class and config, so ``save_guidance_model`` and every
    sampler take it); its buffers follow the policy's. It is an ``nn.Module`` whose state (the average and the
    number of updates) goes into the run's checkpoints, so a resumed run continues the same average.

    Args:
        policy: the policy being trained (not a ``DistributedDataParallel`` wrapper).
        decay: in ``(0, 1)``; the average spans about ``1 / (1 - decay)`` updates (0.98: the last 50).
    """

    def __init__(self, policy: nn.Module, decay: float) -> None:
        super().__init__()
        if not (isinstance(decay, float | int) and math.isfinite(decay) and 0.0 < decay < 1.0):
            raise ValueError(f"the weight average's decay must be in (0, 1), e.g. 0.98 (an average over about 50 "
                             f"updates), got {decay!r}")
        self.decay = float(decay)
        self.average = copy.deepcopy(policy).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """Move the average towards ``policy``'s current weights; copy its buffers."""
        mine, theirs = dict(self.average.named_parameters()), dict(policy.named_parameters())
        if mine.keys() != theirs.keys():
            raise ValueError("PolicyAverage.update got a policy with other parameters than the one it averages: pass "
                             "the same (unwrapped) policy every update")
        torch._foreach_lerp_(list(mine.values()), [theirs[k].detach() for k in mine], 1.0 - self.decay)
        for name, buffer in policy.named_buffers():
            self.average.get_buffer(name).copy_(buffer)
        self.updates += 1
