"""The KL of guided sampler steps to the base sampler's and to a reference policy's, recorded during sampling.

A guided Euler step and the base (or reference-guided) step, each read as a Gaussian of fixed width, differ only
in their means, so their KL is the squared difference of the corrections times a per-step constant. Summed over
steps it is the KL of whole trajectories (the chain rule of KL for Markov chains), the control cost that keeps
reward fine-tuning near the base sampler (Domingo-Enrich et al. 2024, "Adjoint Matching") or the
pretrained policy (DDPO-style KL regularisation, Fan et al. 2023).
"""

from __future__ import annotations

import torch
from torch import nn
from typing_extensions import Unpack

from fluxguide.policies.base import GuidanceArgs
from fluxguide.sampling.denoise import GuidanceFn, GuidanceScale, scale_at


class CorrectionRecorder(nn.Module):
    """Wraps a guidance model and records the control cost of each step's correction.

    At step ``i`` with scale ``s_i`` it records, per sample, ``s_i^2 * mean(correction^2)``. This is the KL
    divergence between the guided and the base sampler's step, up to a constant, when each Euler step is read
    as a Gaussian of fixed width: the guided step ``N(img + dt_i (pred + s_i c), sigma_i^2 I)`` and the base
    step ``N(img + dt_i pred, sigma_i^2 I)`` differ only in their means, so ``KL = dt_i^2 s_i^2 |c|^2 / (2
    sigma_i^2)``; with ``sigma_i`` proportional to the step size ``dt_i`` this is ``s_i^2 |c|^2`` times a
    constant (here averaged over the latent's entries, so the weight does not depend on the resolution).
    Summed over steps it is the KL of the whole trajectory (the chain rule of KL for Markov chains); the
    mean over steps keeps the weight independent of ``num_steps``.

    With truncated backprop the steps before the last ``K`` run without grad, yet the policy acts there too;
    so that the KL penalty still reaches it at those steps, the recorder recomputes nothing but evaluates the
    policy with grad enabled on the (detached) sampler state and returns the correction detached: the
    trajectory stays graph-free, while the cost keeps a small graph through the policy alone
    (``cost_grad_all_steps``). Otherwise an untrained-for early-step correction could grow unchecked.

    With a ``reference`` policy (the initial one, frozen) it also records the same KL between the guided step
    and the reference-guided step, ``s_i^2 * mean((correction - reference_correction)^2)``: the penalty that
    keeps a fine-tuned policy near its start (DDPO-style KL to the pretrained model), in :meth:`per_sample_kl`.

    Records are keyed by step, so the recomputation of a checkpointed step in the backward pass overwrites
    rather than duplicates them. Call :meth:`reset` before each trajectory.
    """

    def __init__(
        self, model: GuidanceFn, guidance_scale: GuidanceScale, num_steps: int, cost_grad_all_steps: bool = True,
        reference: GuidanceFn | None = None, kl_grad: bool = True, cost_grad: bool = True,
    ) -> None:
        super().__init__()
        self.kl_grad, self.cost_grad = kl_grad, cost_grad
        self.model = model
        self.guidance_scale = guidance_scale
        self.num_steps = num_steps
        self.cost_grad_all_steps = cost_grad_all_steps
        self.reference = reference
        self.costs: dict[int, torch.Tensor] = {}
        self.kls: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.costs = {}
        self.kls = {}

    def forward(self, *obs: Unpack[GuidanceArgs]) -> torch.Tensor:
        """The wrapped model's correction for the guidance call ``obs``, recording its cost (and KL) at its step."""
        step = int(obs[-1])  # the sampler calls with one int step index for the whole batch
        scale = scale_at(self.guidance_scale, step, self.num_steps)
        detach = self.cost_grad_all_steps and not torch.is_grad_enabled()
        with torch.set_grad_enabled(torch.is_grad_enabled() or detach):
            correction = self.model(*obs)
            # Only a penalised cost or KL keeps its graph: an unused graph held here outlives the update (it ties
            # this recorder to the checkpointed steps' recomputation) and leaks its memory.
            cost = correction if self.cost_grad else correction.detach()
            self.costs[step] = scale**2 * cost.float().square().flatten(1).mean(1)
            if self.reference is not None:
                self.kls[step] = scale**2 * step_kl(correction if self.kl_grad else correction.detach(),
                                                    self.reference, *obs)
        return correction.detach() if detach else correction

    def per_sample_cost(self) -> torch.Tensor:
        """``(B,)``: the mean over recorded steps of the per-step control cost."""
        if not self.costs:
            raise RuntimeError("no corrections recorded: run the sampler with this recorder as guidance model")
        return torch.stack([self.costs[i] for i in sorted(self.costs)]).mean(0)

    def per_sample_kl(self) -> torch.Tensor | None:
        """``(B,)``: the mean over recorded steps of the per-step KL to the reference (``None`` without one)."""
        if self.reference is None or not self.kls:
            return None
        return torch.stack([self.kls[i] for i in sorted(self.kls)]).mean(0)


def step_kl(
    correction: torch.Tensor, reference: GuidanceFn, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor,
    vec: torch.Tensor, timestep: torch.Tensor | float, step_idx: int | torch.Tensor,
) -> torch.Tensor:
    """``(B,)``: ``mean((correction - reference(state))^2)`` per sample, the reference evaluated without grad.

    Both policies guide the same Euler step of fixed width, so this is their steps' Gaussian KL up to the
    constant of :class:`CorrectionRecorder` (times the squared scale, which the caller applies).
    """
    with torch.no_grad():
        ref = reference(img.detach(), pred.detach(), txt, vec, timestep, step_idx)
    return (correction.float() - ref.float()).square().flatten(1).mean(1)
