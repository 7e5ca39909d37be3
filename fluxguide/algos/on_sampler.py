"""The algorithms that train a guidance policy on the guided sampler against a reward: their shared part.

Reward gradient and Adjoint Matching (and any algorithm of that family, e.g. a plug-in) hold the same things --
the backbone and the model they sample with (CFG-wrapped when asked), the policy (data-parallel under
``torchrun``), the reward, the decoder and the schedule -- and their update starts with the same data step: check
the batch's prompts against the backbone, encode them (text features cached per prompt) and draw the initial
noise. :class:`OnSamplerAlgorithm` is that part; a subclass writes what it does with a :class:`SamplerBatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fluxguide.algos.common import Algorithm, data_parallel_once, unwrap_data_parallel
from fluxguide.backbones.base import Backbone, Conditioning
from fluxguide.backbones.prompt_check import check_backbone_prompts

Decoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplerBatch:
    """What one update on the sampler starts from: the prompts, their conditioning, the initial noise and the
    generator the update draws the rest of its randomness from."""

    prompts: list[str]
    cond: Conditioning
    noise: torch.Tensor
    generator: torch.Generator | None


class OnSamplerAlgorithm(Algorithm):
    """An algorithm that trains ``policy`` on ``backbone``'s guided sampler against ``reward``.

    Args:
        backbone: the base model (``encode``, ``decode``, ``noise``, ``schedule``).
        policy: the guidance model; wrapped for data parallelism under ``torchrun`` unless it already is.
        reward: ``reward(images, prompts) -> (B,)``.
        optimizer: over the policy's parameters.
        num_steps: sampling steps (``None``: the backbone's default).
        cfg_scale: classifier-free guidance of the base model (1 = none).
        decode: latents -> images for the reward (default ``backbone.decode``).

    A checkpoint saves ``modules = {"policy": policy}`` (the plain module) and ``optimizers = {"policy":
    optimizer}``.
    """

    def __init__(self, backbone: Backbone, policy: nn.Module, reward: Any, optimizer: torch.optim.Optimizer, *,
                 num_steps: int | None, cfg_scale: float = 1.0, decode: Decoder | None = None) -> None:
        self.backbone = backbone
        self.policy = data_parallel_once(policy)
        self.reward = reward
        self.optimizer = optimizer
        self.modules: dict[str, nn.Module] = {"policy": unwrap_data_parallel(policy)}
        self.optimizers: dict[str, torch.optim.Optimizer] = {"policy": optimizer}
        self.cfg_scale = cfg_scale
        self.decode = decode if decode is not None else backbone.decode
        self.model = backbone if cfg_scale == 1.0 else backbone.with_cfg(cfg_scale)
        self.timesteps = backbone.schedule(num_steps)
        self._cond_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ids: tuple[torch.Tensor, torch.Tensor] | None = None

    def encode(self, prompts: list[str]) -> Conditioning:
        """The conditioning of ``prompts``, with text features cached per prompt (the text tower is frozen).

        Each new prompt is encoded on its own: a text tower's output for one prompt can differ in the last bit
        with the batch it is encoded in (the kernels a matmul picks depend on its shape), so encoding the
        prompts missing from this batch together would make a prompt's features depend on which prompts
        first came with it, and a resumed run (whose cache starts empty) would drift from the uninterrupted
        run by about 1e-7. One prompt at a time, the features are a function of the prompt alone.

        Raises:
            PromptError: a prompt the backbone cannot render, before any model runs on this batch.
        """
        new = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if new:
            check_backbone_prompts(self.backbone, new)
        for p in new:
            with torch.no_grad():
                c = self.backbone.encode([p])
            self._cond_cache[p] = (c.txt[0], c.vec[0])
            self._ids = (c.txt_ids, c.img_ids)
        assert self._ids is not None
        return Conditioning(
            txt=torch.stack([self._cond_cache[p][0] for p in prompts]),
            vec=torch.stack([self._cond_cache[p][1] for p in prompts]),
            txt_ids=self._ids[0], img_ids=self._ids[1], prompts=list(prompts),
        )

    def collect(self, prompts: list[str], generator: torch.Generator | None = None) -> SamplerBatch:
        """The shared data step: the prompts checked and encoded, and fresh initial noise (one per prompt)."""
        cond = self.encode(list(prompts))
        return SamplerBatch(list(prompts), cond, self.backbone.noise(len(prompts), generator), generator)
