"""Sampler math as small pure functions: schedule, ODE/SDE steps, log-probs, the guided loop and its
instrumented form (the seed's ``denoise``, ``get_schedule``, ``apply_guidance_model``, ``denoise_with_state_collection``)."""

from fluxguide.sampling.cfg import ClassifierFreeGuidance
from fluxguide.sampling.conditioning import Conditioning, model_velocity
from fluxguide.sampling.denoise import FluxModel, apply_guidance_model, denoise, scale_at
from fluxguide.sampling.instrumented import denoise_with_state_collection
from fluxguide.sampling.memoryless import (
    correction_to_control,
    memoryless_coefficients,
    memoryless_sigma,
    memoryless_step,
)
from fluxguide.sampling.schedule import get_lin_function, get_schedule, time_shift
from fluxguide.sampling.sde_actions import sde_action_coefficient, sde_action_std, sde_log_prob_offset
from fluxguide.sampling.steps import (
    SDEStepOutput,
    euler_step,
    gaussian_log_prob,
    sde_mean,
    sde_step,
    sde_step_std,
)

__all__ = [
    "ClassifierFreeGuidance",
    "Conditioning",
    "FluxModel",
    "SDEStepOutput",
    "apply_guidance_model",
    "correction_to_control",
    "denoise",
    "denoise_with_state_collection",
    "euler_step",
    "gaussian_log_prob",
    "get_lin_function",
    "get_schedule",
    "memoryless_coefficients",
    "memoryless_sigma",
    "memoryless_step",
    "model_velocity",
    "scale_at",
    "sde_action_coefficient",
    "sde_action_std",
    "sde_log_prob_offset",
    "sde_mean",
    "sde_step",
    "sde_step_std",
    "time_shift",
]
