"""A trained guidance network inside diffusers' ``FluxPipeline``: ``pipe(prompt)`` samples with it.

:func:`guide_pipeline` replaces ``pipe.transformer`` by a :class:`GuidedFluxTransformer`, which calls the
transformer and adds ``scale * policy(img, pred, txt, vec, t, step_idx)`` to its output, the same
``pred + scale * correction`` as fluxguide's own sampler (:func:`fluxguide.sampling.denoise`); the
pipeline's ``FlowMatchEulerDiscreteScheduler`` then takes the same Euler step. :func:`unguide_pipeline`
puts the plain transformer back.

What the transformer receives from ``FluxPipeline.__call__`` (diffusers v0.42) and what the policy sees:

- ``hidden_states``: the packed latents ``(B, seq, C)``, fluxguide's ``img`` (the same 2x2 packing).
- ``encoder_hidden_states``: T5's last hidden state *before* the transformer's ``context_embedder``, and
  ``pooled_projections``: CLIP's pooled output; these are :meth:`FluxBackbone.encode`'s ``txt`` and ``vec``.
- ``timestep``: the scheduler's timestep divided by 1000, i.e. the sigma in [0, 1] (1 = noise), fluxguide's
  ``t``.
- the step: the scheduler's own counter (``step_index``), which ``set_timesteps`` resets at every pipe call
  and which is ``None`` until the first step has been taken.

True classifier-free guidance (``true_cfg_scale > 1`` with a negative prompt) calls the transformer twice per
step and mixes the two outputs outside it, where no wrapper of the transformer can add the correction the
way fluxguide's CFG sampler does; it is refused when the second ("uncond") call arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from fluxguide.policies.checkpoint import load_guidance_model
from fluxguide.sampling.denoise import (
    GuidanceFn,
    GuidanceScale,
    apply_guidance_model,
    check_guidance_scale,
    scale_at,
)

#: The name ``FluxPipeline`` gives the transformer call of the negative prompt under true CFG.
UNCOND_CONTEXT = "uncond"


class GuidedFluxTransformer(nn.Module):
    """``pipe.transformer`` plus a guidance network: the velocity ``pred + scale * policy(...)``.

    Every attribute it does not define (``config``, ``dtype``, ``device``, ``encoder_hid_proj``, ...) is the
    wrapped transformer's, so the pipeline reads its settings unchanged; the policy is a submodule, so
    ``pipe.to(device)`` moves it too. The policy sees its inputs on its own device and in its own dtype: float32,
    as in fluxguide's sampler, unless it was converted; the guided velocity goes back in the transformer's output
    dtype (bfloat16 on a GPU), as the pipeline expects.

    Args:
        transformer: the pipeline's ``FluxTransformer2DModel``.
        policy: a guidance network ``policy(img, pred, txt, vec, t, step_idx) -> correction``.
        scheduler: the pipeline's scheduler, whose ``step_index`` numbers the steps.
        guidance_scale: a float, one float per step, or a callable ``step_idx -> float`` (as in ``denoise``).
    """

    def __init__(
        self, transformer: nn.Module, policy: GuidanceFn, scheduler: Any, guidance_scale: GuidanceScale = 1.0
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.policy = policy
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self._context: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["transformer"], name)

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """The transformer's ``cache_context``, remembering the call's name (``"cond"`` / ``"uncond"``)."""
        with self.transformer.cache_context(name, **kwargs):
            previous, self._context = self._context, name
            try:
                yield
            finally:
                self._context = previous

    def step_index(self) -> int:
        """The index of the step being taken: the scheduler's counter, ``None`` (step 0) before its first step."""
        index = self.scheduler.step_index
        return 0 if index is None else int(index)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        *,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """The transformer's output with the correction added (the transformer's signature and return type)."""
        if self._context == UNCOND_CONTEXT:
            raise NotImplementedError(
                "true classifier-free guidance (true_cfg_scale > 1 with a negative prompt) is not supported by a "
                "guided pipeline: FluxPipeline mixes the two transformer outputs outside the transformer, after "
                "the correction. Call the pipe with true_cfg_scale=1.0 (or no negative prompt), or sample with "
                "fluxguide's own sampler (backbone.sample(..., cfg_scale=...))"
            )
        if encoder_hidden_states is None or pooled_projections is None or timestep is None:
            raise ValueError(
                "a guided Flux transformer needs encoder_hidden_states, pooled_projections and timestep (the "
                "policy reads txt, vec and t); call it as FluxPipeline does"
            )
        pred = self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, return_dict=False, **kwargs,
        )[0]
        guided = self.guide(hidden_states, pred, encoder_hidden_states, pooled_projections, timestep)
        return Transformer2DModelOutput(sample=guided) if return_dict else (guided,)

    def guide(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
              timestep: torch.Tensor) -> torch.Tensor:
        """``pred + scale * policy(img, pred, txt, vec, t, step_idx)``, computed as fluxguide's sampler computes it
        (:func:`~fluxguide.sampling.denoise.apply_guidance_model`) in the policy's dtype and on its device, returned
        in ``pred``'s dtype and on its device."""
        t = timestep.float().reshape(-1).expand(img.shape[0])
        if float(t.max()) > 1.0 + 1e-4 or float(t.min()) < 0.0:
            raise ValueError(
                f"the transformer got timestep {t.tolist()}, outside [0, 1]: the guidance network reads the sigma "
                "(1 = noise), which FluxPipeline passes as its timestep / 1000; call the transformer that way"
            )
        device, dtype = _placement(self.policy, img.device)
        step_idx = self.step_index()
        scale = scale_at(self.guidance_scale, step_idx, len(self.scheduler.timesteps))
        img, policy_pred, txt, vec, t = (x.to(device=device, dtype=dtype) for x in (img, pred, txt, vec, t))
        guided = apply_guidance_model(self.policy, img, policy_pred, txt, vec, t, step_idx, scale)
        return guided.to(device=pred.device, dtype=pred.dtype)


def _placement(policy: object, default_device: torch.device) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the policy computes: its first floating parameter's (float32 unless it was
    converted, e.g. by ``pipe.to(torch.bfloat16)`` after guiding); float32 on ``default_device`` without one."""
    if isinstance(policy, nn.Module):
        for parameter in policy.parameters():
            if parameter.is_floating_point():
                return parameter.device, parameter.dtype
    return default_device, torch.float32


def _check_policy_fits(policy: GuidanceFn, transformer: nn.Module) -> None:
    """Raise if the policy declares observation sizes other than this transformer's (another base model)."""
    config = transformer.config
    expected = {
        "latent_channels": config.in_channels,
        "txt_dim": config.joint_attention_dim,
        "vec_dim": config.pooled_projection_dim,
    }
    for name, size in expected.items():
        declared = getattr(policy, name, None)
        if declared is not None and declared != size:
            raise ValueError(
                f"the guidance network expects {name}={declared}, but this pipeline's transformer gives {size}: "
                "it was trained for another base model; guide a pipeline of the checkpoint it was trained on"
            )


def is_guided(pipe: FluxPipeline) -> bool:
    """Whether :func:`guide_pipeline` has wrapped ``pipe``'s transformer (and :func:`unguide_pipeline` has not
    undone it)."""
    return isinstance(getattr(pipe, "transformer", None), GuidedFluxTransformer)


def guide_pipeline(
    pipe: FluxPipeline, policy: GuidanceFn | str | Path, guidance_scale: GuidanceScale = 1.0
) -> FluxPipeline:
    """Make ``pipe(prompt, ...)`` sample with a guidance network; return ``pipe`` (changed in place).

    ``pipe.transformer`` becomes a :class:`GuidedFluxTransformer` around the original one;
    :func:`unguide_pipeline` puts it back (do that before ``pipe.save_pretrained``). A :class:`FluxBackbone`
    built from the pipe beforehand keeps the plain transformer, so fluxguide's own sampler is unaffected.

    Args:
        pipe: a diffusers ``FluxPipeline`` (text to image).
        policy: a guidance network, or the path of a ``guidance.safetensors`` file
            (:func:`fluxguide.policies.load_guidance_model`, loaded onto the transformer's device, in eval mode).
        guidance_scale: the correction's scale (not the pipe's distilled ``guidance_scale``): a float, one
            float per step, or a callable ``step_idx -> float``, as in :func:`fluxguide.sampling.denoise`.

    Raises:
        TypeError: ``pipe`` is not a ``FluxPipeline`` (img2img, inpainting, ControlNet, Kontext run other loops).
        ValueError: ``pipe`` is already guided, its scheduler does not count steps, or the policy was built for
            other latent / text sizes.
    """
    if not isinstance(pipe, FluxPipeline):
        raise TypeError(
            f"guide_pipeline supports diffusers' FluxPipeline (text to image), got {type(pipe).__name__}; "
            "load the checkpoint with FluxPipeline.from_pretrained(...)"
        )
    if is_guided(pipe):
        raise ValueError("this pipeline is already guided; call unguide_pipeline(pipe) before guiding it again")
    if not hasattr(pipe.scheduler, "step_index"):
        raise ValueError(
            f"the pipeline's scheduler {type(pipe.scheduler).__name__} has no step_index to number the steps "
            "by; use Flux's FlowMatchEulerDiscreteScheduler"
        )
    if not callable(guidance_scale):  # its form now; a per-step list's length at the call, against the steps
        check_guidance_scale(guidance_scale, len(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else 1)
    if isinstance(policy, (str, Path)):
        policy = load_guidance_model(policy, device=pipe.transformer.device).eval()
    elif not callable(policy):
        raise TypeError(
            f"policy must be a guidance network (img, pred, txt, vec, t, step_idx) -> correction or the path of "
            f"a guidance.safetensors file, got {type(policy).__name__}"
        )
    _check_policy_fits(policy, pipe.transformer)
    pipe.transformer = GuidedFluxTransformer(pipe.transformer, policy, pipe.scheduler, guidance_scale)
    return pipe


def unguide_pipeline(pipe: FluxPipeline) -> FluxPipeline:
    """Undo :func:`guide_pipeline`: put the plain transformer back; return ``pipe``.

    Raises:
        ValueError: ``pipe`` is not guided.
    """
    if not is_guided(pipe):
        raise ValueError("this pipeline is not guided (its transformer is not a GuidedFluxTransformer)")
    pipe.transformer = pipe.transformer.transformer
    return pipe


__all__ = ["GuidedFluxTransformer", "guide_pipeline", "is_guided", "unguide_pipeline"]
